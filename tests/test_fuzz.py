"""Hostile input against the real server, thousands of requests with fixed seeds.

Every route is fuzzed from the server's own `/openapi.json` with schemathesis (schema-valid
bodies with extreme values, and schema-violating ones), then with raw bodies no schema
describes (bytes, invalid UTF-8, NaN, huge numbers, deep nesting, wrong content types) from
hypothesis strategies. Every answer must be below 500, arrive within `TIMEOUT` seconds, match
the document, and never carry a traceback, the prompt (`MARKER`) or `HF_TOKEN`. Afterwards the
server is alive, every slot is free and a greedy request gets the `transformers` answer.

Generations are kept to one token (`tame`): on two busy cores a token costs up to 0.3 s, and the
point is the paths into and out of the generator, not long answers. Limits, faults and slow
clients are in `test_reliability.py`; the hand-written bad requests in `test_server_errors.py`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import PROMPTS, RunningServer, launch_server

pytestmark = pytest.mark.slow

MARKER = "quokka"
"""Put into every prompt sent; no error body and no log line may contain it."""
SECRET = "hf_fuzzSecretToken0123456789"
"""The server's HF_TOKEN; nothing it sends or logs may contain it."""
TIMEOUT = 60
"""An answer slower than this is a hang (a one-token generation takes well under 5 s)."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
GENERATION_ROUTES = (
    "/generate",
    "/generate_stream",
    "/",
    "/invocations",
    "/v1/chat/completions",
    "/v1/completions",
)
SCHEMA_EXAMPLES = {"generation": (40, 100), "tokenize": (80, 80), "get": (5, 0)}
"""Examples per operation, (schema-valid, schema-violating), by kind of operation."""
RAW_EXAMPLES = 900


def fixed(examples: int) -> settings:
    """Hypothesis settings: a fixed seed, no example database, no shrinking (a failure is
    recorded with its body instead of raising, so nothing needs shrinking)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Tally:
    """Requests sent, statuses seen, and every broken promise found."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def check(self, what: str, response: requests.Response) -> None:
        """The promises every answer keeps, whatever was sent."""
        self.sent += 1
        self.statuses[response.status_code] += 1
        text = response.text
        problems = []
        if response.status_code >= 500:
            problems.append(f"status {response.status_code}")
        if "Traceback" in text or 'File "' in text:
            problems.append("a traceback in the answer")
        if SECRET in text:
            problems.append("HF_TOKEN in the answer")
        if response.status_code >= 400:
            if MARKER in text:
                problems.append("the prompt in an error")
            try:
                error = response.json()
            except ValueError:
                problems.append("an error that is not JSON")
            else:
                if not (isinstance(error, dict) and {"error", "error_type"} <= set(error)):
                    problems.append("an error without TGI's body")
        elif response.headers.get("Content-Type", "").startswith("text/event-stream"):
            problems += stream_problems(text)
        if problems:
            self.failures.append(f"{what} -> {response.status_code} {text[:300]!r}: {problems}")

    def timed_out(self, what: str, error: Exception) -> None:
        self.sent += 1
        self.failures.append(f"{what}: no answer ({type(error).__name__}: {error})")

    def report(self, name: str) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return f"{name}: {self.sent} requests ({statuses}), {len(self.failures)} failures"


def stream_problems(text: str) -> list[str]:
    """A stream's events: each ends with a blank line; an error event is the last one and
    never reflects the prompt."""
    problems = []
    if not text.endswith("\n\n"):
        problems.append("a stream not ended by a blank line")
    events = [block for block in text.split("\n\n") if block.startswith("data: ")]
    for index, block in enumerate(events):
        if block == "data: [DONE]":
            continue
        event = json.loads(block[len("data: ") :])
        if "error" in event:
            if index != len(events) - 1:
                problems.append("events after an error event")
            if MARKER in block:
                problems.append("the prompt in an error event")
    return problems


# --- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """2 slots of 128 tokens (prompts up to 64), with a secret HF_TOKEN to look for."""
    running = launch_server(
        smollm2_dir,
        tmp_path_factory.mktemp("fuzz"),
        MAX_BATCH_SIZE="2",
        MAX_TOTAL_TOKENS="128",
        MAX_CONCURRENT_REQUESTS="8",
        HF_TOKEN=SECRET,
    )
    yield running
    assert running.stop() == 0, running.log()[-5000:]


@pytest.fixture
def recovered(golden) -> Callable[[RunningServer], None]:
    """`recovered(server)`: alive, every slot free, nothing queued, a greedy answer right."""

    def check(server: RunningServer) -> None:
        assert server.process.poll() is None, server.log()[-5000:]
        assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
        deadline = time.monotonic() + 15
        while True:
            gauges = metrics(server)
            busy = gauges["tgi_batch_current_size"], gauges["tgi_queue_size"]
            if busy == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert busy == (0, 0), f"slots in use or requests queued after the fuzzing: {busy}"
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
        answer = requests.post(f"{server.url}/generate", json=body, timeout=TIMEOUT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["generated_text"] == golden(PROMPTS[0], 4)

    return check


def metrics(server: RunningServer) -> dict[str, float]:
    values = {}
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# --- keeping generations short and marking prompts ------------------------------------------------


def _one(value: Any) -> Any:
    """1 for a token budget the server would accept (or none), else the hostile value as is."""
    if value is None or (type(value) is int and 1 <= value <= 128):
        return 1
    return value


def _marked(text: Any) -> Any:
    return MARKER + text if isinstance(text, str) else text


def tame(body: Any) -> Any:
    """The body with `MARKER` in front of every prompt and every acceptable token budget set
    to one token; hostile values (wrong types, out of range) are kept, so they still fail."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if "inputs" in body:
        body["inputs"] = _marked(body["inputs"])
        parameters = body.get("parameters")
        if parameters is None:
            parameters = {}
        if isinstance(parameters, dict):
            max_new_tokens = _one(parameters.get("max_new_tokens"))
            body["parameters"] = {**parameters, "max_new_tokens": max_new_tokens}
    if isinstance(body.get("messages"), list):
        body["messages"] = [
            {**m, "content": _marked(m.get("content"))} if isinstance(m, dict) else m
            for m in body["messages"]
        ]
    if "prompt" in body:
        prompt = body["prompt"]
        body["prompt"] = (
            [_marked(p) for p in prompt] if isinstance(prompt, list) else (_marked(prompt))
        )
    if "messages" in body or "prompt" in body:
        if body.get("max_completion_tokens") is not None:
            body["max_completion_tokens"] = _one(body["max_completion_tokens"])
        else:
            body["max_tokens"] = _one(body.get("max_tokens"))
    return body


