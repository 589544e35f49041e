"""What structured output costs: decode throughput with every row JSON-constrained, and the
grammar mask's time per step at two vocabulary sizes.

Run from the repository root (`make bench-structured`), on a quiet machine:

    python -m benchmarks.structured --out benchmarks/results/structured.json

1. Throughput: the torch engine on SmolLM2-135M, batch 16, every row generating `--tokens`
   tokens, once with every row under a JSON schema that cannot end before the budget and once
   unconstrained (`ignore_eos`). Pairs are interleaved; the median ratio of tokens/s is
   reported. Two schemas: `records` (an array of at least 1,000 objects with a string, a
   bounded integer and an enum: what agents ask for), judged against the target (at least
   0.9), and `short strings` (an array of strings of at most 12 characters), the worst case
   seen: llguidance's slicer, which makes masks inside JSON strings cheap, does not apply to
   strings bounded under 10 characters, so each mask walks the whole token trie.
2. Mask time per step: `TokenSelector.select` over 16 constrained rows of random logits (the
   mask is computed, applied and undone, and every grammar advances), at SmolLM2's vocabulary
   (49,152) and at a synthetic 128,256-token vocabulary (Llama 3's size: SmolLM2's tokens plus
   79,104 concatenations of two of them), against the same selection unconstrained.

The engine computes a step's masks on a worker thread while the model runs its forward
(`TokenSelector.prepare`); the throughput table's mask column is what is left on the step's
critical path (waiting for the masks and applying them), while part 2 measures the whole mask
cost, computed in the step.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from benchmarks.machine import machine
from benchmarks.report import publish
from handler.config import read_settings
from handler.engine import Engine, build_torch_engine
from handler.generation.grammar import Constraint, GrammarCompiler
from handler.generation.request import GenerationRequest
from handler.generation.sampling import TokenSelector
from handler.model.params import SamplingParams
from handler.testing.smollm2 import ensure_model

SCHEMAS: dict[str, dict[str, Any]] = {
    "records": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "role": {"enum": ["admin", "user", "guest"]},
            },
            "required": ["name", "age", "role"],
        },
        "minItems": 1000,
    },
    "short strings": {
        "type": "array",
        "items": {"type": "string", "maxLength": 12},
        "minItems": 1000,
    },
}
"""Neither can end before any budget used here, so constrained rows decode as many tokens as
the unconstrained ones. The first is judged against the target; the second is the worst case."""
SCHEMA = SCHEMAS["short strings"]
"""The mask-time measurement's schema."""
TARGET = 0.9
BATCH = 16
PROMPT = "List some words, as a JSON array of strings:"


def engine(model_dir: Path, threads: int | None) -> Engine:
    if threads:
        torch.set_num_threads(threads)
    environ = {"MAX_BATCH_SIZE": str(BATCH), "MAX_TOTAL_TOKENS": "512", "HF_AUTO_CAST_TYPE": "fp32"}
    return build_torch_engine(read_settings([], environ), model_dir)


def run_batch(
    running: Engine, schema: dict[str, Any] | None, tokens: int
) -> tuple[float, float, int]:
    """Tokens/s of one batch of 16, every row under `schema` (or none), the mask seconds per
    step left on the critical path, and its steps."""
    compiler = GrammarCompiler(running.tokenizer, running.backend.shape.vocab_size)
    prompt_ids = running.tokenizer(PROMPT).input_ids
    selector = running.generator.selector
    before = (selector.mask_seconds, selector.mask_steps)
    requests = [
        GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=tokens,
            params=SamplingParams(),
            ignore_eos=schema is None,
            constraint=compiler.json_schema(schema, "bench") if schema is not None else None,
        )
        for _ in range(BATCH)
    ]
    started = time.perf_counter()
    handles = [running.generator.submit(r) for r in requests]
    generated = sum(h.result(timeout=600)[1].generated_tokens for h in handles)
    elapsed = time.perf_counter() - started
    steps = selector.mask_steps - before[1]
    mask = (selector.mask_seconds - before[0]) / max(steps, 1)
    assert generated == BATCH * tokens, generated
    return generated / elapsed, mask, steps


def synthetic_tokenizer(base: PreTrainedTokenizerBase, size: int) -> PreTrainedTokenizerFast:
    """`base` (byte-level BPE) with its vocabulary grown to `size` by concatenations of two of
    its ordinary tokens: the trie llguidance walks is as large as a real vocabulary's."""
    document = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = document["model"]["vocab"]
    ordinary = [t for t in vocab if len(t) > 1 and not t.startswith("<")]
    chooser = random.Random(0)
    special = {t["id"] for t in document.get("added_tokens", [])}
    next_id = max(max(vocab.values()), max(special, default=0)) + 1
    while next_id < size:
        token = chooser.choice(ordinary) + chooser.choice(ordinary)
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(document)))
    fast.eos_token = base.eos_token
    return fast


