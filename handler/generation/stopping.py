"""When a request stops: max_new_tokens, EOS, stop sequences, the sequence-length cap."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handler.generation.grammar import Constraint


class FinishReason(StrEnum):
    """TGI's finish reasons (OpenAI maps `eos_token` and `stop_sequence` to `stop`)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class StoppingCriteria:
    """Checks one request after each generated token."""

    def __init__(
        self,
        max_new_tokens: int,
        stop_sequences: list[str],
        end_token_ids: frozenset[int],
        max_total_tokens: int,
        min_tokens: int = 0,
        constraint: Constraint | None = None,
    ) -> None:
        """`end_token_ids`: tokens that end the request (EOS unless ignored, `stop_token_ids`);
        neither they nor a stop sequence end it before `min_tokens` tokens. `constraint`: the
        request's grammar, which ends it once it can take no more tokens (as EOS would)."""
        self.max_new_tokens = max_new_tokens
        self.stop_sequences = [s for s in stop_sequences if s]
        self.end_token_ids = end_token_ids
        self.max_total_tokens = max_total_tokens
        self.min_tokens = min_tokens
        self.constraint = constraint
        self.text = ""

    def __call__(
        self, token_id: int, piece: str, generated: int, total: int
    ) -> FinishReason | None:
        """token_id/piece: the new token and its text; generated/total: counts including it."""
        early = generated < self.min_tokens
        if token_id in self.end_token_ids and not early:
            return FinishReason.EOS_TOKEN
        if self.constraint is not None and self.constraint.finished:
            return FinishReason.EOS_TOKEN
        if piece and self.stop_sequences:
            start = len(self.text)
            self.text += piece
            # A stop sequence may span the boundary between earlier text and the new piece.
            longest = max(len(s) for s in self.stop_sequences)
            window = self.text[max(0, start - longest + 1) :]
            if not early and any(stop in window for stop in self.stop_sequences):
                return FinishReason.STOP_SEQUENCE
            self.text = self.text[-longest:]  # only a tail can still start a stop sequence
        if generated >= self.max_new_tokens or total >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None