# --- schemathesis: every operation of /openapi.json ---------------------------------------------


def kind(path: str, method: str) -> str:
    if method == "GET":
        return "get"
    return "generation" if path in GENERATION_ROUTES else "tokenize"


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    examples: int,
    session: requests.Session,
    tally: Tally,
) -> None:
    """Send `examples` generated cases of one operation; record what each answer breaks."""
    if not examples:
        return
    label = f"{operation.label} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @fixed(examples)
    def fuzz(case: schemathesis.Case) -> None:
        case.body = tame(case.body)
        what = f"{label}: {case.as_curl_command()[:500]}"
        try:
            response = case.call(session=session, timeout=TIMEOUT)
        except requests.RequestException as error:
            tally.timed_out(what, error)
            return
        tally.check(what, response)
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as error:
            tally.failures.append(f"{what}: {str(error)[:1500]}")

    fuzz()


def test_every_operation_of_the_openapi_document(fuzzed: RunningServer, recovered) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    session = requests.Session()
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {
        f"{method.upper()} {path}"
        for path, methods in requests.get(f"{fuzzed.url}/openapi.json", timeout=10)
        .json()["paths"]
        .items()
        for method in methods
    }
    # schemathesis leaves out the document's own route.
    assert {o.label for o in operations} == documented - {"GET /openapi.json"}

    for operation in operations:
        positive, negative = SCHEMA_EXAMPLES[kind(operation.path, operation.method.upper())]
        fuzz_operation(operation, GenerationMode.POSITIVE, positive, session, tally)
        fuzz_operation(operation, GenerationMode.NEGATIVE, negative, session, tally)

    print(tally.report("schemathesis"))
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    assert tally.sent >= 1100, tally.report("schemathesis")
    recovered(fuzzed)


