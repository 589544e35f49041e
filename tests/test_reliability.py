"""Limits and faults: a client that stops reading, bursts over the admission limit, a model
step that raises, a scheduler thread that dies, a full or read-only cache, SIGTERM under load.

Covered elsewhere and not repeated here: 413 over the payload limit, 422 for a prompt over
`MAX_INPUT_TOKENS` (and its `truncate`) or `max_new_tokens` over the budget
(`test_server_errors.py`), 429 with two streams running (`test_server_errors.py`), SIGTERM with
streams that finish in the grace period and disconnected clients freeing their slots
(`test_server_lifecycle.py`), a model fault failing only its step (`test_generator.py`) and ending
a stream with an error event (`test_server_app.py`).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from handler.config import read_settings
from handler.engine import Engine
from handler.errors import ConfigError
from handler.model import resolve
from handler.server.app import STREAM_SEND_BUFFER_BYTES, create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState, Stage
from tests.conftest import PROMPTS, RunningServer, free_port, launch_server, start_engine

pytestmark = pytest.mark.slow

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A prompt the model continues for hundreds of tokens without stopping."""
SEND_TIMEOUT = 2.0
"""`SEND_TIMEOUT_SECONDS` in the servers started here (30 s in production)."""


def launch_patched(model_dir: Path, log_dir: Path, setup: str, **env: str) -> RunningServer:
    """`launch_server` whose process first runs `setup` (Python statements), to shorten a
    constant or put a fault at the operating system's boundary; nothing in the server reads a
    test switch."""
    port = free_port()
    code = f"import sys\n{setup}\nfrom handler.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    environ = {
        **os.environ,
        "MAX_BATCH_SIZE": "2",
        "MAX_TOTAL_TOKENS": "512",
        "SHUTDOWN_GRACE_SECONDS": "10",
        **env,
    }
    log_path = log_dir / f"server-{port}.log"
    command = [sys.executable, "-c", code, "serve", "--hostname", "127.0.0.1", "--port", str(port)]
    if "HF_MODEL_ID" not in env:
        command += ["--model-id", str(model_dir)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT)
    return RunningServer(f"http://127.0.0.1:{port}", process, log_path)


