"""Every way a request can fail, on the real server: status, TGI error body, message, recovery.

Each bad request must get its HTTP status and the TGI body `{"error", "error_type"}` whose
message names the parameter at fault and never repeats the prompt; the request after it must
still be served (a greedy 2-token `/generate` equal to `transformers`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import PROMPTS, RunningServer, launch_server, reference_greedy

MARKER = "quokka"
"""In every prompt sent with a bad request; no error body may contain it."""
PROMPT = f"Zanzibar {MARKER} orchestra"
LONG_PROMPT = f"Zanzibar {MARKER} orchestra " * 40
"""Over max_input_tokens (256): 282 tokens."""
API_KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECK_PROMPT = PROMPTS[0]


def gen(inputs: Any = PROMPT, **parameters: Any) -> dict[str, Any]:
    """A generate body: greedy, 2 tokens, unless `parameters` say otherwise."""
    return {"inputs": inputs, "parameters": {"max_new_tokens": 2, **parameters}}


def chat(**fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    return {"messages": messages, "max_tokens": 2, "temperature": 0, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, **fields}


def send(
    url: str, body: Any, headers: dict[str, str] | None = None, stream: bool = False
) -> requests.Response:
    """POST a body: a `str` goes as raw JSON text (NaN...), anything else through `json=`."""
    if isinstance(body, str):
        headers = {"Content-Type": "application/json", **(headers or {})}
        return requests.post(url, data=body, headers=headers, stream=stream, timeout=60)
    return requests.post(url, json=body, headers=headers, stream=stream, timeout=60)


def assert_error(response: requests.Response, status: int, error_type: str, *names: str) -> None:
    """TGI's error answer: JSON `{"error", "error_type"}`, the names in the message."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["error_type"] == error_type, body
    if error_type == "validation":
        assert body["error"].startswith("Input validation error: "), body
    for name in names:
        assert name in body["error"], (name, body)
    assert MARKER not in response.text, body


