"""What goes into the generator (a validated request) and what comes out (events)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from handler.errors import GenerationError, ServingError
from handler.generation.stopping import FinishReason
from handler.model.params import SamplingParams

if TYPE_CHECKING:
    from handler.generation.grammar import Constraint

_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    """A tokenized, validated request."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_sequences: list[str] = field(default_factory=list)
    decoder_input_details: bool = False
    """Report the prompt tokens with their log-probabilities."""
    ignore_eos: bool = False
    """Generate `max_new_tokens` regardless of EOS."""
    stop_token_ids: frozenset[int] = frozenset()
    """Tokens that end the request like EOS does (vLLM's `stop_token_ids`)."""
    constraint: Constraint | None = None
    """The grammar the output must follow (structured output, tool calls), compiled while
    validating; the token selector masks every other token."""
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    """The text this token adds to the output; for special tokens, the token's own text."""
    logprob: float | None
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    """One generated token."""

    token: Token
    top_tokens: list[Token]
    last: bool = False
    """True when this token ends the request: its `FinalEvent` follows at once."""


@dataclass(frozen=True)
class FinalEvent:
    """The request finished. `text` is the concatenation of the non-special token texts."""

    finish_reason: FinishReason
    text: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    prefill: list[Token]
    """Prompt tokens with log-probabilities when `decoder_input_details`, else empty."""
    prefill_top: list[list[Token]]
    """With `prefill`, each prompt position's `top_n_tokens` most likely tokens (none for the
    first), else empty."""
    queue_time: float
    """Seconds between submission and the start of prefill."""
    inference_time: float
    """Seconds between the start of prefill and the end."""


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; no more events follow."""

    error: ServingError


Event = TokenEvent | FinalEvent | ErrorEvent


class RequestHandle:
    """The caller's side of a submitted request: iterate events, or cancel."""

    def __init__(self, request: GenerationRequest, on_cancel: Callable[[], None]) -> None:
        self.request = request
        self.submitted_at = time.monotonic()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next decode step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel()

    def put(self, event: Event) -> None:
        self._events.put(event)

    def poll(self, timeout: float) -> Event | None:
        """The next event, or None when none arrives within `timeout` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events until the final or error event. `timeout` bounds each wait."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise GenerationError("Timed out waiting for the next token") from None
            yield event
            if not isinstance(event, TokenEvent):
                return

    def result(self, timeout: float | None = None) -> tuple[list[TokenEvent], FinalEvent]:
        """Wait for the whole answer. Raises the request's error if it failed."""
        return collect(
            self.events(timeout),
            GenerationError("The generator ended the request without a final event"),
        )


def collect(
    events: Iterator[Event], unfinished: ServingError
) -> tuple[list[TokenEvent], FinalEvent]:
    """The token events and the final event of a request; raises its error if it failed, and
    `unfinished` if the events end without a final one."""
    tokens: list[TokenEvent] = []
    for event in events:
        if isinstance(event, TokenEvent):
            tokens.append(event)
        elif isinstance(event, FinalEvent):
            return tokens, event
        else:
            raise event.error
    raise unfinished
