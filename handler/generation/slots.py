"""A slot is one KV cache row and the request occupying it, as an explicit state machine.

    EMPTY --assign--> PREFILL --prefilled--> DECODE --release--> EMPTY
      ^                  |                                          |
      +----release-------+------------------------------------------+

Only the scheduler thread touches slots.
"""

from __future__ import annotations

import time
from enum import Enum

from transformers import PreTrainedTokenizerBase

from handler.generation.detokenize import IncrementalDetokenizer
from handler.generation.request import RequestHandle, Token
from handler.generation.stopping import FinishReason, StoppingCriteria


class SlotState(Enum):
    EMPTY = "empty"
    PREFILL = "prefill"
    """Assigned a request whose prompt is not yet in the cache."""
    DECODE = "decode"
    """Prompt in the cache; generating one token per step."""


class SlotStateError(RuntimeError):
    """A transition the state machine does not allow (a scheduler bug)."""


class Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.state = SlotState.EMPTY
        self.handle: RequestHandle | None = None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.stopping: StoppingCriteria | None = None
        self.generated: list[int] = []
        self.text_parts: list[str] = []
        self.seed: int | None = None
        self.prefill_tokens: list[Token] = []
        self.prefill_top: list[list[Token]] = []
        self.started_at = 0.0

    def _expect(self, *states: SlotState) -> None:
        if self.state not in states:
            raise SlotStateError(f"slot {self.index} is {self.state.value}, expected {states}")

    def assign(
        self,
        handle: RequestHandle,
        tokenizer: PreTrainedTokenizerBase,
        stopping: StoppingCriteria,
        seed: int | None,
    ) -> None:
        self._expect(SlotState.EMPTY)
        self.state = SlotState.PREFILL
        self.handle = handle
        self.detokenizer = IncrementalDetokenizer(tokenizer, handle.request.prompt_ids)
        self.stopping = stopping
        self.generated = []
        self.text_parts = []
        self.seed = seed
        self.prefill_tokens = []
        self.prefill_top = []
        self.started_at = time.monotonic()

    @property
    def request(self) -> RequestHandle:
        """The request that holds the slot (a slot that is not empty)."""
        if self.handle is None:
            raise SlotStateError(f"slot {self.index} is empty")
        return self.handle

    def prefilled(self) -> None:
        self._expect(SlotState.PREFILL)
        self.state = SlotState.DECODE

    def release(self) -> RequestHandle:
        """Free the slot; return the request that held it."""
        handle = self.request
        self.state = SlotState.EMPTY
        self.handle = None
        self.detokenizer = None
        self.stopping = None
        return handle

    @property
    def total_tokens(self) -> int:
        """Prompt + generated tokens (the last generated one is not in the cache yet)."""
        return len(self.request.request.prompt_ids) + len(self.generated)

    def append(self, token_id: int, special: bool) -> tuple[str, FinishReason | None]:
        """Record a generated token; return its text, and the finish reason if it ends here."""
        self._expect(SlotState.DECODE)
        assert self.detokenizer is not None and self.stopping is not None  # set while held
        self.generated.append(token_id)
        piece = self.detokenizer.push(token_id)
        if not special:
            self.text_parts.append(piece)
        reason = self.stopping(token_id, piece, len(self.generated), self.total_tokens)
        return piece, reason

    def final_text(self) -> str:
        """The output: exactly the concatenation of the streamed pieces. Text still held back
        at the end can only be an incomplete character, which is dropped."""
        return "".join(self.text_parts)