# --- raw hostile bodies ---------------------------------------------------------------------------

PROMPT = f"{MARKER} Hello"
TEMPLATES = {
    "/generate": {"inputs": PROMPT, "parameters": {"max_new_tokens": 1, "details": True}},
    "/generate_stream": {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}},
    "/": {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}, "stream": False},
    "/invocations": {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1,
        "temperature": 0.7,
    },
    "/v1/completions": {"prompt": [PROMPT, PROMPT], "max_tokens": 1, "seed": 3},
    "/tokenize": {"inputs": PROMPT},
    "/chat_tokenize": {"messages": [{"role": "user", "content": PROMPT}]},
}
HOSTILE_NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "5e-324",
    "-5e-324",
    "1e308",
    "1.7976931348623157e308",
    "-0.0",
    "0",
    "-1",
    "-9223372036854775809",
    "18446744073709551616",
    "1" + "0" * 5000,
    "0.5",
    "true",
    "null",
    '""',
    "[]",
    "{}",
]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "text/csv",
    "application/xml",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/json; charset=latin-1",
    "*/*",
    "garbage",
]


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every value in a template (objects, lists and scalars), the root excluded."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += leaves(item, (*path, index))
    return found


def with_literal(template: Any, path: tuple[Any, ...], literal: str) -> bytes:
    """The template as JSON text with the value at `path` replaced by raw JSON text (which
    may be NaN, a 5,000-digit number or something that is not JSON at all)."""
    placeholder = "\u0000hostile\u0000"
    body = json.loads(json.dumps(template))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = placeholder
    text = json.dumps(body)
    return text.replace(json.dumps(placeholder), literal).encode()


def hostile_literal() -> st.SearchStrategy[str]:
    """JSON text (or not quite JSON) for one value."""
    depth = st.integers(1, 20_000)
    return st.one_of(
        st.sampled_from(HOSTILE_NUMBERS),
        st.integers().map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.text(max_size=200).map(lambda s: json.dumps(MARKER + s)),
        st.text(min_size=1, max_size=3).map(lambda s: json.dumps(MARKER + s * 10_000)),
        st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\u0000"']),
        depth.map(lambda n: "[" * n + "]" * n),
        depth.map(lambda n: '{"a":' * n + "1" + "}" * n),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner),
            max_leaves=20,
        ).map(json.dumps),
    )


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, str | None, bytes]:
    """(route, content type, body): a template with one hostile value, invalid UTF-8 in its
    prompt, unknown fields, raw bytes, or a deeply nested document."""
    route = draw(st.sampled_from(sorted(TEMPLATES)))
    template = TEMPLATES[route]
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    shape = draw(st.sampled_from(["value", "value", "value", "utf8", "unknown", "bytes", "deep"]))
    if shape == "value":
        path = draw(st.sampled_from(leaves(template)))
        body = with_literal(template, path, draw(hostile_literal()))
    elif shape == "utf8":
        garbage = draw(st.binary(min_size=1, max_size=8).filter(_invalid_utf8))
        body = json.dumps(template).encode().replace(b"Hello", garbage + b"Hello", 1)
    elif shape == "unknown":
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=10), st.integers(), min_size=1))
        body = json.dumps({**template, **extra}).encode()
    elif shape == "bytes":
        body = draw(st.binary(max_size=300))
    else:
        n = draw(st.integers(100, 200_000))
        body = (draw(st.sampled_from(["[", '{"inputs":'])) * n).encode()
    return route, content_type, tamed(body)


