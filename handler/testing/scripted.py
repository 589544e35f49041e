"""A model backend and a tokenizer with no model behind them, for testing the scheduler.

`ScriptedBackend` implements `ModelBackend` (and `MixedBackend` and `PrefixBackend` when asked):
every row's next
token follows a rule (by default the previous token plus one, skipping the end token), each call
is recorded, and a test can make a call raise or run a callback (to cancel a request while its
prefill runs, say). `ScriptedTokenizer` writes token i as one character, so texts are easy to
assert. With both, a `Generator` runs its real planner, slots, token selection and events in
milliseconds, driven by `Generator.step()` without a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from transformers import PreTrainedTokenizerBase

from handler.generation.generator import Generator
from handler.model.base import ModelShape, PrefillOutput
from handler.model.params import SamplingParams

__all__ = ["Call", "ScriptedBackend", "ScriptedTokenizer", "scripted_generator"]

EOS = 0
ALPHABET = "ÿabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
"""Token i is `ALPHABET[i]`; token 0 is the end token (it writes nothing)."""


class ScriptedTokenizer:
    """Just what the generator uses of a tokenizer: token i is one character."""

    eos_token_id = EOS
    all_special_ids: ClassVar[list[int]] = [EOS]

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        return "".join(
            ALPHABET[i % len(ALPHABET)] for i in ids if not (skip_special_tokens and i == EOS)
        )

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]


@dataclass
class Call:
    """One backend call: `method` (`prefill`, `decode` or `mixed`), its decode rows and its
    prefill rows."""

    method: str
    decode: list[int] = field(default_factory=list)
    prefill: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    """With prefix reuse, the positions each prefill row already held (`copy` calls: `[source,
    dest, length]`)."""


def _next_token(previous: int, vocab: int) -> int:
    return previous % (vocab - 1) + 1  # 1, 2, ..., vocab - 1, 1, ...: never the end token


class ScriptedBackend:
    """A `ModelBackend` whose logits pick `next_token(slot, tokens so far)` for each row."""

    def __init__(
        self,
        batch_size: int = 4,
        sequence_length: int = 64,
        vocab_size: int = len(ALPHABET),
        mixed_steps: bool = False,
        next_token: Callable[[int, list[int]], int] | None = None,
        logits: Callable[[list[int]], torch.Tensor] | None = None,
        prompt_logprobs: bool = True,
        prefix_reuse: bool = False,
        prefix_rows: int = 0,
    ) -> None:
        """`logits(slots)`, when given, answers every call instead of the script (`[n,
        vocab]`, with nothing recorded of the rows: a forward that costs nothing)."""
        self.shape = ModelShape(
            batch_size,
            sequence_length,
            vocab_size,
            "cpu",
            "float32",
            mixed_steps=mixed_steps,
            prompt_logprobs=prompt_logprobs,
            prefix_reuse=prefix_reuse,
            prefix_rows=prefix_rows,
        )
        self.next_token = next_token or (lambda _slot, ids: _next_token(ids[-1], vocab_size))
        self.given = logits
        self.rows: dict[int, list[int]] = {}
        """Per slot, the tokens in its cache."""
        self.calls: list[Call] = []
        self.before: dict[str, Callable[[Call], None]] = {}
        """Per method, a callback run before the call computes (it may raise: the step fails)."""

    def assign(self, slot: int, params: SamplingParams) -> None:
        pass

    def _logits(self, slots: list[int]) -> torch.Tensor:
        """`[n, vocab]`: 0 at each row's next token, -10 elsewhere."""
        if self.given is not None:
            return self.given(slots)
        logits = torch.full((len(slots), self.shape.vocab_size), -10.0)
        for row, slot in enumerate(slots):
            logits[row, self.next_token(slot, self.rows[slot])] = 0.0
        return logits

    def _enter(self, call: Call) -> None:
        self.calls.append(call)
        hook = self.before.get(call.method)
        if hook is not None:
            hook(call)

    def _fill(self, prompts: list[list[int]], seq_ids: list[int]) -> PrefillOutput:
        if self.given is None:
            for prompt, slot in zip(prompts, seq_ids, strict=True):
                self.rows[slot] = list(prompt)
        return PrefillOutput(self._logits(seq_ids), [None] * len(seq_ids))

    def _advance(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: list[int]
    ) -> torch.Tensor:
        if self.given is None:
            for token, position, slot in zip(
                input_ids.tolist(), position_ids.tolist(), seq_ids, strict=True
            ):
                # As strict as a real cache: the row holds every position before this one
                # (those after it, left by an earlier request, are overwritten or unread).
                assert len(self.rows[slot]) >= position, (slot, position, len(self.rows[slot]))
                self.rows[slot][position:] = [token]
        return self._logits(seq_ids)

    def prefill(
        self,
        input_ids: list[list[int]],
        seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
        cached: list[int] | None = None,
    ) -> PrefillOutput:
        held = cached or [0] * len(seq_ids)
        if any(held):
            assert self.shape.prefix_reuse, "prefix reuse asked of a backend without it"
        self._enter(Call("prefill", prefill=list(seq_ids), cached=list(held) if any(held) else []))
        for prompt, slot, n in zip(input_ids, seq_ids, held, strict=True):
            # As strict as a real cache: the row must hold exactly what is claimed.
            row = self.rows.get(slot, [])
            assert n < len(prompt) and row[:n] == prompt[:n] and len(row) >= n, (slot, n)
        return self._fill(input_ids, seq_ids)

    def copy_prefix(self, source: int, dest: int, length: int) -> None:
        rows = self.shape.batch_size + self.shape.prefix_rows
        assert self.shape.prefix_reuse and source < rows and dest < rows, (source, dest)
        assert length <= len(self.rows[source]), (source, length)
        self._enter(Call("copy", cached=[source, dest, length]))
        self.rows[dest] = self.rows[source][:length]

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: list[int]
    ) -> torch.Tensor:
        self._enter(Call("decode", decode=list(seq_ids)))
        return self._advance(input_ids, position_ids, seq_ids)

    def mixed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: list[int],
        prompts: list[list[int]],
        prompt_seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
    ) -> tuple[torch.Tensor, PrefillOutput]:
        self._enter(Call("mixed", decode=list(seq_ids), prefill=list(prompt_seq_ids)))
        return self._advance(input_ids, position_ids, seq_ids), self._fill(prompts, prompt_seq_ids)


def scripted_generator(backend: ScriptedBackend | None = None, **options: Any) -> Generator:
    """A generator over `backend` (a 4-slot `ScriptedBackend` by default), not started: drive
    it with `step()`. `options` go to `Generator` (`max_batch_prefill_tokens`...)."""
    tokenizer = cast(PreTrainedTokenizerBase, ScriptedTokenizer())
    return Generator(
        backend or ScriptedBackend(), tokenizer, eos_token_ids=frozenset({EOS}), **options
    )
