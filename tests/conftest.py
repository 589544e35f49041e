"""Shared fixtures: the bundled SmolLM2 model, a reference `transformers` model, engines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from handler.config import read_settings
from handler.engine import Engine, build_torch_engine
from handler.model import compiled, cpu_ops
from handler.model.threads import release_pool
from handler.testing.smollm2 import ensure_model
from tests.tiny_models import TINY_ENGINE, tiny_model

# Golden answers come from the fp32 `transformers` model: servers and engines of the tests run in
# fp32 unless a test names another dtype (a bf16-capable CPU would otherwise default to bf16,
# which tests/test_bf16.py checks against a bf16 reference). Subprocesses inherit this.
os.environ["HF_AUTO_CAST_TYPE"] = "fp32"
# The compiled decode step takes a minute or more to build per model, dtype and shape: the tests
# run `transformers`' step unless they ask for the compiled one (tests/test_compiled.py and the
# architecture tests build a few packages once per machine, in `compile_cache`).
os.environ["TORCH_COMPILE"] = "false"

TINY_COMPILED = ("qwen2", "mistral", "llama")
"""The tiny models the architecture tests run through the compiled step (GPT-2 falls back)."""

PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog and then",
    "1, 2, 3, 4,",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a five year old child in simple words, please:",
    "def fibonacci(n):",
    "日本の首都は",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reference_model(smollm2_dir: Path) -> AutoModelForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa").eval()
    release_pool()  # see `reference_run`
    return model


@contextmanager
def reference_run() -> Iterator[None]:
    """Run the reference model on this thread, then free this thread's OpenMP pool: engines'
    scheduler threads run in this process, and while a second pool exists every parallel region
    of their steps puts its workers to sleep and wakes them (handler/model/threads.py). Without
    it, 8 compiled answers of 24 tokens between references took 9.5 s instead of 5.5 s."""
    try:
        with torch.inference_mode():
            yield
    finally:
        release_pool()


ENGINE = {"MAX_BATCH_SIZE": "4", "MAX_TOTAL_TOKENS": "512"}
"""The shape of `start_engine`'s engines (and of the SmolLM2 packages `compile_cache` builds)."""


def start_engine(model_dir: Path, **env: str) -> Engine:
    environ = {
        **ENGINE,
        "HF_AUTO_CAST_TYPE": "fp32",
        "TORCH_COMPILE": "false",
        **env,
    }
    engine = build_torch_engine(read_settings([], environ), model_dir)
    release_pool()  # as `load_engine` does: the loading thread's pool would slow the steps
    return engine


@pytest.fixture(scope="session")
def compile_cache(smollm2_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Compiled decode steps of the tests, kept between runs on this machine (next to the
    converted SmolLM2): a package is rebuilt only when its key changes. Every package the suite's
    engines load is built here first, two at a time: a build is mostly one core's work, and a
    machine without them (CI's) spent 200 s building them one by one."""
    path = Path.home() / ".cache" / "hf-neuron-serving" / "compiled-steps"
    path.mkdir(parents=True, exist_ok=True)
    cpu_ops.ensure(path)  # once, before the threads: its load registers an operator
    models = {name: tiny_model(path.parent, name, tokenizer) for name in TINY_COMPILED}
    packages = [(smollm2_dir, "fp32", None), (smollm2_dir, "bf16", None)]
    packages += [(directory, "fp32", None) for directory in models.values()]
    int8 = tiny_model(path.parent, "llama", tokenizer, name="llama-int8")
    packages.append((int8, "fp32", "int8"))

    def build(model: Path, dtype: str, quantize: str | None) -> None:
        shape = ENGINE if model == smollm2_dir else TINY_ENGINE
        slots, positions = int(shape["MAX_BATCH_SIZE"]), int(shape["MAX_TOTAL_TOKENS"])
        spec = compiled.PackageSpec(
            str(model.resolve()), dtype, "cpu", slots, positions, quantize, "fused"
        )
        compiled.package_for(spec, path, AutoConfig.from_pretrained(model))

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(build, *package) for package in packages]:
            future.result()
    return path


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Iterator[Engine]:
    """A running generator with 4 slots of 512 tokens on SmolLM2."""
    running = start_engine(smollm2_dir)
    yield running
    running.generator.stop()


@dataclass(frozen=True)
class Reference:
    """A greedy answer `reference_greedy` computed."""

    tokens: list[int]
    asked: int
    """The `max_new_tokens` it was generated for (fewer tokens: the model's EOS came first)."""

    def serves(self, max_new_tokens: int) -> bool:
        return max_new_tokens <= self.asked or len(self.tokens) < self.asked


_REFERENCE_ANSWERS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, ...], Reference]]
_REFERENCE_ANSWERS = weakref.WeakKeyDictionary()
"""The answers of `reference_greedy`, per model and prompt, for the session (62 of the suite's
129 calls ask for one already computed)."""


