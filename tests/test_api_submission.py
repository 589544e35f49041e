"""`handler.api.submission`: how a generation request counts in the metrics, in milliseconds,
with request handles fed scripted events (no model, no generator).

Every request is received once; each of its prompts ends as one success, failure or
cancellation; an error that ends the request otherwise counts once, and never again when a
prompt's failure already counted.
"""

from __future__ import annotations

import logging

import pytest

from handler.api.submission import RequestMetrics, Submission
from handler.errors import GenerationError, ServingError, UnavailableError, ValidationError
from handler.generation import request as events
from handler.generation.stopping import FinishReason
from handler.server.metrics import Metrics


def handle() -> events.RequestHandle:
    return events.RequestHandle(
        events.GenerationRequest([1, 2, 3], max_new_tokens=2), on_cancel=lambda: None
    )


def token(last: bool = False) -> events.TokenEvent:
    return events.TokenEvent(events.Token(7, "a", -0.5, special=False), [], last=last)


def final() -> events.FinalEvent:
    return events.FinalEvent(FinishReason.LENGTH, "aa", 2, 3, None, [], [], 0.01, 0.02)


def counts(metrics: Metrics) -> dict[str, int]:
    """The request counts that are not zero, as `/metrics` names them."""
    found = {
        "count": metrics.counts.value("tgi_request_count"),
        "success": metrics.counts.value("tgi_request_success"),
    }
    for err in ("validation", "generation", "cancelled", "server_error", "healthcheck"):
        found[err] = metrics.counts.value("tgi_request_failure", err=err)
    return {name: value for name, value in found.items() if value}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def test_a_request_that_finishes_counts_one_success(metrics: Metrics) -> None:
    with RequestMetrics(metrics) as counted:
        submitted = handle()
        for event in (token(), token(last=True), final()):
            submitted.put(event)
        tokens, end = Submission(submitted, "/generate", counted).result()
    assert len(tokens) == 2 and end.generated_tokens == 2
    assert counts(metrics) == {"count": 1, "success": 1}
    assert "tgi_request_generated_tokens_sum 2.0" in metrics.render().decode()


def test_a_refusal_before_submitting_counts_one_failure(metrics: Metrics) -> None:
    with pytest.raises(ValidationError), RequestMetrics(metrics):
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    assert counts(metrics) == {"count": 1, "validation": 1}


def test_an_unexpected_exception_counts_as_a_server_error(metrics: Metrics) -> None:
    with pytest.raises(KeyError), RequestMetrics(metrics):
        raise KeyError("a bug")
    assert counts(metrics) == {"count": 1, "server_error": 1}


def test_a_failed_prompt_counts_once_though_its_error_ends_the_request(
    metrics: Metrics,
) -> None:
    with pytest.raises(GenerationError), RequestMetrics(metrics) as counted:
        submitted = handle()
        submitted.put(token())
        submitted.put(events.ErrorEvent(GenerationError("the model failed")))
        Submission(submitted, "/generate", counted).result()
    assert counts(metrics) == {"count": 1, "generation": 1}


def test_a_request_of_two_prompts_counts_each_prompt(metrics: Metrics) -> None:
    """One prompt fails; the route cancels the other (as a non-streaming OpenAI call does)."""
    with pytest.raises(ServingError), RequestMetrics(metrics) as counted:
        failing, waiting = handle(), handle()
        failing.put(events.ErrorEvent(GenerationError("the model failed")))
        submissions = [Submission(h, "/v1/completions", counted) for h in (failing, waiting)]
        try:
            for submission in submissions:
                submission.result()
        finally:
            for submission in submissions:
                submission.abandon("another prompt of the request failed")
    assert waiting.cancelled and not failing.cancelled
    assert counts(metrics) == {"count": 1, "generation": 1, "cancelled": 1}


def test_a_client_that_goes_away_counts_one_cancellation(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """The request ends with `UnavailableError` (nobody reads it): not a second failure."""
    caplog.set_level(logging.INFO, "handler.requests")
    submitted = handle()
    submitted.put(token())
    with pytest.raises(UnavailableError), RequestMetrics(metrics) as counted:
        Submission(submitted, "/generate", counted, client_gone=lambda: True).result()
    assert submitted.cancelled
    assert counts(metrics) == {"count": 1, "cancelled": 1}
    assert "cancelled: the client disconnected" in caplog.text


@pytest.mark.parametrize(
    ("send_timeout", "reason"),
    [
        (0.0, "the client stopped reading (a write blocked for 0 s)"),
        (None, "the client disconnected"),  # no writes to time out (the toolkit's worker)
    ],
)
def test_a_consumer_that_stops_after_an_event_is_a_client_that_stopped_reading(
    metrics: Metrics, caplog: pytest.LogCaptureFixture, send_timeout: float | None, reason: str
) -> None:
    caplog.set_level(logging.INFO, "handler.requests")
    submitted = handle()
    submitted.put(token())
    with RequestMetrics(metrics) as counted:
        submission = Submission(submitted, "/generate_stream", counted, send_timeout=send_timeout)
        events = submission.events()
        next(events)
        events.close()  # as a failed write to the client ends the stream
    assert counts(metrics) == {"count": 1, "cancelled": 1}
    assert f"route=/generate_stream cancelled: {reason}" in caplog.text
