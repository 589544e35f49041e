"""One OpenMP team per process (`handler/model/threads.py`): a thread that is done with the model
frees its pool, a helper thread runs torch's operators without one, and the engine's loader lets
go of its pool once the scheduler thread has the model."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from handler.model import threads

pytestmark = pytest.mark.skipif(
    threads._libgomp() is None, reason="torch's CPU operators do not run on libgomp here"
)

BIG = 1 << 20
"""Elements of an operator that torch runs as a parallel region (above its grain size)."""


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _in_thread(work: Callable[[], Any]) -> Any:
    """Run `work` on a fresh thread that lives until it returns; its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join()
    return out[0]


def test_a_thread_that_releases_its_pool_leaves_no_workers_behind() -> None:
    """A parallel operator gives the thread a pool (one worker per extra core); `release_pool`
    ends those workers while the thread lives on."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: torch runs no parallel regions")

    def work() -> tuple[int, int, int]:
        before = _tasks()
        torch.zeros(BIG).add_(1)
        with_pool = _tasks()
        assert threads.release_pool()
        return before, with_pool, _tasks()

    before, with_pool, after = _in_thread(work)
    assert with_pool == before + torch.get_num_threads() - 1
    assert after == before


def test_a_serial_helper_runs_operators_on_itself_alone() -> None:
    def work() -> tuple[int, int, int, torch.Tensor]:
        threads.serial_helper()
        before = _tasks()
        total = torch.ones(BIG).sum()
        lib = threads._libgomp()
        assert lib is not None
        return before, _tasks(), lib.omp_get_max_threads(), total

    before, after, omp_threads, total = _in_thread(work)
    assert omp_threads == 1
    assert after == before
    assert total.item() == BIG
    assert torch.get_num_threads() > 1 or os.cpu_count() == 1  # the process's count is untouched


def test_the_grammar_mask_helper_is_serial(tokenizer) -> None:
    """The thread computing grammar masks beside the step has no pool of its own."""
    from handler.generation.grammar import GrammarCompiler
    from handler.generation.sampling import TokenSelector
    from handler.model.params import SamplingParams

    vocab = len(tokenizer)
    selector = TokenSelector(1, vocab)
    constraint = GrammarCompiler(tokenizer, vocab).choice(["yes", "no"], "choice")
    selector.assign(0, SamplingParams(), [1, 2], frozenset({tokenizer.eos_token_id}), constraint)
    selector.prepare([0])
    selector.select(torch.randn(1, vocab), [0])
    assert selector._masker is not None
    lib = threads._libgomp()
    assert lib is not None
    assert selector._masker.submit(lib.omp_get_max_threads).result() == 1


def test_loading_an_engine_releases_the_loading_threads_pool(monkeypatch) -> None:
    """`load_engine` frees the pool of the thread that loaded the model, after the warm-up."""
    from handler import engine as engine_module

    calls: list[str] = []
    monkeypatch.setattr(engine_module, "release_pool", lambda: calls.append("released"))
    model = type("M", (), {"path": "model", "model_id": "model", "revision": None})
    monkeypatch.setattr(engine_module, "resolve_model", lambda settings: model)
    monkeypatch.setattr(
        engine_module, "choose_backend", lambda settings: type("C", (), {"name": "torch"})
    )
    monkeypatch.setattr(engine_module, "build_torch_engine", lambda *a, **k: "engine")
    monkeypatch.setattr(engine_module, "warm_up", lambda engine: calls.append("warmed"))
    stages: list[str] = []
    assert engine_module.load_engine(object(), stages.append) == "engine"  # type: ignore[arg-type]
    assert calls == ["warmed", "released"]
