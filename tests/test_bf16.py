"""Reduced precision on CPU: the bf16 torch backend against `transformers` in bf16."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from handler import engine as engine_module
from handler.config import read_settings
from handler.engine import Engine
from handler.generation.request import GenerationRequest
from tests.conftest import PROMPTS, reference_greedy, start_engine

BF16_STEPS = 4
"""Batched bf16 answers were seen at most 2 bf16 steps from the reference's best token (48
answers of 32 tokens); twice that is the bound."""


@pytest.fixture(scope="module")
def bf16_engine(smollm2_dir: Path):
    engine = start_engine(smollm2_dir, HF_AUTO_CAST_TYPE="bf16")
    yield engine
    engine.generator.stop()


@pytest.fixture(scope="module")
def bf16_reference(smollm2_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).eval()


def greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    tokens, _ = engine.generator.submit(GenerationRequest(ids, max_new_tokens=n)).result(120)
    return [t.token.id for t in tokens]


def test_bf16_matches_transformers_bf16_alone_and_in_a_batch(
    bf16_engine: Engine, bf16_reference, tokenizer
) -> None:
    """Alone, every greedy token equals `transformers` in bf16. In a batch the prompts are
    packed and rows share matrix products, which rounds differently in bf16 (as a batched
    `generate` does): there each chosen token must be the reference's best choice given the same
    prefix, or lie within `BF16_STEPS` bf16 steps of it (logits of 16 to 32 are 1/8 apart in
    bf16). A wrong row or position would miss by whole nats."""
    assert bf16_engine.backend.shape.dtype == "bfloat16"
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    expected = [reference_greedy(bf16_reference, ids, 32) for ids in prompts]
    assert [greedy(bf16_engine, ids, 32) for ids in prompts] == expected
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda ids: greedy(bf16_engine, ids, 32), prompts))
    exact = 0
    for ids, got, want in zip(prompts, together, expected):
        exact += got == want  # (a batched answer may also stop early on a tied EOS)
        with torch.inference_mode():
            logits = bf16_reference(torch.tensor([ids + got])).logits[0, len(ids) - 1 : -1]
        logits = logits.float()  # [len(got), vocab]: the reference's logits given our prefix
        best = logits.max(-1).values
        shortfall = best - logits.gather(1, torch.tensor(got)[:, None])[:, 0]
        step = torch.finfo(torch.bfloat16).eps * 2 ** torch.floor(torch.log2(best.abs()))
        assert bool((shortfall <= BF16_STEPS * step).all()), (
            tokenizer.decode(ids),
            (shortfall / step).max(),
        )
    assert exact >= len(prompts) // 2, f"only {exact} of {len(prompts)} batched answers are exact"
    # The CPU cache holds the bf16 states exactly in fp32, for the fp32 decode attention.
    cache = bf16_engine.backend.cache
    assert bf16_engine.backend.shape.kv_cache_dtype == "float32"
    assert cache.keys[0].dtype == cache.values[-1].dtype == torch.float32


@pytest.mark.parametrize(
    ("configured", "device", "native", "expected"),
    [
        (None, "cpu", True, "bf16"),
        (None, "cpu", False, "fp32"),
        (None, "cuda", False, "bf16"),
        ("fp32", "cpu", True, "fp32"),
        ("fp16", "cuda", True, "fp16"),
    ],
)
def test_default_dtype_follows_the_hardware(
    monkeypatch: pytest.MonkeyPatch, configured, device, native, expected
) -> None:
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native)
    environ = {"HF_AUTO_CAST_TYPE": configured} if configured else {}
    assert engine_module.torch_dtype(read_settings([], environ), device) == expected


def test_native_bf16_detection_agrees_with_the_cpu_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(cpuinfo.read_text().split())
    assert engine_module.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)
