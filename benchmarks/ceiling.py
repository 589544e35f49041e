"""The ceiling: the fastest bare loop of `transformers` forward calls, with no server around it.

For a batch of `batch` prompts of `prompt_tokens` tokens, one prefill then `new_tokens - 1` greedy
decode steps, timed separately, through both cache paths the pinned `transformers` offers
(`DynamicCache` and `StaticCache`); the faster one is the ceiling. A slow cache layout is our cost,
not the model's, so the ceiling is whichever is faster on this machine.

Also the bare prefill of each benchmark prompt alone (the floor under time to first token) and the
bare decode step per batch size (the floor under inter-token latency).

    python -m benchmarks.ceiling --batch-sizes 1,8,16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    StaticCache,
)

from benchmarks.monitor import OthersCpu

LOW_ID, HIGH_ID = 100, 40_000
SEED = 0


def load_bare_model(model_dir: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    ).eval()


def random_prompts(batch: int, length: int, seed: int = SEED) -> torch.Tensor:
    """`[batch, length]` token ids in `LOW_ID..HIGH_ID`, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(LOW_ID, HIGH_ID + 1, (batch, length), generator=generator)


@dataclass(frozen=True)
class BareRun:
    """One bare greedy generation: `[batch, length]` prompt, then `steps` decode steps."""

    batch: int
    prefill_s: float
    decode_s: float
    steps: int

    @property
    def new_tokens(self) -> int:
        return self.steps + 1

    @property
    def decode_tok_s(self) -> float:
        """Tokens/s of the decode steps alone."""
        return self.batch * self.steps / self.decode_s

    @property
    def step_s(self) -> float:
        """Mean time of one decode step over the whole batch."""
        return self.decode_s / self.steps

    @property
    def total_tok_s(self) -> float:
        """Generated tokens/s with the prefill counted, as a client sees a whole request."""
        return self.batch * self.new_tokens / (self.prefill_s + self.decode_s)


@torch.inference_mode()
def bare_generate(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, static: bool
) -> BareRun:
    """Greedy generation of `new_tokens` per row of `prompt` by plain forward calls.

    The prefill computes the logits of the last position only (`logits_to_keep=1`), as
    `generate` does. The static cache is allocated inside the timed prefill: a server pays for its
    cache too, once, but a bare loop that keeps it would need to reset it, which costs the same
    order.
    """
    batch, length = prompt.shape
    steps = new_tokens - 1
    start = time.perf_counter()
    if static:
        cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
        prefill_kwargs = {"cache_position": torch.arange(length)}
        step_kwargs = [{"cache_position": torch.tensor([length + i])} for i in range(steps)]
    else:
        cache = DynamicCache(config=model.config)
        prefill_kwargs = {}
        step_kwargs = [{}] * steps
    logits = model(
        prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **prefill_kwargs
    ).logits
    next_ids = logits[:, -1].argmax(dim=-1)
    prefilled = time.perf_counter()
    for kwargs in step_kwargs:
        logits = model(next_ids[:, None], past_key_values=cache, use_cache=True, **kwargs).logits
        next_ids = logits[:, -1].argmax(dim=-1)
    return BareRun(batch, prefilled - start, time.perf_counter() - prefilled, steps)


def bare_decode_tok_s(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, static: bool
) -> float:
    """Tokens/s of `new_tokens - 1` greedy decode steps after one untimed prefill."""
    return bare_generate(model, prompt, new_tokens, static).decode_tok_s


@dataclass(frozen=True)
class CeilingPoint:
    """The ceiling at one batch size: best of `repeats` runs of each cache path."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    dynamic_tok_s: float
    static_tok_s: float
    faster_path: str
    tok_s: float
    """Generated tokens/s of the faster path, prefill included."""
    decode_tok_s: float
    """Tokens/s of the faster path's decode steps alone."""
    step_ms: float
    """One decode step of the whole batch on the faster path (best run)."""
    prefill_ms: float
    """The batch's prefill on the faster path (best run)."""


