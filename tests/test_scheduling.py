"""Admission policy: prefills, which pause every stream, are batched as TGI's router does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.config import read_settings
from handler.engine import Engine, build_torch_engine
from handler.errors import GenerationError
from handler.generation.request import GenerationRequest, TokenEvent
from handler.model.params import SamplingParams
from tests.conftest import PROMPTS


class Steps:
    """Records `(method, batch_size)` of every model step."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, method: str, batch_size: int, seconds: float) -> None:
        with self.lock:
            self.log.append((method, batch_size))

    def decodes_since_last_prefill(self) -> int:
        with self.lock:
            methods = [m for m, _ in self.log]
        last = len(methods) - 1 - methods[::-1].index("prefill")
        return methods[last + 1 :].count("decode")


@pytest.fixture
def engine_with(smollm2_dir: Path) -> Iterator:
    engines: list[Engine] = []

    def build(**env: str) -> tuple[Engine, Steps]:
        steps = Steps()
        # Eager: the decisions are the same over either step (tests/test_compiled.py covers the
        # compiled one), and an eager engine needs no package of its own to be built.
        environ = {
            "MAX_BATCH_SIZE": "4",
            "MAX_TOTAL_TOKENS": "256",
            "HF_AUTO_CAST_TYPE": "fp32",
            "TORCH_COMPILE": "false",
        }
        settings = read_settings([], {**environ, **env})
        engine = build_torch_engine(settings, smollm2_dir, on_step=steps)
        engines.append(engine)
        return engine, steps

    yield build
    for engine in engines:
        engine.generator.stop()


def start_running(engine: Engine, n: int) -> list:
    """Two requests prefilled together: submitted while holding the scheduler's lock (a
    reentrant lock), so that it cannot admit the first before the second arrives."""
    with engine.generator._cond:
        handles = [engine.generator.submit(request(engine, p, n)) for p in PROMPTS[:2]]
    for handle in handles:
        first_token(handle)
    return handles


def request(engine: Engine, prompt: str, n: int) -> GenerationRequest:
    return GenerationRequest(engine.tokenizer(prompt).input_ids, max_new_tokens=n, ignore_eos=True)


def first_token(handle) -> None:
    assert isinstance(next(handle.events(timeout=60)), TokenEvent)


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_lone_arrival_waits_to_be_prefilled_with_another(engine_with) -> None:
    engine, steps = engine_with(MAX_WAITING_TOKENS="1000", WAITING_SERVED_RATIO="1.0")
    running = start_running(engine, 60)
    lone = engine.generator.submit(request(engine, PROMPTS[2], 4))
    wait_for(lambda: steps.decodes_since_last_prefill() >= 8)
    assert engine.generator.queue_size == 1  # 2 running x ratio 1.0: it needs a partner
    partner = engine.generator.submit(request(engine, PROMPTS[3], 4))
    lone.result(timeout=60)
    partner.result(timeout=60)
    prefills = [size for method, size in steps.log if method == "prefill"]
    assert prefills == [2, 2]  # the two running ones together, then the two arrivals together
    for handle in running:
        handle.cancel()


def test_nothing_is_held_when_nothing_runs_or_the_ratio_is_zero(engine_with) -> None:
    engine, steps = engine_with(MAX_WAITING_TOKENS="1000", WAITING_SERVED_RATIO="0")
    running = start_running(engine, 40)
    arrival = engine.generator.submit(request(engine, PROMPTS[2], 2))
    arrival.result(timeout=60)
    assert [size for method, size in steps.log if method == "prefill"] == [2, 1]
    for handle in running:
        handle.cancel()


def test_a_request_that_cannot_start_fails_alone(engine_with, monkeypatch) -> None:
    engine, _ = engine_with()
    real = engine.backend.assign

    def assign(slot: int, params) -> None:
        if params.seed == 666:
            raise OverflowError("injected")
        real(slot, params)

    monkeypatch.setattr(engine.backend, "assign", assign)
    bad = request(engine, PROMPTS[0], 4)
    bad.params = SamplingParams(do_sample=True, seed=666)
    with pytest.raises(GenerationError, match="could not start"):
        engine.generator.submit(bad).result(timeout=60)
    assert engine.generator.healthy and engine.generator.in_flight == 0
    _, final = engine.generator.submit(request(engine, PROMPTS[1], 3)).result(timeout=60)
    assert final.generated_tokens == 3