@pytest.fixture
def still_serves(golden) -> Callable[..., None]:
    """`still_serves(url, headers)`: a normal greedy request after the failure succeeds."""

    def check(url: str, headers: dict[str, str] | None = None) -> None:
        body = {"inputs": CHECK_PROMPT, "parameters": {"max_new_tokens": 2}}
        response = requests.post(f"{url}/generate", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == golden(CHECK_PROMPT, 2)

    return check


# --- TGI generate validation -------------------------------------------------------------------

TGI_CASES = [
    pytest.param(gen(temperature=0), ["temperature"], id="temperature-0"),
    pytest.param(gen(temperature=-0.5), ["temperature"], id="temperature-negative"),
    pytest.param(gen(repetition_penalty=0), ["repetition_penalty"], id="repetition_penalty-0"),
    pytest.param(gen(repetition_penalty=-1), ["repetition_penalty"], id="repetition_penalty-neg"),
    pytest.param(gen(frequency_penalty=-2.5), ["frequency_penalty"], id="frequency_penalty-low"),
    pytest.param(gen(frequency_penalty=2.5), ["frequency_penalty"], id="frequency_penalty-high"),
    pytest.param(gen(top_p=0), ["top_p"], id="top_p-0"),
    pytest.param(gen(top_p=1.0), ["top_p"], id="top_p-1.0"),
    pytest.param(gen(top_p=1.5), ["top_p"], id="top_p-1.5"),
    pytest.param(gen(typical_p=0), ["typical_p"], id="typical_p-0"),
    pytest.param(gen(typical_p=1.0), ["typical_p"], id="typical_p-1.0"),
    pytest.param(gen(typical_p=1.5), ["typical_p"], id="typical_p-1.5"),
    pytest.param(gen(top_k=0), ["top_k"], id="top_k-0"),
    pytest.param(gen(top_k=-3), ["top_k"], id="top_k-negative"),
    pytest.param(gen(max_new_tokens=0), ["max_new_tokens"], id="max_new_tokens-0"),
    pytest.param(gen(stop=["a", "b", "c", "d", "e"]), ["stop", "4"], id="stop-5"),
    pytest.param(gen(top_n_tokens=6), ["top_n_tokens", "5"], id="top_n_tokens-6"),
    pytest.param(gen(""), ["inputs"], id="inputs-empty"),
    pytest.param(gen(truncate=0), ["truncate"], id="truncate-0"),
    pytest.param(gen(truncate=257), ["truncate", "256"], id="truncate-257"),
    pytest.param(gen(LONG_PROMPT), ["inputs", "256"], id="prompt-too-long"),
    pytest.param(gen(max_new_tokens=510), ["max_new_tokens", "512"], id="total-too-long"),
    pytest.param(gen(best_of=2), ["best_of"], id="best_of-2"),
    pytest.param(
        gen(grammar={"type": "json", "value": {"not": {}}}), ["grammar", "not"], id="grammar"
    ),
    pytest.param(gen(watermark=True), ["watermark"], id="watermark"),
    pytest.param(gen(adapter_id="my-adapter"), ["adapter_id"], id="adapter_id"),
    pytest.param(gen(seed=-1), ["seed"], id="seed-negative"),
    pytest.param(gen(42), ["inputs"], id="inputs-number"),
    pytest.param(gen(max_new_tokens="5"), ["max_new_tokens"], id="max_new_tokens-string"),
    pytest.param(
        f'{{"inputs": "{PROMPT}", "parameters": {{"temperature": NaN}}}}',
        ["temperature"],
        id="temperature-NaN",
    ),
    pytest.param(
        f'{{"inputs": "{PROMPT}", "parameters": {{"temperature": Infinity}}}}',
        ["temperature"],
        id="temperature-Infinity",
    ),
    pytest.param({"parameters": {"max_new_tokens": 2}}, ["inputs"], id="inputs-missing"),
    pytest.param([PROMPT], ["object"], id="array-body"),
]


@pytest.mark.parametrize(("body", "names"), TGI_CASES)
def test_generate_rejects_invalid_requests(
    server: RunningServer, still_serves, body: Any, names: list[str]
) -> None:
    assert_error(send(f"{server.url}/generate", body), 422, "validation", *names)
    still_serves(server.url)


ROUTES = [
    pytest.param("/generate_stream", False, id="generate_stream"),
    pytest.param("/", False, id="root"),
    pytest.param("/", True, id="root-stream"),
    pytest.param("/invocations", False, id="invocations"),
    pytest.param("/invocations", True, id="invocations-stream"),
]
SOME_CASES = [
    pytest.param(gen(temperature=0), ["temperature"], id="temperature-0"),
    pytest.param(gen(top_p=1.0), ["top_p"], id="top_p-1.0"),
    pytest.param(gen(top_k=0), ["top_k"], id="top_k-0"),
    pytest.param(gen(stop=["a", "b", "c", "d", "e"]), ["stop"], id="stop-5"),
    pytest.param(gen(""), ["inputs"], id="inputs-empty"),
    pytest.param(gen(LONG_PROMPT), ["inputs", "256"], id="prompt-too-long"),
    pytest.param(gen(max_new_tokens="5"), ["max_new_tokens"], id="max_new_tokens-string"),
    pytest.param({"parameters": {"max_new_tokens": 2}}, ["inputs"], id="inputs-missing"),
]


@pytest.mark.parametrize(("body", "names"), SOME_CASES)
@pytest.mark.parametrize(("path", "stream"), ROUTES)
def test_other_generate_routes_apply_the_same_rules(
    server: RunningServer, still_serves, path: str, stream: bool, body: Any, names: list[str]
) -> None:
    if stream:
        body = {**body, "stream": True}
    assert_error(send(f"{server.url}{path}", body), 422, "validation", *names)
    still_serves(server.url)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", gen(decoder_input_details=True)),
        ("/", {**gen(decoder_input_details=True), "stream": True}),
        ("/invocations", {**gen(decoder_input_details=True), "stream": True}),
    ],
)
def test_decoder_input_details_is_refused_when_streaming(
    server: RunningServer, still_serves, path: str, body: dict
) -> None:
    assert_error(send(f"{server.url}{path}", body), 422, "validation", "decoder_input_details")
    still_serves(server.url)


