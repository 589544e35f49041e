"""Does `torch.compile` of the static-shape decode step raise the ceiling on this CPU?

The torch analogue of Neuron's compiled graph: `transformers`' `StaticCache` gives the decode step
fixed shapes, and `torch.compile(model.forward, fullgraph=True, dynamic=False)` compiles it
with inductor. For each dtype, at one batch size, this measures the eager `DynamicCache` and
`StaticCache` steps, the compile time, and the compiled step (best of two runs after the first),
and checks the compiled greedy tokens against the eager ones of the same dtype: a change is kept
only if greedy output still matches its reference.

    python -m benchmarks.compile_step --out benchmarks/results/compile.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from benchmarks.ceiling import load_bare_model, random_prompts
from benchmarks.machine import machine
from handler.testing.smollm2 import ensure_model


@torch.inference_mode()
def greedy_steps(
    model: PreTrainedModel,
    forward: Callable[..., Any],
    prompt: torch.Tensor,
    steps: int,
    static: bool,
) -> tuple[float, torch.Tensor]:
    """Prefill eagerly, then `steps` greedy decode steps through `forward`: (ms per step, the
    `[batch, steps + 1]` chosen ids)."""
    length = prompt.shape[1]
    if static:
        cache = StaticCache(config=model.config, max_cache_len=length + steps + 2)
        prefill_kwargs = {"cache_position": torch.arange(length)}
    else:
        cache = DynamicCache(config=model.config)
        prefill_kwargs = {}
    logits = model(
        prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **prefill_kwargs
    ).logits
    chosen = [logits[:, -1].argmax(-1)]
    started = time.perf_counter()
    for i in range(steps):
        kwargs = {"cache_position": torch.tensor([length + i])} if static else {}
        out = forward(
            input_ids=chosen[-1][:, None], past_key_values=cache, use_cache=True, **kwargs
        )
        chosen.append(out.logits[:, -1].argmax(-1))
    return (time.perf_counter() - started) / steps * 1000, torch.stack(chosen, 1)


def measure(model_dir: str, dtype: str, batch: int, steps: int) -> dict[str, Any]:
    model = load_bare_model(model_dir, getattr(torch, dtype))
    prompt = random_prompts(batch, 30)
    runs = {}
    for static in (False, True):
        greedy_steps(model, model.forward, prompt, 4, static)
        runs[static] = min(
            (greedy_steps(model, model.forward, prompt, steps, static) for _ in range(2)),
            key=lambda run: run[0],
        )
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False)
    started = time.perf_counter()
    greedy_steps(model, compiled, prompt, 4, static=True)
    compile_s = time.perf_counter() - started
    greedy_steps(model, compiled, prompt, steps, static=True)  # guards settle on a new cache
    step_ms, tokens = min(
        (greedy_steps(model, compiled, prompt, steps, static=True) for _ in range(2)),
        key=lambda run: run[0],
    )
    eager_ms = min(runs[False][0], runs[True][0])
    return {
        "dtype": dtype,
        "batch_size": batch,
        "steps": steps,
        "eager_dynamic_step_ms": runs[False][0],
        "eager_static_step_ms": runs[True][0],
        "compile_s": compile_s,
        "compiled_step_ms": step_ms,
        "speedup_vs_faster_eager": eager_ms / step_ms,
        "greedy_equals_eager_static": bool(torch.equal(tokens, runs[True][1])),
        "greedy_equals_eager_dynamic": bool(torch.equal(tokens, runs[False][1])),
    }


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Compiling the decode step (`torch.compile`, inductor, StaticCache)",
        "",
        f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs, torch {m['torch']}, "
        f"transformers {m['transformers']}; "
        f"SmolLM2-135M, batch {report['results'][0]['batch_size']}, prompt 30 tokens, "
        f"{report['results'][0]['steps']} greedy steps.",
        "",
        "| dtype | eager DynamicCache ms | eager StaticCache ms | compile s | compiled ms "
        "| speed-up | same greedy tokens as eager |",
        "|:---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in report["results"]:
        same = r["greedy_equals_eager_static"] and r["greedy_equals_eager_dynamic"]
        lines.append(
            f"| {r['dtype']} | {r['eager_dynamic_step_ms']:.1f} | {r['eager_static_step_ms']:.1f} "
            f"| {r['compile_s']:.0f} | {r['compiled_step_ms']:.1f} "
            f"| {r['speedup_vs_faster_eager']:.2f}x | {'yes' if same else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_step", description=__doc__)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile.json"))
    args = parser.parse_args(argv)
    model_dir = str(ensure_model())
    results = [
        measure(model_dir, dtype, args.batch_size, args.steps) for dtype in args.dtypes.split(",")
    ]
    report = {"machine": machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