def metric(server: RunningServer, name: str) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def data_events(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: ") :])


def wait_for(server: RunningServer, queue: int, timeout: float = 30) -> None:
    """Until both slots of `server` are busy and `queue` requests wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy, waiting = metric(server, "tgi_batch_current_size"), metric(server, "tgi_queue_size")
        if (busy, waiting) == (2, queue):
            return
        time.sleep(0.05)
    raise AssertionError(
        f"queue {metric(server, 'tgi_queue_size')}, "
        f"batch {metric(server, 'tgi_batch_current_size')}: expected {queue} and 2"
    )


def wait_idle(server: RunningServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server, "tgi_batch_current_size") == 0 and metric(server, "tgi_queue_size") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("slots still busy")


# --- limits on the real server (2 slots, 4 requests in flight, 2 s send timeout) ----------------


@pytest.fixture(scope="module")
def limited(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = launch_patched(
        smollm2_dir,
        tmp_path_factory.mktemp("limited"),
        f"import handler.server.app as app\napp.SEND_TIMEOUT_SECONDS = {SEND_TIMEOUT}",
        MAX_CONCURRENT_REQUESTS="4",
    )
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.log()[-5000:]


def stalled_stream(server: RunningServer, max_new_tokens: int) -> socket.socket:
    """A stream whose client sends the request and never reads, with a small receive buffer."""
    body = json.dumps(
        {"inputs": COUNTING, "parameters": {"max_new_tokens": max_new_tokens, "top_n_tokens": 5}}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    head = (
        f"POST /generate_stream HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def token_gaps(response: requests.Response, stop: Any = None) -> list[float]:
    """Seconds between the token events of a stream; `stop()` true ends the reading early."""
    stamps = []
    for event in data_events(response.iter_lines()):
        stamps.append(time.monotonic())
        if "error" in event or (stop is not None and stop(len(stamps))):
            break
    return [b - a for a, b in itertools.pairwise(stamps)]


def test_a_client_that_stops_reading_loses_its_slot_and_other_streams_keep_pace(
    limited: RunningServer, golden
) -> None:
    wait_idle(limited)
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 40}}
    url = f"{limited.url}/generate_stream"
    with ThreadPoolExecutor(2) as pool:  # the pace of one stream beside another, both read
        pair = [pool.submit(requests.post, url, json=body, stream=True, timeout=60) for _ in "ab"]
        paced = [pool.submit(token_gaps, future.result()) for future in pair]
        baseline = statistics.median(paced[0].result())

    cancelled = 'tgi_request_failure{err="cancelled"}'
    before = metric(limited, cancelled)
    started = time.monotonic()
    stalled = stalled_stream(limited, max_new_tokens=480)
    reader = requests.post(
        url, json={**body, "parameters": {"max_new_tokens": 480}}, stream=True, timeout=60
    )
    freed_at: list[float] = []

    def until_freed_and_then_some(count: int) -> bool:
        if not freed_at and count % 5 == 0 and metric(limited, cancelled) > before:
            freed_at.append(time.monotonic() - started)
        return bool(freed_at) and count >= 20 and time.monotonic() - started > freed_at[0] + 1

    try:
        gaps = token_gaps(reader, until_freed_and_then_some)
    finally:
        reader.close()
        stalled.close()
    # A's events fill the send buffer (STREAM_SEND_BUFFER_BYTES) and its small receive buffer,
    # then one write blocks for SEND_TIMEOUT: well before its 480 tokens are generated.
    assert freed_at, f"the stalled stream was never cancelled ({len(gaps)} tokens read)"
    assert freed_at[0] < 90
    assert "cancelled: the client stopped reading (a write blocked for 2 s)" in limited.log()
    assert "a write to a client blocked for 2 s: connection closed" in limited.log()
    assert "Traceback" not in limited.log()
    # The reading stream never waited for the stalled one.
    assert max(gaps) < max(3.0, 20 * baseline), (max(gaps), baseline)
    assert statistics.median(gaps) < 4 * baseline, (statistics.median(gaps), baseline)
    wait_idle(limited)
    answer = requests.post(
        f"{limited.url}/generate",
        json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}},
        timeout=60,
    )
    assert answer.json()["generated_text"] == golden(PROMPTS[0], 4)
    assert STREAM_SEND_BUFFER_BYTES <= 64 * 1024


def test_a_burst_over_the_limit_is_refused_at_once_and_the_queue_stays_bounded(
    limited: RunningServer, golden
) -> None:
    """12 requests at once against MAX_CONCURRENT_REQUESTS=4 (2 slots): 4 run or wait, the
    others get 429 within seconds; running plus waiting never exceeds 4."""
    wait_idle(limited)
    prompts = [PROMPTS[i % 4] for i in range(12)]
    in_flight: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            text = requests.get(f"{limited.url}/metrics", timeout=10).text
            gauges = dict(
                line.split()
                for line in text.splitlines()
                if line.startswith("tgi_") and "{" not in line
            )
            in_flight.append(
                float(gauges["tgi_queue_size"]) + float(gauges["tgi_batch_current_size"])
            )
            time.sleep(0.05)

    def send(prompt: str) -> tuple[str, int, Any, float]:
        started = time.monotonic()
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 16}}
        response = requests.post(f"{limited.url}/generate", json=body, timeout=120)
        return prompt, response.status_code, response.json(), time.monotonic() - started

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(send, prompts))
    finally:
        done.set()
        watcher.join()
    statuses = [status for _, status, _, _ in results]
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    for prompt, status, answer, seconds in results:
        if status == 429:
            assert answer == {"error": "Model is overloaded", "error_type": "overloaded"}
            assert seconds < 5, seconds
        else:
            assert answer["generated_text"] == golden(prompt, 16)
    assert max(in_flight) <= 4, in_flight
    wait_idle(limited)


# --- SIGTERM under load -------------------------------------------------------------------------


def test_sigterm_under_load_ends_every_request_within_the_grace_period(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """2 slots, grace 5 s: a short stream finishes; then, with two long streams running and
    three requests waiting, SIGTERM: the long streams (running and waiting) end with an error
    event, waiting non-streaming requests get 503, and the server exits 0."""
    grace = 5.0
    server = launch_server(
        smollm2_dir, tmp_path, MAX_BATCH_SIZE="2", SHUTDOWN_GRACE_SECONDS=str(grace)
    )
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 400}}

    def stream(max_new_tokens: int) -> Iterator[bytes]:
        """The lines of a stream (keep the iterator: dropping it closes the connection)."""
        payload = {"inputs": COUNTING, "parameters": {"max_new_tokens": max_new_tokens}}
        response = requests.post(
            f"{server.url}/generate_stream", json=payload, stream=True, timeout=60
        )
        return response.iter_lines()

    def last_event_of_a_stream() -> dict[str, Any]:
        return list(data_events(stream(400)))[-1]

    try:
        events = {"short": data_events(stream(6)), "long": data_events(stream(400))}
        assert next(events["long"])["index"] == 1
        last_short = list(events["short"])[-1]
        assert last_short["details"] is None and last_short["generated_text"]
        # In threads: a queued stream's response may begin only when it is admitted.
        with ThreadPoolExecutor(4) as pool:
            waiting = [pool.submit(last_event_of_a_stream) for _ in range(2)]
            # One stream takes the short one's slot, the other queues; then the plain ones.
            wait_for(server, queue=1)
            plain = [
                pool.submit(requests.post, f"{server.url}/generate", json=body, timeout=60)
                for _ in range(2)
            ]
            wait_for(server, queue=3)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            last_long = list(events["long"])[-1]
            last_waiting = [future.result() for future in waiting]
            answers = [future.result() for future in plain]
            ended = time.monotonic() - signalled
        for last in [last_long, *last_waiting]:
            assert last["error_type"] == "healthcheck", last
            assert "shutting down" in last["error"]
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error_type"] == "healthcheck"
        assert ended < grace + 5, ended
        assert server.process.wait(timeout=grace + 15) == 0, server.log()[-5000:]
        assert time.monotonic() - signalled < grace + 15
        assert "drained: 0 requests left" in server.log()
    finally:
        server.stop(signal.SIGKILL)


# --- faults inside the process (Flask test client, real engine) ----------------------------------


def client_for(engine: Engine) -> FlaskClient:
    state = ServerState(engine.settings)
    state.engine = engine
    state.stage = Stage.READY
    return create_app(state, Metrics()).test_client()


def sse(body: bytes) -> list[dict[str, Any]]:
    blocks = body.decode().split("\n\n")
    return [json.loads(b[len("data: ") :]) for b in blocks if b.startswith("data: ")]


def test_a_prefill_fault_fails_only_the_requests_it_was_admitting(
    engine: Engine, golden, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream runs; a request arriving meanwhile has its prefill raise: it gets 424, the
    stream goes on to its full answer, and the next request is served.

    The arrival first joins the stream's decode in a mixed step, which raises too: the
    generator then runs the prefill and the decode apart, and only the prefill fails."""
    client = client_for(engine)
    real_prefill = engine.backend.prefill
    calls = itertools.count()
    mixed_calls = itertools.count()
    running = threading.Event()

    def prefill(*args: Any) -> Any:
        if next(calls) == 1:
            raise RuntimeError("injected prefill fault")
        return real_prefill(*args)

    def mixed(*args: Any) -> Any:
        next(mixed_calls)
        raise RuntimeError("injected fault in the prompt part of a mixed step")

    monkeypatch.setattr(engine.backend, "prefill", prefill)
    monkeypatch.setattr(engine.backend, "mixed", mixed)

    def stream() -> list[dict[str, Any]]:
        body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 40}}
        response = client.post("/generate_stream", json=body, buffered=False)
        chunks = []
        for chunk in response.response:
            chunks.append(chunk)
            if b'"index":3,' in chunk:
                running.set()
        return sse(b"".join(chunks))

    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(stream)
        assert running.wait(60)
        # A prompt no row holds: it goes through the mixed step (no prefix reuse).
        failed = client.post(
            "/generate",
            json={"inputs": "Hi, I am a new arrival", "parameters": {"max_new_tokens": 4}},
        )
        events = streamed.result(timeout=120)
    assert failed.status_code == 424 and failed.json["error_type"] == "generation"
    assert "prefill step raised RuntimeError" in failed.json["error"]
    assert next(mixed_calls) == 1  # the arrival was first tried in a mixed step
    assert events[-1]["generated_text"] == golden(PROMPTS[1], 40)
    assert [e["index"] for e in events] == list(range(1, 41))
    served = client.post(
        "/generate", json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
    )
    assert served.json["generated_text"] == golden(PROMPTS[0], 4)