def test_truncate_keeps_the_last_tokens_of_a_long_prompt(
    server: RunningServer, tokenizer, reference_model
) -> None:
    """The prompt over 256 tokens that is refused without `truncate` is served with it."""
    ids = tokenizer(LONG_PROMPT).input_ids
    assert len(ids) > 256
    body = gen(LONG_PROMPT, truncate=8, details=True, decoder_input_details=True)
    response = send(f"{server.url}/generate", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [t["id"] for t in answer["details"]["prefill"]] == ids[-8:]
    expected = reference_greedy(reference_model, ids[-8:], 2)
    assert [t["id"] for t in answer["details"]["tokens"]] == expected
    assert answer["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)


# --- protocol errors ---------------------------------------------------------------------------

PROTOCOL_CASES = [
    pytest.param(
        "POST",
        "/generate",
        {"data": f'{{"inputs": "{PROMPT}"', "headers": {"Content-Type": "application/json"}},
        400,
        "bad_request",
        ["JSON"],
        id="malformed-json",
    ),
    pytest.param(
        "POST",
        "/generate",
        {"data": "[" * 100_000 + "]" * 100_000, "headers": {"Content-Type": "application/json"}},
        400,
        "bad_request",
        ["nested too deeply", "1,000 levels"],
        id="nested-too-deeply",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {"data": '{"messages": [{"role": "user", "content": "\\ud800"}]}'},
        400,
        "bad_request",
        ["unpaired UTF-16 surrogate"],
        id="escaped-lone-surrogate",
    ),
    pytest.param(
        "POST",
        "/generate",
        {"data": b'{"inputs": "\xed\xa0\x80"}', "headers": {"Content-Type": "application/json"}},
        400,
        "bad_request",
        ["not valid JSON"],
        id="lone-surrogate-bytes",
    ),
    pytest.param(
        "POST",
        "/generate",
        {"data": f"inputs\n{PROMPT}\n", "headers": {"Content-Type": "text/csv"}},
        415,
        "unsupported_media_type",
        ["Content-Type", "text/csv"],
        id="text-csv",
    ),
    pytest.param("GET", "/nope", {}, 404, "not_found", ["/nope"], id="unknown-get"),
    pytest.param(
        "POST", "/v2/generate", {"json": gen()}, 404, "not_found", ["/v2/generate"], id="unknown"
    ),
    pytest.param(
        "GET", "/generate", {}, 405, "method_not_allowed", ["GET", "/generate"], id="get-generate"
    ),
    pytest.param(
        "DELETE", "/info", {}, 405, "method_not_allowed", ["DELETE", "/info"], id="delete-info"
    ),
    pytest.param(
        "POST",
        "/invocations",
        {"json": {"text": PROMPT, "parameters": {"max_new_tokens": 2}}},
        422,
        "validation",
        ["inputs", "messages", "prompt"],
        id="invocations-unknown-shape",
    ),
    pytest.param(
        "POST",
        "/invocations",
        {"json": gen(), "headers": {"Accept": "text/csv"}},
        406,
        "not_acceptable",
        ["Accept", "text/csv"],
        id="invocations-accept-csv",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error_type", "names"), PROTOCOL_CASES
)
def test_protocol_errors(
    server: RunningServer,
    still_serves,
    method: str,
    path: str,
    kwargs: dict,
    status: int,
    error_type: str,
    names: list[str],
) -> None:
    response = requests.request(method, f"{server.url}{path}", timeout=60, **kwargs)
    assert_error(response, status, error_type, *names)
    if status == 405:
        assert method not in response.headers["Allow"]
    still_serves(server.url)


def test_invalid_utf8_is_a_client_error(server: RunningServer, still_serves) -> None:
    raw = b'{"inputs": "\xff\xfe ' + MARKER.encode() + b'"}'
    response = requests.post(
        f"{server.url}/generate",
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"], body
    assert MARKER not in response.text
    still_serves(server.url)


def test_body_over_the_payload_limit_is_413(server: RunningServer, still_serves) -> None:
    body = gen(PROMPT * (2_100_000 // len(PROMPT)))
    data = json.dumps(body).encode()
    assert len(data) > 2_000_000
    response = requests.post(
        f"{server.url}/generate",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413, response.text[:500]
    error = response.json()
    assert set(error) == {"error", "error_type"}, error
    assert error["error_type"] in ("request_entity_too_large", "payload_too_large"), error
    assert "2000000" in error["error"] or "payload" in error["error"].lower(), error
    assert MARKER not in response.text
    still_serves(server.url)


# --- OpenAI routes -----------------------------------------------------------------------------

OPENAI_CASES = [
    pytest.param("/v1/chat/completions", chat(messages=[]), ["messages"], id="chat-no-messages"),
    pytest.param(
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ["tools"],
        id="chat-tools",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}),
        ["response_format.json_schema.schema"],
        id="chat-json-schema-invalid",
    ),
    pytest.param("/v1/chat/completions", chat(n=0), ["`n`"], id="chat-n-0"),
    pytest.param(
        "/v1/chat/completions", chat(logit_bias={"42": 500}), ["logit_bias"], id="chat-logit-bias"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=6),
        ["top_logprobs"],
        id="chat-top-logprobs-6",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(top_logprobs=2),
        ["top_logprobs", "logprobs"],
        id="chat-top-logprobs-alone",
    ),
    pytest.param(
        "/v1/chat/completions", chat(temperature=-1), ["temperature"], id="chat-temperature-neg"
    ),
    pytest.param("/v1/chat/completions", chat(top_p=1.5), ["top_p"], id="chat-top-p-1.5"),
    pytest.param(
        "/v1/chat/completions", chat(max_tokens=600), ["max_tokens"], id="chat-max-tokens-600"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": PROMPT},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ]
        ),
        ["content"],
        id="chat-image-url",
    ),
    pytest.param(
        "/v1/completions", completion(prompt=[PROMPT] * 5), ["prompt", "4"], id="completions-5"
    ),
    pytest.param("/v1/completions", completion(suffix="end"), ["suffix"], id="completions-suffix"),
    pytest.param("/v1/completions", completion(best_of=2), ["best_of"], id="completions-best_of"),
    pytest.param("/invocations", chat(n=0), ["`n`"], id="invocations-chat-n-0"),
    pytest.param("/invocations", completion(suffix="end"), ["suffix"], id="invocations-suffix"),
]


@pytest.mark.parametrize(("path", "body", "names"), OPENAI_CASES)
def test_openai_routes_reject_invalid_requests(
    server: RunningServer, still_serves, path: str, body: dict, names: list[str]
) -> None:
    assert_error(send(f"{server.url}{path}", body), 422, "validation", *names)
    still_serves(server.url)


# --- streams -----------------------------------------------------------------------------------

STREAM_CASES = [
    pytest.param("/generate_stream", gen(temperature=0), {}, id="generate_stream"),
    pytest.param("/", {**gen(temperature=0), "stream": True}, {}, id="root"),
    pytest.param("/invocations", {**gen(temperature=0), "stream": True}, {}, id="invocations"),
    pytest.param(
        "/invocations",
        gen(temperature=0),
        {"Accept": "text/event-stream"},
        id="invocations-accept-sse",
    ),
    pytest.param("/v1/chat/completions", chat(n=0, stream=True), {}, id="chat"),
    pytest.param("/v1/completions", completion(suffix="x", stream=True), {}, id="completions"),
]


@pytest.mark.parametrize(("path", "body", "headers"), STREAM_CASES)
def test_invalid_stream_fails_before_any_event(
    server: RunningServer, still_serves, path: str, body: dict, headers: dict
) -> None:
    """A stream that fails validation is a plain JSON 422, not an event stream."""
    response = send(f"{server.url}{path}", body, headers=headers, stream=True)
    assert not response.headers["Content-Type"].startswith("text/event-stream")
    assert_error(response, 422, "validation")
    assert "data:" not in response.text
    still_serves(server.url)


# --- admission and authentication (one server: 2 slots, 2 requests in flight, an API key) -----


@pytest.fixture(scope="module")
def guarded(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = launch_server(
        smollm2_dir,
        tmp_path_factory.mktemp("guarded"),
        "--api-key",
        API_KEY,
        MAX_CONCURRENT_REQUESTS="2",
        MAX_BATCH_SIZE="2",
    )
    yield running
    assert running.stop() == 0, running.log()


def test_third_request_is_overloaded_while_two_streams_run(
    guarded: RunningServer, still_serves
) -> None:
    long = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 200}}  # counting: no EOS
    streams: list[requests.Response] = []
    lines: list[Iterator[bytes]] = []
    try:
        for _ in range(2):
            response = send(f"{guarded.url}/generate_stream", long, headers=AUTH, stream=True)
            streams.append(response)
            assert response.status_code == 200, response.text
            # Keep the line iterator: a dropped `iter_lines` generator closes the connection.
            lines.append(response.iter_lines())
            first = next(line for line in lines[-1] if line.startswith(b"data:"))
            assert json.loads(first[len(b"data:") :])["index"] == 1
        for path, body in [
            ("/generate", gen()),
            ("/generate_stream", gen()),
            ("/v1/chat/completions", chat()),
        ]:
            started = time.monotonic()
            response = send(f"{guarded.url}{path}", body, headers=AUTH)
            assert time.monotonic() - started < 5
            assert_error(response, 429, "overloaded", "overloaded")
    finally:
        for response in streams:
            response.close()
    # The server notices the closed connections at its next token and frees both requests.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = send(f"{guarded.url}/generate", gen(), headers=AUTH)
        if probe.status_code != 429:
            break
        time.sleep(0.2)
    still_serves(guarded.url, AUTH)


def test_api_key_guards_every_route_but_health_checks(guarded: RunningServer, still_serves) -> None:
    for path in ("/ping", "/health"):
        assert requests.get(f"{guarded.url}{path}", timeout=10).status_code == 200, path
    routes = [("POST", "/generate"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/v1/models")]
    wrong = [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": API_KEY},
        {"Authorization": f"Bearer {API_KEY}x"},
    ]
    for method, path in routes:
        body = gen() if method == "POST" else None
        for headers in wrong:
            response = requests.request(
                method, f"{guarded.url}{path}", json=body, headers=headers, timeout=60
            )
            assert_error(response, 401, "unauthorized", "Authorization")
            assert API_KEY not in response.text
        response = requests.request(
            method, f"{guarded.url}{path}", json=body, headers=AUTH, timeout=60
        )
        assert response.status_code == 200, (path, response.text)
    still_serves(guarded.url, AUTH)
    log = guarded.log()
    assert API_KEY not in log
    assert "wrong-key" not in log
