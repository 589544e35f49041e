"""The Flask app on a real engine, without gunicorn: model faults inside streams.

A fault is injected at the model boundary (`backend.decode` raises); everything above it is the
real generator and routes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient

from handler.api import tgi
from handler.engine import Engine
from handler.server.app import create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState, Stage
from tests.conftest import PROMPTS


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(engine: Engine, metrics: Metrics) -> FlaskClient:
    state = ServerState(engine.settings)
    state.engine = engine
    state.stage = Stage.READY
    return create_app(state, metrics).test_client()


@pytest.fixture
def fail_decode_after(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """`fail_decode_after(n)`: decode steps after the n-th raise."""

    def arm(n: int) -> None:
        real = engine.backend.decode
        calls = iter(range(10**6))

        def decode(*args: object) -> object:
            if next(calls) >= n:
                raise RuntimeError("injected device fault")
            return real(*args)

        monkeypatch.setattr(engine.backend, "decode", decode)

    return arm


def data_events(body: bytes) -> Iterator[str]:
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            yield block[len("data: ") :]


def test_tgi_stream_ends_with_an_error_event_when_the_model_fails(
    client: FlaskClient, fail_decode_after: Callable[[int], None], golden, monkeypatch
) -> None:
    fail_decode_after(3)
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 20}}
    response = client.post("/generate_stream", json=body)
    assert response.status_code == 200
    events = [json.loads(e) for e in data_events(response.data)]
    assert [e["index"] for e in events[:-1]] == [1, 2, 3, 4]  # prefill + 3 decode steps
    assert set(events[-1]) == {"error", "error_type"}
    assert events[-1]["error_type"] == "generation"
    assert PROMPTS[0] not in events[-1]["error"]

    monkeypatch.undo()
    ok = client.post("/generate", json={"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 6}})
    assert ok.json["generated_text"] == golden(PROMPTS[1], 6)


def test_openai_stream_ends_with_an_openai_error_event(
    client: FlaskClient, fail_decode_after: Callable[[int], None]
) -> None:
    fail_decode_after(2)
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 20,
        "temperature": 0,
        "stream": True,
    }
    response = client.post("/v1/chat/completions", json=body)
    events = list(data_events(response.data))
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["type"] == "generation" and last["error"]["code"] == 424
    assert last["error"]["message"]
    assert all("choices" in json.loads(e) for e in events[:-1])


def test_a_failed_non_streaming_request_gets_424(
    client: FlaskClient, fail_decode_after: Callable[[int], None]
) -> None:
    fail_decode_after(0)
    response = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 424
    assert response.json["error_type"] == "generation"
    assert "Traceback" not in response.json["error"]


def test_each_generation_request_counts_once(
    client: FlaskClient,
    metrics: Metrics,
    fail_decode_after: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Received once, ended once (`handler.api.submission.RequestMetrics`): a refusal before
    the prompt is queued, a bug while answering, a model failure (the error an answer or a
    stream ends with is its prompt's failure, not a second one). A body that cannot be read is
    not a generation request yet."""
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 2}}
    assert client.post("/generate", data="{", content_type="application/json").status_code == 400
    assert client.post("/generate", json={"inputs": ""}).status_code == 422

    def broken(*args: object) -> None:
        raise RuntimeError("a formatting bug")

    with monkeypatch.context() as patched:
        patched.setattr(tgi, "response", broken)
        assert client.post("/generate", json=body).status_code == 500

    fail_decode_after(0)
    assert client.post("/generate", json=body).status_code == 424
    stream = client.post("/generate_stream", json=body)
    assert json.loads(list(data_events(stream.data))[-1])["error_type"] == "generation"

    def count(name: str, **labels: str) -> int:
        return metrics.counts.value(name, **labels)

    assert count("tgi_request_count") == 4
    assert count("tgi_request_success") == 1  # the prompt whose answer could not be formatted
    assert count("tgi_request_failure", err="validation") == 1
    assert count("tgi_request_failure", err="server_error") == 1
    assert count("tgi_request_failure", err="generation") == 2
    assert count("tgi_request_failure", err="bad_request") == 0
    assert count("tgi_request_failure", err="cancelled") == 0
