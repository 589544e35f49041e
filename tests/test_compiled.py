"""The compiled decode step (handler/model/compiled.py) against `transformers` `generate`.

The packages (SmolLM2 in fp32 and bf16, 4 slots of 512 tokens) are built once per machine into
`compile_cache` and loaded by every engine and server here. The architectures' tiny models go
through the compiled step in tests/test_architectures.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from handler import engine as engine_module
from handler.config import read_settings
from handler.engine import Engine
from handler.errors import GenerationError
from handler.generation.request import GenerationRequest, collect
from handler.model import compiled
from tests.conftest import (
    FP32_TIE,
    PROMPTS,
    assert_fp32_golden,
    assert_margin_rule,
    launch_server,
    reference_greedy,
    start_engine,
)
from tests.test_bf16 import BF16_STEPS


def compiled_env(cache: Path, **env: str) -> dict[str, str]:
    return {"TORCH_COMPILE": "true", "TORCH_COMPILE_CACHE": str(cache), **env}


class Recorder:
    """Wraps the loaded step: the rows and cache length of every call, and which rows were
    being decoded."""

    def __init__(self, step: compiled.CompiledDecode) -> None:
        self.step = step
        self.package = step.package
        self.calls: list[tuple[int, int, int]] = []
        """(rows, cache length, rows being decoded) of each call."""

    def __call__(self, tokens, positions, mask, cache):
        # Padding rows are the ones at position 0 (a decoded row is past its prompt).
        self.calls.append((tokens.shape[0], mask.shape[1], int((positions > 0).sum())))
        return self.step(tokens, positions, mask, cache)


@pytest.fixture(scope="module")
def fp32_engine(smollm2_dir: Path, compile_cache: Path) -> Iterator[Engine]:
    engine = start_engine(smollm2_dir, **compiled_env(compile_cache))
    assert engine.backend.compiled is not None, engine.backend.shape.eager_reason
    engine.backend.compiled = Recorder(engine.backend.compiled)
    yield engine
    engine.generator.stop()


def run(engine: Engine, ids: list[int], n: int, **fields) -> list[int]:
    request = GenerationRequest(ids, max_new_tokens=n, **fields)
    tokens, _ = engine.generator.submit(request).result(timeout=300)
    return [t.token.id for t in tokens]


def test_compiled_greedy_equals_transformers_alone(
    fp32_engine: Engine, reference_model, tokenizer
) -> None:
    assert fp32_engine.backend.shape.compiled_step == "inductor (AOT), fused attention"
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        got = run(fp32_engine, ids, 24)
        want = reference_greedy(reference_model, ids, 24)
        if got != want:  # only a near tie may tell them apart
            assert_fp32_golden(reference_model, ids, got)


def test_sixteen_requests_through_four_slots(fp32_engine: Engine, reference_model, tokenizer):
    """16 requests of different lengths through 4 slots, each answer equal to `generate`,
    while every cache length from the shortest prompt to the longest answer goes by."""
    recorder: Recorder = fp32_engine.backend.compiled  # type: ignore[assignment]
    recorder.calls.clear()
    jobs = [
        (tokenizer(prompt).input_ids, 6 + 5 * i)
        for i, prompt in enumerate(PROMPTS + [p.upper() for p in PROMPTS])
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: run(fp32_engine, *job, ignore_eos=True), jobs))
    for (ids, n), got in zip(jobs, answers):
        assert len(got) == n
        assert_fp32_golden(reference_model, ids, got)
    lengths = [length for _, length, _ in recorder.calls]
    assert min(lengths) < 16 and max(lengths) > 90, (min(lengths), max(lengths))


def test_rows_join_and_leave_mid_request(fp32_engine: Engine, reference_model, tokenizer):
    """The batch-row bounds and padding: four requests start together and end one by one, so
    the step runs 4 rows, then 4 with an idle slot among them (a padding row), then fewer rows,
    then 1; a fifth joins a free slot meanwhile. Each answer equals `generate`."""
    recorder: Recorder = fp32_engine.backend.compiled  # type: ignore[assignment]
    recorder.calls.clear()
    generator = fp32_engine.generator
    jobs = [(tokenizer(PROMPTS[i]).input_ids, n) for i, n in enumerate((40, 30, 10, 20))]
    handles = [generator.submit(GenerationRequest(ids, n, ignore_eos=True)) for ids, n in jobs]
    shortest = handles[2].result(timeout=300)  # it ends first: a fifth request takes its slot
    late = (tokenizer(PROMPTS[5]).input_ids, 6)
    handles.append(generator.submit(GenerationRequest(*late, ignore_eos=True)))
    results = [shortest if i == 2 else h.result(timeout=300) for i, h in enumerate(handles)]
    answers = [[t.token.id for t in tokens] for tokens, _ in results]
    for (ids, n), got in zip([*jobs, late], answers):
        assert len(got) == n
        assert_fp32_golden(reference_model, ids, got)
    rows = [r for r, _, _ in recorder.calls]
    assert {1, 4} <= set(rows) and len(set(rows)) >= 3, rows
    assert any(decoded < r for r, _, decoded in recorder.calls), "no step with a padding row"


def test_a_request_to_the_last_cache_position(fp32_engine: Engine, reference_model, tokenizer):
    """The cache length's upper bound: a request that fills its row to the last position
    (prompt + answer = `MAX_TOTAL_TOKENS`), beside a short one that starts and ends meanwhile."""
    recorder: Recorder = fp32_engine.backend.compiled  # type: ignore[assignment]
    recorder.calls.clear()
    ids = tokenizer(" ".join(PROMPTS * 6)).input_ids[:440]
    n = 512 - len(ids)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(run, fp32_engine, ids, n, ignore_eos=True)
        short_ids = tokenizer(PROMPTS[0]).input_ids
        short = pool.submit(run, fp32_engine, short_ids, 8, ignore_eos=True)
        got, got_short = long.result(), short.result()
    assert len(got) == n
    assert_fp32_golden(reference_model, ids, got)
    assert_fp32_golden(reference_model, short_ids, got_short)
    # The last step feeds the token at position 510 over the 510 cached before it; its answer
    # is the 512th token, never fed back.
    assert max(length for _, length, _ in recorder.calls) == 510


def test_a_row_does_not_depend_on_its_batch_mates(fp32_engine: Engine) -> None:
    """A row's logits alone and among 2 to 4 rows of the compiled step agree within the fp32
    tie bound (the products' kernels differ between one row and several: up to 2e-3 seen), so
    a seeded sampled answer does not depend on its batch mates except where a draw falls that
    close to a boundary. (In bf16 they were equal to the bit on an AMX CPU; not asserted, since
    the kernels differ between CPU families.)"""
    step = fp32_engine.backend.compiled.step  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(fp32_engine.backend.kv.shape, generator=generator) * 0.5
    tokens = torch.randint(0, 49152, (4,), generator=generator)
    positions = torch.tensor([100, 57, 100, 80])
    cpu = torch.device("cpu")
    together, _ = step(tokens, positions, compiled.decode_mask(positions, 100, None, cpu), cache)
    for rows in (1, 2, 3):
        mask = compiled.decode_mask(positions[:rows], int(positions[:rows].max()), None, cpu)
        alone, _ = step(tokens[:rows], positions[:rows], mask, cache)
        assert (alone - together[:rows]).abs().max() < FP32_TIE


def test_prompts_starting_from_held_positions_answer_as_generate(
    fp32_engine: Engine, reference_model, tokenizer
) -> None:
    """Prefix reuse with the compiled step: a repeated prompt runs its last token as a row of a
    compiled decode step; the next turn of a conversation runs its new tokens over the held ones
    (`transformers`' forward writing the compiled step's cache). Answers equal `generate`."""
    recorder: Recorder = fp32_engine.backend.compiled  # type: ignore[assignment]
    generator = fp32_engine.generator
    ids = tokenizer(PROMPTS[4]).input_ids
    first = run(fp32_engine, ids, 10, ignore_eos=True)
    assert_fp32_golden(reference_model, ids, first)
    before, calls = generator.reused_tokens, len(recorder.calls)
    assert run(fp32_engine, ids, 10, ignore_eos=True) == first
    assert generator.reused_tokens - before == len(ids) - 1
    assert len(recorder.calls) - calls == 10  # the prompt's last token, then 9 decode steps
    turn = ids + first + tokenizer(" Why?").input_ids
    before = generator.reused_tokens
    got = run(fp32_engine, turn, 12, ignore_eos=True)
    assert generator.reused_tokens - before == len(ids) + len(first) - 1
    assert_fp32_golden(reference_model, turn, got)


def test_a_prompt_held_by_a_running_row_joins_its_decode_step(
    fp32_engine: Engine, reference_model, tokenizer
) -> None:
    """A prompt that a running request's row holds (but its last token) copies the held
    positions and runs its last token as a row of the running request's compiled decode step.
    Both answers equal `generate`."""
    recorder: Recorder = fp32_engine.backend.compiled  # type: ignore[assignment]
    generator = fp32_engine.generator
    ids = tokenizer(PROMPTS[3] + " " + PROMPTS[1]).input_ids
    running = generator.submit(GenerationRequest(ids, 30, ignore_eos=True))
    events = running.events(timeout=300)
    started = [next(events) for _ in range(3)]  # running: its row holds the prompt
    before, calls = generator.reused_tokens, len(recorder.calls)
    joining = run(fp32_engine, ids, 8, ignore_eos=True)
    rest, _ = collect(events, GenerationError("unfinished"))
    first = [e.token.id for e in started + rest]  # type: ignore[union-attr]
    assert generator.reused_tokens - before == len(ids) - 1
    assert_fp32_golden(reference_model, ids, first)
    assert_fp32_golden(reference_model, ids, joining)
    # The joining request's 8 tokens came from 8 steps shared with the running request.
    assert sum(decoded == 2 for _, _, decoded in recorder.calls[calls:]) == 8


def test_a_prompt_comes_back_from_a_prefix_row_of_the_compiled_cache(
    fp32_engine: Engine, reference_model, tokenizer
) -> None:
    """The prefix rows with the compiled step's cache: a prompt parked there while another
    takes its slot comes back as one compiled step, with the answer of `generate`."""
    generator = fp32_engine.generator
    a, b = (tokenizer(PROMPTS[i] + " " + PROMPTS[i - 1]).input_ids for i in (2, 6))
    first = run(fp32_engine, a, 8, ignore_eos=True)
    run(fp32_engine, b, 8, ignore_eos=True)
    assert any(held[: len(a)] == a for held in generator._held[4:]), "a was not parked"
    before = generator.reused_tokens
    assert run(fp32_engine, a, 8, ignore_eos=True) == first
    assert generator.reused_tokens - before == len(a) - 1
    assert_fp32_golden(reference_model, a, first)


def test_the_package_weights_are_held_once(fp32_engine: Engine) -> None:
    """Loading copies the package's weights out of its library into tensors; the library's
    pages that held them (as large as the weights: 538 MB in fp32) are dropped, and stay out
    while the step runs."""
    step = fp32_engine.backend.compiled.step  # type: ignore[union-attr]
    assert step.libraries and step.released > 400 * 2**20
    run(fp32_engine, [1, 2, 3, 4], 4)
    resident = 0
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:
            mapping = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and mapping in step.libraries:
            resident += int(fields[1]) * 1024
    assert resident < 64 * 2**20, resident


def test_loading_leaves_no_extracted_copy_behind(fp32_engine: Engine) -> None:
    """The loader extracts the package into the temporary directory; that copy is deleted once
    its library is mapped (a process that never destroys the loader left it behind), and the
    step still runs."""
    step = fp32_engine.backend.compiled.step  # type: ignore[union-attr]
    assert step.libraries
    for library in step.libraries:
        extracted = [p for p in Path(library).parents if p.name.startswith("aotinductor_")]
        assert extracted and not extracted[0].exists(), library
    assert len(run(fp32_engine, [1, 2, 3, 4], 4)) == 4


def test_compiled_bf16_follows_the_margin_rule(
    smollm2_dir: Path, compile_cache: Path, reference_model, tokenizer
) -> None:
    """bf16 through the compiled step, alone and 8 at once through 4 slots, against the fp32
    reference by the margin rule of the reduced-precision tests; the cache is kept in bf16."""
    engine = start_engine(smollm2_dir, **compiled_env(compile_cache, HF_AUTO_CAST_TYPE="bf16"))
    try:
        backend = engine.backend
        assert backend.shape.compiled_step is not None, backend.shape.eager_reason
        assert backend.shape.kv_cache_dtype == "bfloat16"
        assert backend.kv.dtype == backend.cache.keys[0].dtype == torch.bfloat16
        prompts = [tokenizer(p).input_ids for p in PROMPTS]
        for ids in prompts:
            assert_margin_rule(reference_model, ids, run(engine, ids, 32), BF16_STEPS)
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda ids: run(engine, ids, 32), prompts))
        for ids, got in zip(prompts, together):
            assert_margin_rule(reference_model, ids, got, BF16_STEPS)
    finally:
        engine.generator.stop()


def test_a_restart_loads_the_package_without_building(
    smollm2_dir: Path, compile_cache: Path, fp32_engine: Engine
) -> None:
    spec = compiled.PackageSpec(str(smollm2_dir.resolve()), "fp32", "cpu", 4, 512, None, "fused")
    prepared = compiled.prepare(spec, compile_cache, fp32_engine.backend.model.config)
    assert prepared.step is not None and prepared.reason is None
    assert prepared.built_seconds is None
    # Another shape is another package.
    other = compiled.PackageSpec(str(smollm2_dir.resolve()), "fp32", "cpu", 8, 512)
    assert other.key() != spec.key()


def test_a_failed_compile_falls_back_and_says_why(
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reference_model,
    tokenizer,
) -> None:
    def broken(spec, directory, package, ops):
        raise RuntimeError("the compiler is broken")

    monkeypatch.setattr(compiled, "_build_in_child", broken)
    engine = start_engine(smollm2_dir, **compiled_env(tmp_path))
    try:
        shape = engine.backend.shape
        assert shape.compiled_step is None and engine.backend.compiled is None
        assert "the compiler is broken" in (shape.eager_reason or "")
        assert "decode runs eagerly" in caplog.text
        ids = tokenizer(PROMPTS[1]).input_ids
        assert run(engine, ids, 16) == reference_greedy(reference_model, ids, 16)
    finally:
        engine.generator.stop()


def test_loading_reports_the_compiling_stage(smollm2_dir: Path, compile_cache: Path) -> None:
    """`/health` shows each stage `load_engine` reports; the compile is one of them."""
    environ = {"HF_MODEL_ID": str(smollm2_dir), "MAX_BATCH_SIZE": "4", "MAX_TOTAL_TOKENS": "512"}
    settings = read_settings([], {**environ, **compiled_env(compile_cache)})
    stages: list[str] = []
    engine = engine_module.load_engine(settings, stages.append)
    try:
        assert stages == ["downloading", "loading", "compiling", "warming_up"]
        assert engine.backend.shape.compiled_step is not None
    finally:
        engine.generator.stop()


def test_the_server_says_which_step_it_runs(
    smollm2_dir: Path, compile_cache: Path, tmp_path: Path, server, golden
) -> None:
    """`/info` names the compiled step, or why there is none (the shared test server runs
    with `TORCH_COMPILE=false`)."""
    info = requests.get(f"{server.url}/info", timeout=10).json()
    assert info["compiled_step"] is None and "TORCH_COMPILE=false" in info["eager_reason"]
    running = launch_server(smollm2_dir, tmp_path, **compiled_env(compile_cache))
    try:
        info = requests.get(f"{running.url}/info", timeout=10).json()
        assert info["compiled_step"] == "inductor (AOT), fused attention"
        assert info["eager_reason"] is None
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12}}
        answer = requests.post(f"{running.url}/generate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.text)["generated_text"] == golden(PROMPTS[0], 12)
    finally:
        assert running.stop() == 0, running.log()
