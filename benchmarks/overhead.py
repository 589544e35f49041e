"""The scheduler's host time per decode step: everything in a step but the model's forward.

On Neuron a decode step is one compiled graph call; the rest of the step is ours: planning,
token selection, detokenization, stop checks and events. This benchmark runs the real
`Generator` against a backend whose forward costs nothing, so that a step's time is that rest.

Run from the repository root (`make bench-overhead`):

    python -m benchmarks.overhead --out benchmarks/results/overhead.json --readme README.md

The backend (`instant_backend`, a `ScriptedBackend` given the logits) returns views of precomputed
random float32 logits. Each configuration (batch 8, 32, 128; vocabulary 49,152 with SmolLM2's
tokenizer and 128,256 with a synthetic tokenizer of that size; greedy, and sampled with temperature
0.7, top-p 0.9, top-k 50 and a seed per request) starts one thread per request that submits it (all
at once, behind a barrier) and reads its events as the server's streaming routes do
(`RequestHandle.poll`). Every request has `ignore_eos` and the same `max_new_tokens`, so every row
runs the same steps. A step's host time is the interval between two consecutive `on_step` callbacks
of decode steps over the whole batch (all requests admitted): one loop of the scheduler thread,
from a step's token selection to the next one's, events and detokenization included. The `select`
column is the callback's own seconds (`TokenSelector.prepare`, the forward and
`TokenSelector.select`). Each row is the best of `--runs` batches (the lowest median step), started
once the machine is quiet: on shared cores another process's work shows up as our overhead.

With `--breakdown` (on by default for the judged configurations) the judged runs are repeated
with timers around the generator's parts, and once more with the events read after the run
instead of by a thread per request, to show what the consumer threads cost the scheduler.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from benchmarks.machine import machine
from benchmarks.report import publish, table_head
from benchmarks.structured import synthetic_tokenizer
from handler.api.submission import POLL_SECONDS
from handler.generation.detokenize import IncrementalDetokenizer
from handler.generation.generator import Generator, eos_token_ids
from handler.generation.request import (
    ErrorEvent,
    FinalEvent,
    GenerationRequest,
    RequestHandle,
    TokenEvent,
)
from handler.generation.sampling import TokenSelector
from handler.generation.slots import Slot
from handler.generation.stopping import StoppingCriteria
from handler.model.params import SamplingParams
from handler.testing.scripted import ScriptedBackend
from handler.testing.smollm2 import ensure_model

BATCHES = (8, 32, 128)
VOCABS = (49_152, 128_256)
MODES = ("greedy", "sampled")
UNLOGGED = ("greedy, no logprobs", "sampled, no logprobs")
"""Measured at the judged batch and vocabulary only: requests that ask for no log-probabilities
(OpenAI's default), whose rows skip the normaliser."""
TARGETS_MS = {"greedy": 1.0, "sampled": 3.0}
"""Host milliseconds per step at the judged batch and vocabulary."""
JUDGED = (32, 128_256)
"""(batch, vocabulary) the targets apply to."""
SEQUENCE_LENGTH = 2048
SPARE_ROWS = 15
"""Logits rows beyond the batch: each step returns the batch's rows from another offset."""
QUIET_PRESSURE = 0.1
QUIET_PROBE_S = 2.0
QUIET_WAIT_S = 30.0
"""Before each row, wait up to `QUIET_WAIT_S` for a probe of `QUIET_PROBE_S` in which tasks
waited for a CPU less than `QUIET_PRESSURE` of the time: on shared cores, another process's
work shows up as our overhead."""
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def instant_backend(batch_size: int, vocab_size: int) -> ScriptedBackend:
    """A backend whose forward costs nothing: it returns precomputed logits.

    The logits are `[batch_size + SPARE_ROWS, vocab]` random normal float32 values; each call
    returns the `[n, vocab]` rows from the next offset, a view. `TokenSelector.select` edits
    logits in place only where a request has a `logit_bias`, `min_tokens` or penalties, and
    undoes each edit before it returns, so the stored rows stay as they were."""
    stored = torch.randn(
        batch_size + SPARE_ROWS, vocab_size, generator=torch.Generator().manual_seed(0)
    )
    calls = itertools.count()

    def logits(slots: list[int]) -> torch.Tensor:
        offset = next(calls) % (SPARE_ROWS + 1)
        return stored[offset : offset + len(slots)]

    return ScriptedBackend(
        batch_size, SEQUENCE_LENGTH, vocab_size, logits=logits, prompt_logprobs=False
    )


@dataclass(frozen=True)
class Setup:
    """One configuration to measure: `runs` batches of `batch` requests of `max_new_tokens`."""

    tokenizer: PreTrainedTokenizerBase
    vocab: int
    batch: int
    mode: str
    max_new_tokens: int
    runs: int


@dataclass
class StepLog:
    """The generator's `on_step` callback: (method, batch size, seconds, when) per step."""

    steps: list[tuple[str, int, float, float]] = field(default_factory=list)

    def __call__(self, method: str, batch_size: int, seconds: float) -> None:
        self.steps.append((method, batch_size, seconds, time.perf_counter()))

    def full_batch(self, batch: int) -> tuple[list[float], list[float]]:
        """Seconds between consecutive decode steps over the whole batch, and those steps'
        `on_step` seconds."""
        decodes = [(s, at) for method, n, s, at in self.steps if method == "decode" and n == batch]
        intervals = [b[1] - a[1] for a, b in itertools.pairwise(decodes)]
        return intervals, [s for s, _ in decodes]


def params(mode: str, seed: int) -> SamplingParams:
    logprobs = not mode.endswith("no logprobs")
    if mode.startswith("greedy"):
        return SamplingParams(logprobs=logprobs)
    return SamplingParams(
        do_sample=True, temperature=0.7, top_p=0.9, top_k=50, seed=seed, logprobs=logprobs
    )


def consume(handle: RequestHandle, tokens: list[int], finals: list[FinalEvent]) -> None:
    """Read a request's events as a streaming route does, keeping what the route would send."""
    pieces: list[str] = []
    while True:
        event = handle.poll(POLL_SECONDS)
        if event is None:
            continue
        if isinstance(event, TokenEvent):
            pieces.append(event.token.text)
            continue
        if isinstance(event, ErrorEvent):
            raise event.error
        assert isinstance(event, FinalEvent)
        tokens.append(len(pieces))
        finals.append(event)
        return


def run_batch(
    generator: Generator,
    log: StepLog,
    prompt_ids: list[int],
    mode: str,
    max_new_tokens: int,
    streaming: bool = True,
) -> tuple[list[float], list[float]]:
    """One batch filling every slot; returns the full-batch step intervals and `on_step`
    seconds. With `streaming`, a thread per request submits it and reads its events; else the
    requests are submitted from here and their events read after they end."""
    batch = len(generator.slots)
    log.steps.clear()
    requests = [
        GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            params=params(mode, seed),
            ignore_eos=True,
        )
        for seed in range(batch)
    ]
    tokens: list[int] = []
    finals: list[FinalEvent] = []
    if streaming:
        barrier = threading.Barrier(batch)

        def client(request: GenerationRequest) -> None:
            barrier.wait()
            consume(generator.submit(request), tokens, finals)

        threads = [threading.Thread(target=client, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        handles = [generator.submit(r) for r in requests]
        while generator.in_flight:
            time.sleep(0.01)
        for handle in handles:
            consume(handle, tokens, finals)
    assert tokens == [max_new_tokens] * batch, tokens
    assert all(f.generated_tokens == max_new_tokens for f in finals)
    return log.full_batch(batch)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_pressure_us() -> float | None:
    """Microseconds so far in which some runnable task waited for a CPU, machine-wide (Linux
    PSI): it grows while anything, in this container or beside it, competes for the cores."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return float(line.rsplit("total=", 1)[1])


def wait_for_quiet(limit_s: float = QUIET_WAIT_S) -> float | None:
    """Wait until the CPU pressure over `QUIET_PROBE_S` is under `QUIET_PRESSURE`, for up to
    `limit_s` seconds; return the last pressure seen (None without PSI)."""
    deadline = time.monotonic() + limit_s
    while True:
        before = cpu_pressure_us()
        time.sleep(QUIET_PROBE_S)
        after = cpu_pressure_us()
        if before is None or after is None:
            return None
        share = (after - before) / 1e6 / QUIET_PROBE_S
        if share < QUIET_PRESSURE or time.monotonic() >= deadline:
            return share


@contextmanager
def running(
    tokenizer: PreTrainedTokenizerBase, vocab: int, batch: int
) -> Iterator[tuple[Generator, StepLog]]:
    """A started generator over an `instant_backend` of `batch` slots, and its step log."""
    log = StepLog()
    generator = Generator(
        instant_backend(batch, vocab),
        tokenizer,
        eos_token_ids=eos_token_ids(tokenizer),
        max_concurrent_requests=batch,
        on_step=log,
    )
    generator.start()
    try:
        yield generator, log
    finally:
        generator.stop()


def best_run(runs: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """The run with the lowest median step: the least disturbed on a shared machine."""
    return min(runs, key=lambda run: statistics.median(run[0]))


def measure(config: Setup) -> dict[str, Any]:
    """Step times of the best of `runs` batches (after a short warm-up one)."""
    tokenizer, vocab, batch, mode = config.tokenizer, config.vocab, config.batch, config.mode
    max_new_tokens, runs = config.max_new_tokens, config.runs
    prompt_ids = tokenizer(PROMPT).input_ids
    quiet = wait_for_quiet()
    pressure = cpu_pressure_us()
    started = time.perf_counter()
    with running(tokenizer, vocab, batch) as (generator, log):
        run_batch(generator, log, prompt_ids, mode, 8)
        measured = [
            run_batch(generator, log, prompt_ids, mode, max_new_tokens) for _ in range(runs)
        ]
    elapsed = time.perf_counter() - started
    after = cpu_pressure_us()
    intervals, selects = best_run(measured)
    step_ms = statistics.median(intervals) * 1000
    target = TARGETS_MS[mode.split(",")[0]] if (batch, vocab) == JUDGED else None
    return {
        "batch": batch,
        "vocab": vocab,
        "mode": mode,
        "steps": len(intervals),
        "step_ms_median": step_ms,
        "step_ms_p90": percentile(intervals, 0.9) * 1000,
        "step_ms_mean": statistics.fmean(intervals) * 1000,
        "token_us_median": step_ms * 1000 / batch,
        "select_ms_median": statistics.median(selects) * 1000,
        "run_medians_ms": [statistics.median(run[0]) * 1000 for run in measured],
        "cpu_pressure_before": quiet,
        "cpu_pressure": None if after is None else (after - pressure) / 1e6 / elapsed,
        "target_ms": target,
        "met": None if target is None else step_ms <= target,
    }


# --- breakdown ---------------------------------------------------------------------------------

PARTS: dict[str, tuple[type, str]] = {
    "last_tokens": (Generator, "_last_tokens"),
    "prepare": (TokenSelector, "prepare"),
    "forward": (ScriptedBackend, "decode"),
    "select": (TokenSelector, "select"),
    "select: _sample": (TokenSelector, "_sample"),
    "emit": (Generator, "_emit"),
    "emit: Slot.append": (Slot, "append"),
    "emit: detokenize": (IncrementalDetokenizer, "push"),
    "emit: stop checks": (StoppingCriteria, "__call__"),
    "emit: RequestHandle.put": (RequestHandle, "put"),
    "emit: _finish": (Generator, "_finish"),
}
"""Timed parts of a step; `a: b` is part of `a`. The scheduler thread is the only caller of
these during a run (the consumers only read their queues)."""


@contextmanager
def timed_parts() -> Iterator[dict[str, float]]:
    """Wrap each part of `PARTS` with a timer; yields the seconds spent in each, so far."""
    spent = dict.fromkeys(PARTS, 0.0)
    originals: list[tuple[type, str, Any]] = []

    def timer(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return timed

    for name, (owner, attribute) in PARTS.items():
        raw = owner.__dict__[attribute]
        originals.append((owner, attribute, raw))
        if isinstance(raw, staticmethod):
            setattr(owner, attribute, staticmethod(timer(name, raw.__func__)))
        else:
            setattr(owner, attribute, timer(name, raw))
    try:
        yield spent
    finally:
        for owner, attribute, raw in originals:
            setattr(owner, attribute, raw)


def breakdown(config: Setup) -> dict[str, Any]:
    """Milliseconds per full-batch decode step in each part of `PARTS` (the best of `runs`
    timed batches), and the untimed step with and without a consumer thread per request.
    Parts are timed over a whole batch and divided by its decode steps, so the prefill's
    selection and the last step's finishing are included (a little over one step's worth of
    each in `max_new_tokens`)."""
    tokenizer, vocab, batch, mode = config.tokenizer, config.vocab, config.batch, config.mode
    max_new_tokens, runs = config.max_new_tokens, config.runs
    prompt_ids = tokenizer(PROMPT).input_ids
    wait_for_quiet()
    with running(tokenizer, vocab, batch) as (generator, log):
        run_batch(generator, log, prompt_ids, mode, 8)
        streaming = [
            run_batch(generator, log, prompt_ids, mode, max_new_tokens) for _ in range(runs)
        ]
        after = [
            run_batch(generator, log, prompt_ids, mode, max_new_tokens, streaming=False)
            for _ in range(runs)
        ]
        timed: list[tuple[float, dict[str, float]]] = []
        for _ in range(runs):
            with timed_parts() as spent:
                intervals, _ = run_batch(generator, log, prompt_ids, mode, max_new_tokens)
            decodes = sum(1 for method, *_ in log.steps if method == "decode")
            parts = {name: seconds * 1000 / decodes for name, seconds in spent.items()}
            timed.append((statistics.fmean(intervals) * 1000, parts))
    step, parts = min(timed, key=lambda run: run[0])
    top = [name for name in parts if ":" not in name]
    return {
        "batch": batch,
        "vocab": vocab,
        "mode": mode,
        "step_ms_streaming": statistics.median(best_run(streaming)[0]) * 1000,
        "step_ms_events_read_after": statistics.median(best_run(after)[0]) * 1000,
        "step_ms_timed_mean": step,
        "parts_ms": parts,
        "rest_ms": step - sum(parts[name] for name in top),
    }


# --- report ------------------------------------------------------------------------------------


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Scheduler host overhead ({m.get('cpu_model') or 'cpu'})",
        "",
        f"The real `Generator` over a backend that returns precomputed logits at once: "
        f"{report['max_new_tokens']} tokens per request (`ignore_eos`), a streaming consumer "
        f"thread per request; torch {m['torch']} with {m['torch_threads']} threads on "
        f"{m['usable_cpus']} usable CPUs. A step is one loop of the scheduler thread over the "
        "full batch; `select` is `on_step`'s time (mask preparation, forward, token "
        f"selection). Each row is the best of {report['runs']} batches (lowest median step), "
        f"started once the machine was quiet or after {QUIET_WAIT_S:g} s of waiting; CPU "
        "pressure is the share of the row's time in which some task on the machine waited for "
        "a core (Linux PSI; this benchmark alone causes a few percent), a measure of "
        "interference.",
        "",
        *table_head(
            "batch:",
            "vocabulary:",
            "mode",
            "steps:",
            "step ms median:",
            "step ms p90:",
            "µs per token:",
            "select ms median:",
            "CPU pressure:",
            "target ms:",
            "met^",
        ),
    ]
    for r in report["rows"]:
        target = "" if r["target_ms"] is None else f"≤ {r['target_ms']:g}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['batch']} | {r['vocab']:,} | {r['mode']} | {r['steps']} "
            f"| {r['step_ms_median']:.3f} | {r['step_ms_p90']:.3f} | {r['token_us_median']:.1f} "
            f"| {r['select_ms_median']:.3f} | {_share(r['cpu_pressure'])} | {target} | {met} |"
        )
    if report["breakdown"]:
        lines += [
            "",
            f"Where a judged step's time goes, batch {JUDGED[0]}, vocabulary {JUDGED[1]:,} (ms "
            "per step, the best of the batches run with timers around each part; `a: b` is part "
            "of `a`; `rest` is the loop itself: admission, cancellation checks, slot lists, "
            "`on_step`, and waiting for the GIL):",
            "",
            "| part | " + " | ".join(f"{b['mode']}" for b in report["breakdown"]) + " |",
            "| --- |" + " ---: |" * len(report["breakdown"]),
        ]
        for name in PARTS:
            cells = " | ".join(f"{b['parts_ms'][name]:.3f}" for b in report["breakdown"])
            lines.append(f"| {name} | {cells} |")
        rows = [
            ("rest", "rest_ms"),
            ("step, timed (mean)", "step_ms_timed_mean"),
            ("step, untimed (median), a consumer thread per request", "step_ms_streaming"),
            ("step, untimed (median), events read after the run", "step_ms_events_read_after"),
        ]
        for label, key in rows:
            cells = " | ".join(f"{b[key]:.3f}" for b in report["breakdown"])
            lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per request")
    parser.add_argument("--runs", type=int, default=5, help="batches per row; the best counts")
    parser.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false", help="skip the breakdown"
    )
    parser.add_argument("--readme", type=Path, default=None, help="update this README's table")
    args = parser.parse_args(argv)
    smollm2 = AutoTokenizer.from_pretrained(ensure_model())
    tokenizers = {len(smollm2): smollm2, 128_256: synthetic_tokenizer(smollm2, 128_256)}
    assert set(tokenizers) == set(VOCABS), sorted(tokenizers)
    rows = []
    for vocab in VOCABS:
        for batch in BATCHES:
            for mode in MODES + (UNLOGGED if (batch, vocab) == JUDGED else ()):
                setup = Setup(tokenizers[vocab], vocab, batch, mode, args.tokens, args.runs)
                row = measure(setup)
                print(
                    f"batch {batch} vocab {vocab} {mode}: {row['step_ms_median']:.3f} ms/step",
                    flush=True,
                )
                rows.append(row)
    batch, vocab = JUDGED
    parts = (
        [
            breakdown(Setup(tokenizers[vocab], vocab, batch, mode, args.tokens, args.runs))
            for mode in MODES
        ]
        if args.breakdown
        else []
    )
    report: dict[str, Any] = {
        "machine": machine(),
        "max_new_tokens": args.tokens,
        "runs": args.runs,
        "targets_ms": TARGETS_MS,
        "judged": {"batch": batch, "vocab": vocab},
        "met": all(r["met"] for r in rows if r["met"] is not None),
        "rows": rows,
        "breakdown": parts,
        "parts": {name: qualified(owner, attribute) for name, (owner, attribute) in PARTS.items()},
    }
    text = to_markdown(report)
    publish(report, text, args.out, args.readme, "overhead", "bench-overhead")
    print(text)
    return 0


def qualified(owner: type, attribute: str) -> str:
    """The dotted name of a timed part, for the JSON report."""
    return f"{owner.__module__}.{owner.__qualname__}.{attribute}"


if __name__ == "__main__":
    raise SystemExit(main())