def measure_point(
    model: PreTrainedModel, batch: int, prompt_tokens: int, new_tokens: int, repeats: int
) -> CeilingPoint:
    prompt = random_prompts(batch, prompt_tokens)
    for static in (False, True):
        bare_generate(model, prompt, 2, static)
    runs: dict[bool, list[BareRun]] = {False: [], True: []}
    for _ in range(repeats):
        for static in (False, True):
            runs[static].append(bare_generate(model, prompt, new_tokens, static))
    best = {static: max(r, key=lambda run: run.total_tok_s) for static, r in runs.items()}
    static_wins = best[True].total_tok_s > best[False].total_tok_s
    fastest = best[static_wins]
    return CeilingPoint(
        batch_size=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        dynamic_tok_s=best[False].total_tok_s,
        static_tok_s=best[True].total_tok_s,
        faster_path="StaticCache" if static_wins else "DynamicCache",
        tok_s=fastest.total_tok_s,
        decode_tok_s=max(run.decode_tok_s for run in runs[static_wins]),
        step_ms=min(run.step_s for run in runs[static_wins]) * 1e3,
        prefill_ms=min(run.prefill_s for run in runs[static_wins]) * 1e3,
    )


@torch.inference_mode()
def bare_prefill_s(model: PreTrainedModel, prompt_ids: list[int], repeats: int) -> float:
    """Best time of one prompt's prefill and first greedy token, `DynamicCache` (`[1, length]`),
    last position's logits only."""
    ids = torch.tensor([prompt_ids])
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        logits[:, -1].argmax(dim=-1)
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Ceiling:
    """Everything the end-to-end targets compare against."""

    dtype: str
    points: list[CeilingPoint]
    prefill_ms: list[float]
    """Bare prefill of each benchmark prompt alone, in prompt order."""
    prefill_p50_ms: float
    others_cpu_cores: float | None = None
    """CPU cores used by other processes while the ceiling was measured."""

    def at(self, batch: int) -> CeilingPoint | None:
        return next((p for p in self.points if p.batch_size == batch), None)


class BareReference:
    """The bare loop loaded once, to be measured right beside our server's runs: on 2 shared
    cores the same bare loop reads up to 25% apart a minute later, so a target compares our
    measurement with the bare one taken just before it (see `benchmarks.e2e`)."""

    def __init__(
        self, model_dir: str, prompts: Sequence[str], new_tokens: int, repeats: int, dtype: str
    ) -> None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prompt_ids = [tokenizer(p).input_ids for p in prompts]
        self.prompt_tokens = round(statistics.mean(len(ids) for ids in self.prompt_ids))
        self.new_tokens = new_tokens
        self.repeats = repeats
        self.model = load_bare_model(model_dir, getattr(torch, dtype))

    def point(self, batch: int) -> CeilingPoint:
        return measure_point(self.model, batch, self.prompt_tokens, self.new_tokens, self.repeats)

    def prefill_ms(self) -> list[float]:
        """Each prompt's bare prefill alone (best of `repeats`), in prompt order."""
        return [bare_prefill_s(self.model, ids, self.repeats) * 1e3 for ids in self.prompt_ids]

    def prefill_p50_ms(self) -> float:
        """Median over the prompts of their bare prefill alone."""
        return statistics.median(self.prefill_ms())


def measure_ceiling(
    model_dir: str,
    prompts: Sequence[str],
    batch_sizes: Sequence[int],
    new_tokens: int,
    repeats: int,
    dtype: str = "float32",
) -> Ceiling:
    """The ceiling for `prompts` (their mean token length) at each batch size, and their bare
    prefill times. Tokenized as our server and the peer do (`add_special_tokens=True`)."""
    reference = BareReference(model_dir, prompts, new_tokens, repeats, dtype)
    others = OthersCpu()
    points = [reference.point(b) for b in batch_sizes]
    prefill = reference.prefill_ms()
    return Ceiling(dtype, points, prefill, statistics.median(prefill), others.cores())


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.load import PROMPTS
    from handler.testing.smollm2 import ensure_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or str(ensure_model())
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ceiling = measure_ceiling(
        model_dir, PROMPTS, batches, args.new_tokens, args.repeats, args.dtype
    )
    print(json.dumps(asdict(ceiling), indent=2))


if __name__ == "__main__":
    main()
