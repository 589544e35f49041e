"""Decode throughput and token-selection cost of the torch engine, against bare baselines.

Run from the repository root:

    python -m benchmarks.engine --out benchmarks/results/engine.json

1. Decode: our generator's tokens/s against the ceiling, the fastest bare loop of `transformers`
   forward calls (DynamicCache or StaticCache) for the same model, batch and lengths.
2. Token selection at batch 32: `TokenSelector.select` against a per-slot `LogitsProcessorList`
   loop, the way a naive server chooses tokens.

Writes the JSON report, a Markdown table next to it (same name, `.md`), and prints the Markdown.
Each measurement is taken `--repeats` times, interleaved with its baseline, and the best is kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from benchmarks.ceiling import (
    HIGH_ID,
    LOW_ID,
    SEED,
    bare_decode_tok_s,
    load_bare_model,
    random_prompts,
)
from benchmarks.machine import machine
from handler.config import read_settings
from handler.engine import Engine, build_torch_engine
from handler.generation.request import ErrorEvent, GenerationRequest, RequestHandle, TokenEvent
from handler.generation.sampling import TokenSelector
from handler.model.params import SamplingParams

DECODE_TARGET = 0.95
"""Ours / ceiling decode tokens/s."""
SELECTION_TARGET = 5.0
"""Baseline / ours selection time, main configuration."""
SELECTION_BATCH = 32
SELECTION_PROMPT_TOKENS = 64
VOCABS = (49_152, 128_256)
QUICK_VOCABS = (49_152,)
EVENT_TIMEOUT_S = 600.0
PREFILL_ATTEMPTS = 3
_STARTED = time.perf_counter()


@dataclass(frozen=True)
class Options:
    batch_sizes: list[int]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    vocabs: list[int]
    warmup_calls: int
    timed_calls: int
    quick: bool
    model_dir: str


@dataclass(frozen=True)
class DecodeResult:
    batch_size: int
    ceiling_dynamic_tok_s: float
    ceiling_static_tok_s: float
    ceiling_tok_s: float
    ours_tok_s: float
    ratio: float
    target: float
    meets_target: bool
    engine_device: str
    engine_dtype: str


@dataclass(frozen=True)
class SelectionResult:
    vocab_size: int
    configuration: str
    ours_ms: float
    baseline_ms: float
    speedup: float
    target: float | None
    meets_target: bool | None


# --- decode ------------------------------------------------------------------------------------


class PrefillProbe:
    """Records the row count of every prefill call of an engine's backend."""

    def __init__(self, engine: Engine) -> None:
        self.sizes: list[int] = []
        self._prefill = engine.backend.prefill
        engine.backend.prefill = self

    def __call__(self, input_ids: list[list[int]], seq_ids: list[int], *args: Any) -> Any:
        self.sizes.append(len(seq_ids))
        return self._prefill(input_ids, seq_ids, *args)


def build_engine(model_dir: str, batch: int, prompt_tokens: int, new_tokens: int) -> Engine:
    environ = {
        "MAX_BATCH_SIZE": str(batch),
        "MAX_TOTAL_TOKENS": str(prompt_tokens + new_tokens + 8),
        "MAX_INPUT_TOKENS": str(prompt_tokens + 1),
    }
    return build_torch_engine(read_settings([], environ), model_dir)


