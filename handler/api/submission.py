"""A generation request between its validation and its answer: its events, its cancellation,
its log line, and how it counts in the metrics.

Every entry point that generates (the HTTP routes, the SageMaker toolkit's `predict_fn`,
`EndpointHandler`) goes through `RequestMetrics` and `Submission`, the only code that counts
requests: each request is received once and ends as successes, failures or cancellations
counted here, never by an error handler. (Under MMS, a body that the toolkit's `input_fn`
cannot decode is refused before `predict_fn`, and so is not counted.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Protocol

from handler.errors import ServerError, ServingError, UnavailableError
from handler.generation.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    RequestHandle,
    TokenEvent,
    collect,
)

logger = logging.getLogger("handler.requests")

POLL_SECONDS = 0.5
"""How often a request waiting for its first token checks that its client is still there."""


class RequestCounters(Protocol):
    """Where request outcomes are counted (`handler.server.metrics.Metrics`, under TGI's
    names)."""

    def received(self) -> None: ...

    def succeeded(self, total: float, final: FinalEvent) -> None:
        """A request answered in `total` seconds, as `final` tells."""

    def failed(self, error_type: str) -> None: ...


class RequestMetrics:
    """How one generation request counts in the metrics.

    Created when the request is received (`tgi_request_count`). Each prompt it submits ends as
    one success, one failure (by error type) or one cancellation, counted by its `Submission`.
    Used as a context manager around validating, submitting and answering, it counts an error
    that escapes as the request's one failure (`server_error` for an unexpected exception),
    unless a failure of one of its prompts was counted already: that error is then the one
    that ends the request (a prompt that failed, or a client that went away).
    """

    def __init__(self, counters: RequestCounters, received_at: float | None = None) -> None:
        self.counters = counters
        self.received_at = time.monotonic() if received_at is None else received_at
        """`time.monotonic()` when the request arrived: durations are counted from there."""
        self._failure_counted = False
        counters.received()

    def __enter__(self) -> RequestMetrics:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not isinstance(error, Exception) or self._failure_counted:
            return
        self.failed(error.error_type if isinstance(error, ServingError) else ServerError.error_type)

    def succeeded(self, final: FinalEvent) -> None:
        self.counters.succeeded(time.monotonic() - self.received_at, final)

    def failed(self, error_type: str) -> None:
        """Count a failure (`cancelled` for a prompt whose client went away)."""
        self._failure_counted = True
        self.counters.failed(error_type)


class Submission:
    """One submitted prompt as the code that answers it sees it: events until the end, the
    client's disconnect cancelling it, and its metrics and log line when it ends."""

    def __init__(
        self,
        handle: RequestHandle,
        route: str,
        metrics: RequestMetrics,
        client_gone: Callable[[], bool] = lambda: False,
        send_timeout: float | None = None,
    ) -> None:
        """`route` names the request in the log. `client_gone` says that the client closed its
        connection; `send_timeout`: seconds after which a blocked write to the client fails
        (the HTTP server's), so that a consumer that stops that long after an event was
        handed out means a client that stopped reading."""
        self.handle = handle
        self.route = route
        self.metrics = metrics
        self.client_gone = client_gone
        self.send_timeout = send_timeout
        self.ended = False
        self._yielded_at: float | None = None

    def events(self) -> Iterator[Event]:
        """Events up to the final or error event. If the consumer stops early (the client went
        away, or a write to it failed or timed out) the request is cancelled and its slot
        freed."""
        try:
            while True:
                event = self.handle.poll(POLL_SECONDS)
                checkpoint = event is None or (isinstance(event, TokenEvent) and not event.last)
                if checkpoint and self.client_gone():
                    self._yielded_at = None  # gone, not stalled
                    return
                if event is None:
                    continue
                if isinstance(event, FinalEvent):
                    self.ended = True
                    self._finished(event)
                elif isinstance(event, ErrorEvent):
                    self.ended = True
                    self._failed(event.error)
                self._yielded_at = time.monotonic()
                yield event
                if self.ended:
                    return
        finally:
            self.abandon()

    def abandon(self, reason: str | None = None) -> None:
        """Cancel the request unless it has ended (its client went away, stopped reading, or
        the answer could not be formatted): frees its slot, counts and logs why."""
        if self.ended:
            return
        self.ended = True
        self.handle.cancel()
        self.metrics.failed("cancelled")
        if reason is None:
            reason = (
                f"the client stopped reading (a write blocked for {self.send_timeout:g} s)"
                if self.send_timeout is not None
                and self._yielded_at is not None
                and time.monotonic() - self._yielded_at >= self.send_timeout
                else "the client disconnected"
            )
        logger.info(
            "request %s route=%s cancelled: %s", self.handle.request.request_id, self.route, reason
        )

    def result(self) -> tuple[list[TokenEvent], FinalEvent]:
        return collect(self.events(), UnavailableError("The request was cancelled"))

    def _finished(self, final: FinalEvent) -> None:
        self.metrics.succeeded(final)
        logger.info(
            "request %s route=%s prompt_tokens=%d generated_tokens=%d finish_reason=%s "
            "queue_time=%.3fs inference_time=%.3fs",
            self.handle.request.request_id,
            self.route,
            final.prompt_tokens,
            final.generated_tokens,
            final.finish_reason.value,
            final.queue_time,
            final.inference_time,
        )

    def _failed(self, error: ServingError) -> None:
        self.metrics.failed(error.error_type)
        logger.warning(
            "request %s route=%s failed (%d %s): %s",
            self.handle.request.request_id,
            self.route,
            error.status,
            error.error_type,
            error.message,
        )