def mask_cost(tokenizer: PreTrainedTokenizerBase, vocab: int, steps: int) -> dict[str, float]:
    """Median seconds per `select` of 16 rows, constrained and not, and of the mask alone."""
    compiler = GrammarCompiler(tokenizer, vocab)
    generator = torch.Generator().manual_seed(0)
    results: dict[str, list[float]] = {"constrained": [], "free": [], "mask": []}
    for constrained in (True, False):
        selector = TokenSelector(BATCH, vocab)
        constraints: list[Constraint | None] = [
            compiler.json_schema(SCHEMA, "bench") if constrained else None for _ in range(BATCH)
        ]
        for slot, constraint in enumerate(constraints):
            selector.assign(slot, SamplingParams(), [1], frozenset({compiler.eos_id}), constraint)
        slots = list(range(BATCH))
        for _ in range(steps):
            logits = torch.randn(BATCH, vocab, generator=generator)
            before = selector.mask_seconds
            started = time.perf_counter()
            selector.select(logits, slots)
            elapsed = time.perf_counter() - started
            results["constrained" if constrained else "free"].append(elapsed)
            if constrained:
                results["mask"].append(selector.mask_seconds - before)
    return {f"{name}_ms": statistics.median(v) * 1000 for name, v in results.items()} | {
        "mask_p99_ms": sorted(results["mask"])[int(0.99 * len(results["mask"]))] * 1000,
        "vocab": vocab,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/structured.json"))
    parser.add_argument("--tokens", type=int, default=96, help="tokens per row")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="steps of the mask measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--readme", type=Path, default=None, help="update this README's tables")
    args = parser.parse_args(argv)
    model_dir = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    running = engine(model_dir, args.threads)
    try:
        pairs: dict[str, list[dict[str, float]]] = {name: [] for name in SCHEMAS}
        for schema in SCHEMAS.values():
            run_batch(running, schema, 8)  # warm-up: first compiles and allocations
        run_batch(running, None, 8)
        for _ in range(args.pairs):
            for name, schema in SCHEMAS.items():
                free, _, _ = run_batch(running, None, args.tokens)
                constrained, mask, steps = run_batch(running, schema, args.tokens)
                pairs[name].append(
                    {
                        "free_tok_s": free,
                        "constrained_tok_s": constrained,
                        "ratio": constrained / free,
                        "mask_ms_per_step": mask * 1000,
                        "steps": steps,
                    }
                )
    finally:
        running.generator.stop()
    masks = [mask_cost(tokenizer, len(tokenizer), args.steps)]
    masks.append(mask_cost(synthetic_tokenizer(tokenizer, 128_256), 128_256, args.steps))
    ratios = {name: statistics.median(p["ratio"] for p in runs) for name, runs in pairs.items()}
    judged = next(iter(SCHEMAS))
    report: dict[str, Any] = {
        "machine": machine(),
        "batch": BATCH,
        "tokens_per_row": args.tokens,
        "schemas": SCHEMAS,
        "pairs": pairs,
        "ratio_median": ratios,
        "target": TARGET,
        "judged": judged,
        "met": ratios[judged] >= TARGET,
        "mask_per_step": masks,
    }
    lines = [
        f"# Structured output cost ({report['machine'].get('cpu_model') or 'cpu'})",
        "",
        f"Batch {BATCH}, {args.tokens} tokens per row, SmolLM2-135M fp32, median of "
        f"{args.pairs} interleaved pairs per schema.",
        "",
        "| schema | run | unconstrained tok/s | JSON-constrained tok/s | ratio "
        "| mask ms/step on the critical path |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in pairs.items():
        for i, p in enumerate(runs, 1):
            lines.append(
                f"| {name} | {i} | {p['free_tok_s']:.1f} | {p['constrained_tok_s']:.1f} "
                f"| {p['ratio']:.3f} | {p['mask_ms_per_step']:.3f} |"
            )
    lines.append("")
    for name, ratio in ratios.items():
        verdict = ("met" if ratio >= TARGET else "MISSED") if name == judged else "worst case"
        lines.append(f"- {name}: median ratio {ratio:.3f} (target >= {TARGET}: {verdict})")
    lines += [
        "",
        "Mask time per step, 16 rows under the short-strings schema, computed in the step:",
        "",
        "| vocabulary | select, 16 free rows (ms) | select, 16 constrained rows (ms) "
        "| mask alone, median (ms) | mask p99 (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in masks:
        lines.append(
            f"| {m['vocab']:,} | {m['free_ms']:.3f} | {m['constrained_ms']:.3f} "
            f"| {m['mask_ms']:.3f} | {m['mask_p99_ms']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    publish(report, text, args.out, args.readme, "structured", "bench-structured")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