def token_times(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[float]]:
    """Submit every prompt at once; return, per request, the arrival time of each token."""
    handles: list[RequestHandle] = []
    submitted = threading.Event()
    times: list[list[float]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        submitted.wait()
        try:
            for event in handles[i].events(timeout=EVENT_TIMEOUT_S):
                if isinstance(event, TokenEvent):
                    times[i].append(time.perf_counter())
                elif isinstance(event, ErrorEvent):
                    raise event.error
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(prompts))
    ]
    for thread in threads:
        thread.start()
    try:
        handles.extend(
            engine.generator.submit(
                GenerationRequest(prompt_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
            )
            for ids in prompts
        )
    finally:
        submitted.set()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    counts = {len(t) for t in times}
    if counts != {new_tokens}:
        raise RuntimeError(f"expected {new_tokens} tokens per request, got {sorted(counts)}")
    return times


def generator_decode_tok_s(
    engine: Engine, probe: PrefillProbe, prompts: list[list[int]], new_tokens: int
) -> float:
    """Decode tokens/s from the moment every request has its first token to the last token.

    Retried when the scheduler did not prefill all requests in one batch.
    """
    for _ in range(PREFILL_ATTEMPTS):
        probe.sizes.clear()
        times = token_times(engine, prompts, new_tokens)
        if probe.sizes == [len(prompts)]:
            all_first = max(t[0] for t in times)
            last = max(t[-1] for t in times)
            return len(prompts) * (new_tokens - 1) / (last - all_first)
    raise RuntimeError(f"requests were not prefilled together: prefill sizes {probe.sizes}")


def measure_decode(options: Options, model: PreTrainedModel) -> list[DecodeResult]:
    results = []
    for batch in options.batch_sizes:
        _progress(f"decode: batch {batch}")
        prompt = random_prompts(batch, options.prompt_tokens)
        prompts = prompt.tolist()
        engine = build_engine(options.model_dir, batch, options.prompt_tokens, options.new_tokens)
        try:
            probe = PrefillProbe(engine)
            bare_decode_tok_s(model, prompt, 2, static=False)
            bare_decode_tok_s(model, prompt, 2, static=True)
            generator_decode_tok_s(engine, probe, prompts, 2)
            dynamic, static, ours = [], [], []
            for _ in range(options.repeats):
                dynamic.append(bare_decode_tok_s(model, prompt, options.new_tokens, static=False))
                static.append(bare_decode_tok_s(model, prompt, options.new_tokens, static=True))
                ours.append(generator_decode_tok_s(engine, probe, prompts, options.new_tokens))
            shape = engine.backend.shape
        finally:
            engine.generator.stop()
            del engine
            gc.collect()
        ceiling = max(max(dynamic), max(static))
        ratio = max(ours) / ceiling
        results.append(
            DecodeResult(
                batch_size=batch,
                ceiling_dynamic_tok_s=max(dynamic),
                ceiling_static_tok_s=max(static),
                ceiling_tok_s=ceiling,
                ours_tok_s=max(ours),
                ratio=ratio,
                target=DECODE_TARGET,
                meets_target=ratio >= DECODE_TARGET,
                engine_device=shape.device,
                engine_dtype=shape.dtype,
            )
        )
    return results


# --- token selection ---------------------------------------------------------------------------


def sampling_params(slot: int, typical: bool) -> SamplingParams:
    return SamplingParams(
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        typical_p=0.95 if typical else 1.0,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        seed=SEED + slot,
    )


class CountPenalty(LogitsProcessor):
    """Frequency and presence penalties from one row's token counts `[1, vocab]`."""

    def __init__(self, counts: torch.Tensor, frequency: float, presence: float) -> None:
        self.counts = counts
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        scores = scores - self.frequency * self.counts
        return scores - self.presence * (self.counts > 0)


@dataclass
class BaselineSlot:
    input_ids: torch.Tensor
    """`[1, length]` prompt and chosen tokens."""
    counts: torch.Tensor
    """`[1, vocab]` occurrences of each token in `input_ids`."""
    processors: LogitsProcessorList
    generator: torch.Generator


class PerSlotSelector:
    """The naive baseline: each slot runs its own `LogitsProcessorList`, softmax, multinomial.

    Like `TokenSelector`, it returns each chosen token's log-probability and keeps the slot's
    tokens for the penalties.
    """

    def __init__(
        self, params: Sequence[SamplingParams], prompts: Sequence[list[int]], vocab_size: int
    ) -> None:
        pairs = zip(params, prompts, strict=True)
        self.slots = [self._slot(p, ids, vocab_size) for p, ids in pairs]

    @staticmethod
    def _slot(params: SamplingParams, prompt: list[int], vocab_size: int) -> BaselineSlot:
        input_ids = torch.tensor([prompt], dtype=torch.long)
        counts = torch.bincount(input_ids[0], minlength=vocab_size)[None].float()
        processors = [
            RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
            CountPenalty(counts, params.frequency_penalty, params.presence_penalty),
            TemperatureLogitsWarper(params.temperature),
            TopKLogitsWarper(params.top_k),
            TopPLogitsWarper(params.top_p),
        ]
        if params.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(params.typical_p))
        generator = torch.Generator().manual_seed(params.seed)
        return BaselineSlot(input_ids, counts, LogitsProcessorList(processors), generator)

    def select(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Choose one token per row of `[n_slots, vocab]` logits."""
        ids, logprobs = [], []
        for i, slot in enumerate(self.slots):
            scores = logits[i : i + 1]
            probs = torch.softmax(slot.processors(slot.input_ids, scores), dim=-1)
            token = torch.multinomial(probs, 1, generator=slot.generator)
            token_id = int(token)
            logprobs.append(float(torch.log_softmax(scores, dim=-1)[0, token_id]))
            slot.input_ids = torch.cat([slot.input_ids, token], dim=-1)
            slot.counts[0, token_id] += 1
            ids.append(token_id)
        return ids, logprobs


def median_ms(call: Callable[[], object], warmup: int, timed: int) -> float:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(timed):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure_selection(options: Options) -> list[SelectionResult]:
    results = []
    generator = torch.Generator().manual_seed(SEED)
    prompts = torch.randint(
        LOW_ID, HIGH_ID + 1, (SELECTION_BATCH, SELECTION_PROMPT_TOKENS), generator=generator
    ).tolist()
    slots = list(range(SELECTION_BATCH))
    for vocab in options.vocabs:
        logits = torch.randn(SELECTION_BATCH, vocab, generator=generator)
        for typical in (False, True):
            name = "main + typical_p 0.95" if typical else "main"
            _progress(f"selection: vocabulary {vocab:,}, {name}")
            params = [sampling_params(slot, typical) for slot in slots]
            ours = TokenSelector(SELECTION_BATCH, vocab)
            for slot, (p, ids) in enumerate(zip(params, prompts, strict=True)):
                ours.assign(slot, p, ids)
            baseline = PerSlotSelector(params, prompts, vocab)
            ours_ms, baseline_ms = [], []
            for _ in range(options.repeats):
                calls = options.warmup_calls, options.timed_calls
                ours_ms.append(median_ms(partial(ours.select, logits, slots), *calls))
                baseline_ms.append(median_ms(partial(baseline.select, logits), *calls))
            speedup = min(baseline_ms) / min(ours_ms)
            target = None if typical else SELECTION_TARGET
            results.append(
                SelectionResult(
                    vocab_size=vocab,
                    configuration=name,
                    ours_ms=min(ours_ms),
                    baseline_ms=min(baseline_ms),
                    speedup=speedup,
                    target=target,
                    meets_target=None if target is None else speedup >= target,
                )
            )
    return results


# --- report ------------------------------------------------------------------------------------


def to_markdown(report: dict[str, Any]) -> str:
    """Tables of the decode and selection results, with the machine they ran on."""
    m = report["machine"]
    o = report["options"]
    cpu = m["cpu_model"] or m["processor"] or "unknown CPU"
    lines = [
        "# Engine benchmark",
        "",
        f"{cpu}, {m['usable_cpus']} usable CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}.",
        "",
        "## Decode throughput",
        "",
        f"Prompt {o['prompt_tokens']} tokens, {o['new_tokens']} new tokens (decode tokens/s over "
        f"the last {o['new_tokens'] - 1} steps), best of {o['repeats']}. Ceiling: the faster "
        "bare `transformers` forward loop (DynamicCache or StaticCache), fp32, sdpa.",
        "",
        "| Batch | Bare DynamicCache tok/s | Bare StaticCache tok/s | Ceiling tok/s "
        "| Ours tok/s | Ours / ceiling | Target | Met |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in report["decode"]:
        lines.append(
            f"| {r['batch_size']} | {r['ceiling_dynamic_tok_s']:,.1f} "
            f"| {r['ceiling_static_tok_s']:,.1f} | {r['ceiling_tok_s']:,.1f} "
            f"| {r['ours_tok_s']:,.1f} | {r['ratio']:.3f} | ≥ {r['target']:.2f} "
            f"| {_mark(r['meets_target'])} |"
        )
    lines += [
        "",
        f"## Token selection (batch {SELECTION_BATCH})",
        "",
        "Main: temperature 0.7, top_k 50, top_p 0.9, repetition_penalty 1.1, frequency_penalty "
        "0.1, presence_penalty 0.1, do_sample, per-row seeds; random float32 logits. Median "
        f"ms/step of {o['timed_calls']} calls, best of {o['repeats']}. Baseline: a "
        "`LogitsProcessorList` per slot, softmax and `torch.multinomial` row by row.",
        "",
        "| Vocabulary | Configuration | Ours ms/step | Per-slot baseline ms/step | Speedup "
        "| Target | Met |",
        "|---:|:---|---:|---:|---:|---:|:---:|",
    ]
    for r in report["selection"]:
        target = "—" if r["target"] is None else f"≥ {r['target']:g}x"
        lines.append(
            f"| {r['vocab_size']:,} | {r['configuration']} | {r['ours_ms']:.2f} "
            f"| {r['baseline_ms']:.2f} | {r['speedup']:.1f}x | {target} "
            f"| {_mark(r['meets_target'])} |"
        )
    return "\n".join(lines) + "\n"


def _mark(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


def _progress(message: str) -> None:
    elapsed = time.perf_counter() - _STARTED
    print(f"[benchmarks.engine {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- command line ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_list(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine",
        description="Decode throughput and token-selection cost against bare baselines.",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    parser.add_argument("--batch-sizes", type=_positive_list, default=[1, 4, 8, 16])
    parser.add_argument("--prompt-tokens", type=_positive, default=64)
    parser.add_argument("--new-tokens", type=_positive, default=64)
    parser.add_argument("--repeats", type=_positive, default=2, help="best run is kept")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batches 1,2, 8 prompt and 8 new tokens, vocabulary 49,152, few calls",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a transformers model directory (default: the converted SmolLM2-135M-Instruct)",
    )
    args = parser.parse_args(argv)
    if args.model_dir is None:
        from handler.testing.smollm2 import ensure_model

        args.model_dir = ensure_model()
    if args.quick:
        args.batch_sizes, args.prompt_tokens, args.new_tokens = [1, 2], 8, 8
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one token after the first)")
    if not args.batch_sizes:
        parser.error("--batch-sizes is empty")
    options = Options(
        batch_sizes=args.batch_sizes,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        vocabs=list(QUICK_VOCABS if args.quick else VOCABS),
        warmup_calls=1 if args.quick else 3,
        timed_calls=3 if args.quick else 20,
        quick=args.quick,
        model_dir=str(args.model_dir),
    )
    return options, args.out


def main(argv: Sequence[str] | None = None) -> None:
    options, out = parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "options": asdict(options)}
    _progress(f"loading {options.model_dir}")
    model = load_bare_model(options.model_dir)
    report["decode"] = [asdict(r) for r in measure_decode(options, model)]
    del model
    gc.collect()
    report["selection"] = [asdict(r) for r in measure_selection(options)]
    markdown = to_markdown(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    _progress(f"wrote {out} and {out.with_suffix('.md')}")
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