def tamed(body: bytes) -> bytes:
    """`tame` a body that decodes to an object (a hostile `null` budget means "all of it");
    one that does not decode is sent as it is."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body
    return json.dumps(tame(data)).encode() if isinstance(data, dict) else body


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_raw_hostile_bodies_on_every_post_route(fuzzed: RunningServer, recovered) -> None:
    session = requests.Session()
    tally = Tally()

    @given(request=hostile_requests())
    @fixed(RAW_EXAMPLES)
    def fuzz(request: tuple[str, str | None, bytes]) -> None:
        route, content_type, body = request
        headers = {"Content-Type": content_type} if content_type else {}
        what = f"POST {route} {content_type} {body[:300]!r}"
        try:
            response = session.post(
                f"{fuzzed.url}{route}", data=body, headers=headers, timeout=TIMEOUT
            )
        except requests.RequestException as error:
            tally.timed_out(what, error)
            return
        tally.check(what, response)

    fuzz()
    print(tally.report("raw bodies"))
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    assert tally.sent >= RAW_EXAMPLES - 50, tally.report("raw bodies")
    recovered(fuzzed)


def test_odd_methods_paths_and_headers(fuzzed: RunningServer, recovered) -> None:
    """Unknown paths and methods, odd `Accept` and `Authorization` headers, huge headers."""
    session = requests.Session()
    tally = Tally()
    body = json.dumps(tame(TEMPLATES["/invocations"]))
    path_text = st.text(st.characters(codec="utf-8", exclude_characters="?#"), max_size=40)

    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        path=st.one_of(st.sampled_from([*GENERATION_ROUTES, "/info", "/ping"]), path_text),
        accept=st.one_of(st.none(), st.text(st.characters(codec="latin-1"), max_size=40)),
        auth=st.one_of(st.none(), st.text(st.characters(codec="latin-1"), max_size=40)),
    )
    @fixed(150)
    def fuzz(method: str, path: str, accept: str | None, auth: str | None) -> None:
        headers = {"Content-Type": "application/json"}
        if accept is not None:
            headers["Accept"] = accept.strip().replace("\r", "").replace("\n", "")
        if auth is not None:
            headers["Authorization"] = auth.strip().replace("\r", "").replace("\n", "")
        url = f"{fuzzed.url}/{quote(path.lstrip('/'), safe='/')}"
        what = f"{method} {url} {headers}"
        try:
            response = session.request(method, url, data=body, headers=headers, timeout=TIMEOUT)
        except requests.RequestException as error:
            tally.timed_out(what, error)
            return
        if method == "HEAD":
            tally.sent += 1
            tally.statuses[response.status_code] += 1
            if response.status_code >= 500:
                tally.failures.append(f"{what} -> {response.status_code}")
            return
        tally.check(what, response)

    fuzz()
    huge = session.get(f"{fuzzed.url}/info", headers={"X-Big": "a" * 20_000}, timeout=TIMEOUT)
    assert huge.status_code < 500
    print(tally.report("methods, paths and headers"))
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    assert tally.sent >= 140
    recovered(fuzzed)


# --- what the server says and logs ----------------------------------------------------------------


PATHS = ["../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "file:///etc/shadow"]


def test_hf_token_and_prompts_never_leave_and_model_is_only_echoed(
    fuzzed: RunningServer,
) -> None:
    """`/info`, `/metrics`, errors and the log never show HF_TOKEN or a prompt; the OpenAI
    `model` field, path-like or not, is echoed and changes nothing."""
    session = requests.Session()
    for path in ("/info", "/metrics", "/openapi.json", "/v1/models", "/health", "/nope"):
        assert SECRET not in session.get(f"{fuzzed.url}{path}", timeout=TIMEOUT).text, path
    bad = {"inputs": MARKER, "parameters": {"max_new_tokens": 10_000}}
    answer = session.post(f"{fuzzed.url}/generate", json=bad, timeout=TIMEOUT)
    assert answer.status_code == 422 and SECRET not in answer.text

    chat = {"messages": [{"role": "user", "content": f"{MARKER} hi"}], "max_tokens": 3}
    chat["temperature"] = 0
    plain = session.post(f"{fuzzed.url}/v1/chat/completions", json=chat, timeout=TIMEOUT)
    assert plain.status_code == 200, plain.text
    for model in PATHS:
        echoed = session.post(
            f"{fuzzed.url}/v1/chat/completions", json={**chat, "model": model}, timeout=TIMEOUT
        )
        assert echoed.status_code == 200, echoed.text
        assert echoed.json()["model"] == model
        assert echoed.json()["choices"] == plain.json()["choices"]
    log = fuzzed.log()
    assert SECRET not in log
    assert MARKER not in log
    for model in PATHS:
        assert model not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:5000]