def test_a_dead_scheduler_turns_health_checks_503_and_the_log_says_why(
    smollm2_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop itself raises (not a model step): the running stream ends with an error event,
    /ping and /health answer 503 with the reason, new requests 503, and the log has it."""
    engine = start_engine(smollm2_dir, MAX_BATCH_SIZE="2", MAX_TOTAL_TOKENS="256")
    try:
        client = client_for(engine)
        assert client.get("/ping").status_code == 200
        real_decode = engine.generator._decode
        steps = itertools.count()

        def decode(slots: list) -> None:
            if next(steps) == 3:
                raise RuntimeError("injected scheduler bug")
            real_decode(slots)

        monkeypatch.setattr(engine.generator, "_decode", decode)
        body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 50}}
        with caplog.at_level(logging.ERROR):
            events = sse(client.post("/generate_stream", json=body).data)
        assert [e["index"] for e in events[:-1]] == [1, 2, 3, 4]
        assert events[-1]["error_type"] == "healthcheck"
        assert "scheduler thread died" in events[-1]["error"]
        for path in ("/ping", "/health", "/"):
            health = client.get(path)
            assert health.status_code == 503, path
            assert health.json["status"] == "failed"
            assert "RuntimeError: injected scheduler bug" in health.json["error"]
        refused = client.post("/generate", json={"inputs": "Hi"})
        assert refused.status_code == 503 and refused.json["error_type"] == "healthcheck"
        died = [r for r in caplog.records if "scheduler thread died" in r.getMessage()]
        assert died and died[0].exc_info and "injected scheduler bug" in str(died[0].exc_info[1])
    finally:
        engine.generator.stop()


# --- the cache at start-up ----------------------------------------------------------------------


def full_disk(*args: Any, **kwargs: Any) -> Any:
    """A file on a full disk: creating it works, writing to it fails with ENOSPC."""
    return open("/dev/full", "wb")


@pytest.mark.parametrize(
    ("opener", "message"),
    [
        pytest.param(full_disk, "is full (No space left on device)", id="full"),
        pytest.param(
            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS))),
            "cannot be created or written (Read-only file system)",
            id="read-only",
        ),
    ],
)
def test_a_full_or_read_only_cache_stops_start_up_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opener: Any, message: str
) -> None:
    monkeypatch.setattr(resolve.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resolve, "tempfile", SimpleNamespace(TemporaryFile=opener))
    monkeypatch.setattr(resolve, "snapshot_download", pytest.fail)
    cache = tmp_path / "hub"
    settings = read_settings([], {"HF_MODEL_ID": "org/model", "HUGGINGFACE_HUB_CACHE": str(cache)})
    with pytest.raises(ConfigError) as caught:
        resolve.resolve_model(settings)
    assert f"The hub cache directory {cache} {message}" in str(caught.value)
    assert "HUGGINGFACE_HUB_CACHE" in str(caught.value)


def test_a_full_cache_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    setup = (
        "import types, handler.model.resolve as resolve\n"
        "resolve.tempfile = types.SimpleNamespace("
        "TemporaryFile=lambda **kw: open('/dev/full', 'wb'))"
    )
    server = launch_patched(
        tmp_path,
        tmp_path,
        setup,
        HF_MODEL_ID="org/model",
        HUGGINGFACE_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="0",
    )
    try:
        assert server.process.wait(timeout=120) == 3, server.log()[-3000:]
    finally:
        server.stop(signal.SIGKILL)
    log = server.log()
    assert "loading the model failed" in log
    assert f"The hub cache directory {tmp_path / 'hub'} is full" in log