def reference_greedy(
    model: AutoModelForCausalLM, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """`transformers` greedy generation for one prompt alone (stops at the model's EOS).

    Kept for the session (many tests ask for the same prompts): a greedy answer of n tokens is
    the first n of a longer one, as `generate` runs the same forwards until it stops, so a
    shorter request is served from a longer answer of the same model."""
    answers = _REFERENCE_ANSWERS.setdefault(model, {})
    known = answers.get(tuple(prompt_ids))
    if known is not None and known.serves(max_new_tokens):
        return known.tokens[:max_new_tokens]
    with reference_run():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
    tokens = output[0, len(prompt_ids) :].tolist()
    answers[tuple(prompt_ids)] = Reference(tokens, max_new_tokens)
    return list(tokens)


def margin_shortfalls(
    model: AutoModelForCausalLM, prompt_ids: list[int], chosen: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each chosen token falls short of the reference's best choice given the same
    prefix, and one rounding step of `dtype` at that logit's magnitude.

    The reference runs once over `prompt + chosen` (teacher forcing), so a divergence early on
    does not make every later token look wrong. Returns `[len(chosen)]` float32 shortfalls (0
    where the chosen token is the reference's argmax) and `[len(chosen)]` steps.
    """
    with reference_run():
        logits = model(torch.tensor([prompt_ids + chosen])).logits[0, len(prompt_ids) - 1 : -1]
    logits = logits.float()  # [len(chosen), vocab]
    best = logits.max(-1).values
    shortfall = best - logits.gather(1, torch.tensor(chosen)[:, None])[:, 0]
    step = torch.finfo(dtype).eps * 2 ** torch.floor(torch.log2(best.abs().clamp(min=1e-6)))
    return shortfall, step


def assert_margin_rule(
    reference: AutoModelForCausalLM,
    prompt_ids: list[int],
    chosen: list[int],
    steps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """The golden rule for reduced precision. Matrix products in bf16 round differently from
    one CPU family to another (AMX and AVX-512 kernels) and from one batch shape to another, so
    exact equality with `transformers` in bf16 is a property of one machine, not of the code.
    Instead, against the fp32 `reference`: where its top-2 margin exceeds `steps` rounding steps
    of `dtype` (at the logit's magnitude), the chosen token must be its best; elsewhere the
    chosen token must lie within that margin of the best. (Equivalently: no chosen token falls
    more than `steps` steps short of the best.) A wrong row or position misses by whole nats."""
    assert chosen, "no tokens to check"
    shortfall, step = margin_shortfalls(reference, prompt_ids, chosen, dtype)
    worst = int((shortfall / step).argmax())
    assert bool((shortfall <= steps * step).all()), (
        f"token {worst} ({chosen[worst]}) is {float(shortfall[worst]):.4f} below the "
        f"reference's best ({float(shortfall[worst] / step[worst]):.1f} steps; bound {steps})"
    )


# --- the real server ---------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A `python -m handler serve` process (gunicorn) on a free local port."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or slow to answer while it compiles
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(
    model_dir: Path, log_dir: Path, *args: str, wait: bool = True, **env: str
) -> RunningServer:
    """Start the server on SmolLM2 (4 slots of 512 tokens unless `env` says otherwise)."""
    port = free_port()
    environ = {
        **os.environ,
        **ENGINE,
        "SHUTDOWN_GRACE_SECONDS": "10",
        **env,
    }
    log_path = log_dir / f"server-{port}.log"
    command = [sys.executable, "-m", "handler", "serve", "--model-id", str(model_dir)]
    command += ["--hostname", "127.0.0.1", "--port", str(port), *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    if wait:
        server.wait_ready()
    return server


@pytest.fixture(scope="session")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server shared by the end-to-end tests that leave it as they found it."""
    running = launch_server(smollm2_dir, tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="session")
def golden(reference_model: AutoModelForCausalLM, tokenizer: PreTrainedTokenizerBase):
    """`golden(prompt, n)`: the text `transformers` greedy `generate` gives for `prompt`."""
    cache: dict[tuple[str, int], str] = {}

    def answer(prompt: str, max_new_tokens: int) -> str:
        key = (prompt, max_new_tokens)
        if key not in cache:
            ids = tokenizer(prompt).input_ids
            out = reference_greedy(reference_model, ids, max_new_tokens)
            # The server drops a final incomplete character instead of printing U+FFFD.
            cache[key] = tokenizer.decode(out, skip_special_tokens=True).rstrip("\ufffd")
        return cache[key]

    return answer


FP32_TIE = 0.01
"""In fp32 a chosen token may differ from the reference's best only where the reference's top-2
margin is below this (a near tie that any change of summation order can flip)."""


def assert_fp32_golden(reference, ids: list[int], got: list[int]) -> None:
    """Teacher-forced against the fp32 reference: every chosen token is its best, except at a
    near tie (top-2 margin below `FP32_TIE`), where it is one of the two."""
    with reference_run():
        logits = reference(torch.tensor([ids + got])).logits[0, len(ids) - 1 : -1].float()
    top = logits.topk(2, dim=-1)
    for step, token in enumerate(got):
        best, second = top.values[step].tolist()
        if token == int(top.indices[step, 0]):
            continue
        assert best - second < FP32_TIE and token == int(top.indices[step, 1]), (
            f"step {step}: chose {token}, reference best {int(top.indices[step, 0])} "
            f"by a margin of {best - second:.4f}"
        )
