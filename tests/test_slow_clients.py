"""Slow, idle and surplus connections against the real server (issue 19): they must cost no
request thread, be cut off at their deadlines with a 408, be refused beyond the connection cap,
and never delay health checks or admitted requests. Also: SIGKILL of the worker under load.

The servers here use short deadlines (seconds, not the defaults' ten) to keep the tests short.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import select
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from handler.config import read_settings
from handler.errors import ConfigError
from handler.server.front import PROBATION_SECONDS, RequestFraming
from tests.conftest import PROMPTS, RunningServer, launch_server

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A prompt the model continues for hundreds of tokens without stopping."""
HEADER_TIMEOUT = 6.0
BODY_TIMEOUT = 2.0


# --- the framing the front reads (no server) -----------------------------------------------------


def fed_byte_by_byte(data: bytes, max_body: int = 1000) -> tuple[RequestFraming, int | None]:
    """The framing after `data` arrives one byte at a time, and how many bytes it took."""
    framing = RequestFraming(max_body)
    buffer = bytearray()
    for count, byte in enumerate(data, 1):
        buffer.append(byte)
        framing.scan(buffer)
        if framing.complete:
            return framing, count
    return framing, None


def test_framing_finds_the_end_of_each_kind_of_request() -> None:
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\n"
    plain = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    assert fed_byte_by_byte(plain + b"GET /next")[0].end == len(plain)
    sized = head + b"Content-Length: 5\r\n\r\nhello"
    assert fed_byte_by_byte(sized + b"GET /")[1] == len(sized)
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n2\r\n!!\r\n0\r\n\r\n"
    assert fed_byte_by_byte(chunked + b"GET")[1] == len(chunked)
    trailers = head + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: 1\r\n\r\n"
    assert fed_byte_by_byte(trailers)[1] == len(trailers)
    # Framing that cannot be told is handed over with the headers, for gunicorn's 400, and a
    # length over the limit for the app's 413, without waiting for a body.
    for odd in (
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: x",
        b"Content-Length: 5000",
    ):
        framing, count = fed_byte_by_byte(head + odd + b"\r\n\r\n")
        assert count == len(head + odd) + 4, odd
    expecting = head + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    framing, count = fed_byte_by_byte(expecting)
    assert count is None and framing.expects_continue and framing.head_end == len(expecting)


def test_the_deadlines_and_the_cap_are_settings_with_flags_and_environment_names() -> None:
    defaults = read_settings([], {})
    assert (defaults.request_header_timeout, defaults.request_body_timeout) == (10.0, 10.0)
    assert (defaults.request_body_min_rate, defaults.max_connections) == (1000, 2048)
    environ = {
        "REQUEST_HEADER_TIMEOUT": "2.5",
        "REQUEST_BODY_MIN_RATE": "10",
        "MAX_CONNECTIONS": "9",
    }
    flagged = read_settings(["--request-body-timeout", "4", "--max-connections", "8"], environ)
    assert (flagged.request_header_timeout, flagged.request_body_timeout) == (2.5, 4.0)
    assert (flagged.request_body_min_rate, flagged.max_connections) == (10, 8)
    with pytest.raises(ConfigError) as error:
        read_settings([], {"REQUEST_HEADER_TIMEOUT": "0", "MAX_CONNECTIONS": "-1"})
    assert "REQUEST_HEADER_TIMEOUT='0' is invalid: must be more than 0 seconds" in str(error.value)
    assert "MAX_CONNECTIONS='-1' is invalid" in str(error.value)


# --- slow and idle clients ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def deadlines(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The default connection cap (2048), short header and body deadlines."""
    running = launch_server(
        smollm2_dir,
        tmp_path_factory.mktemp("deadlines"),
        REQUEST_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        REQUEST_BODY_TIMEOUT=str(BODY_TIMEOUT),
    )
    yield running
    assert running.stop() == 0, running.log()[-5000:]


def address(server: RunningServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def worker(server: RunningServer) -> psutil.Process:
    (child,) = psutil.Process(server.process.pid).children()
    return child


def timed_generate(server: RunningServer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    started = time.monotonic()
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
    response = requests.post(f"{server.url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"], time.monotonic() - started


def read_answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, Any] | None]:
    """Status and JSON body of the one answer on `sock` (0 and None: closed without one)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return 0, None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None


class PingWatch:
    """GET /ping on a new connection every 0.2 s in a thread; the slowest answer it saw."""

    def __init__(self, server: RunningServer) -> None:
        self.url = f"{server.url}/ping"
        self.times: list[float] = []
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            status = requests.get(self.url, timeout=10).status_code
            self.times.append(time.monotonic() - started)
            self.statuses.add(status)
            self._stop.wait(0.2)

    def __enter__(self) -> PingWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def test_slow_header_and_idle_clients_hold_no_thread_and_delay_nothing(
    deadlines: RunningServer, golden
) -> None:
    """1,000 clients sending a header byte a second plus 200 idle kept-alive connections: the
    worker's threads and memory stay as they were, /ping answers within 1 s throughout, a greedy
    request is golden within 2 s of its quiet time, and the slow clients get a 408 at their
    deadline."""
    raise_file_limit(4096)
    host, port = address(deadlines)
    prompt, tokens = PROMPTS[0], 8
    process = worker(deadlines)
    quiet = []
    with PingWatch(deadlines):  # the same load as below, without the slow and idle clients
        for _ in range(3):
            text, seconds = timed_generate(deadlines, prompt, tokens)
            assert text == golden(prompt, tokens)
            quiet.append(seconds)
        quiet_threads, quiet_rss = process.num_threads(), process.memory_info().rss

    idle = []
    for _ in range(200):
        sock = socket.create_connection((host, port))
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        idle.append(sock)
    slow = []
    opened = time.monotonic()
    for _ in range(1000):
        sock = socket.create_connection((host, port))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    answers: dict[socket.socket, tuple[int, Any, float]] = {}
    dripping = threading.Event()
    dripping.set()

    def drip() -> None:
        """A header byte a second on each slow connection, until its answer comes."""
        while dripping.is_set() and len(answers) < len(slow):
            waiting = [sock for sock in slow if sock not in answers]
            poller = select.poll()  # select() takes no descriptor above 1023
            for sock in waiting:
                poller.register(sock, select.POLLIN)
            by_fd = {sock.fileno(): sock for sock in waiting}
            for fd, _ in poller.poll(0):
                answers[by_fd[fd]] = (*read_answer(by_fd[fd], 5), time.monotonic())
            for sock in waiting:
                if sock not in answers:
                    sock.send(b"X")
            time.sleep(1.0)

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        with PingWatch(deadlines) as pings:
            time.sleep(0.5)
            peak_threads, peak_rss = process.num_threads(), process.memory_info().rss
            open_fds = process.num_fds()
            loaded = []
            for _ in range(3):
                text, seconds = timed_generate(deadlines, prompt, tokens)
                assert text == golden(prompt, tokens)
                loaded.append(seconds)
            loaded_at = time.monotonic() - opened
            peak_threads = max(peak_threads, process.num_threads())
            dripper.join(HEADER_TIMEOUT + 10)
    finally:
        dripping.clear()
        dripper.join()
        for sock in slow + idle:
            sock.close()
    closed_after = max(at for _, _, at in answers.values()) - opened
    print(
        f"\nthreads {quiet_threads} -> {peak_threads}, RSS {quiet_rss / 2**20:.0f} -> "
        f"{peak_rss / 2**20:.0f} MiB, worker fds {open_fds}; generate quiet "
        f"{[round(s, 2) for s in quiet]} s, loaded {[round(s, 2) for s in loaded]} s "
        f"(done {loaded_at:.1f} s after the slow clients came); slowest /ping "
        f"{max(pings.times):.3f} s of {len(pings.times)}; slow clients closed within "
        f"{closed_after:.1f} s"
    )
    assert open_fds >= 1200, open_fds  # every connection was open when measured
    assert peak_threads <= quiet_threads + 3, (quiet_threads, peak_threads)
    assert peak_rss - quiet_rss < 64 * 2**20, (quiet_rss, peak_rss)
    assert pings.statuses == {200} and max(pings.times) < 1.0, pings.times
    assert statistics.median(loaded) <= statistics.median(quiet) + 2.0, (quiet, loaded)
    assert len(answers) == len(slow) and closed_after < HEADER_TIMEOUT + 3, closed_after
    timeout = {
        "error": f"Request Timeout: the request headers took longer than {HEADER_TIMEOUT:g} s",
        "error_type": "request_timeout",
    }
    assert {json.dumps(body) for _, body, _ in answers.values()} == {json.dumps(timeout)}
    assert {status for status, _, _ in answers.values()} == {408}


def test_a_body_sent_at_one_byte_a_second_is_cut_off_with_408(
    deadlines: RunningServer, golden
) -> None:
    body = json.dumps({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}).encode()
    sock = socket.create_connection(address(deadlines))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    started = time.monotonic()
    sent = 0
    try:
        for byte in body:  # one byte a second, until the server answers
            if select.select([sock], [], [], 1.0)[0]:
                break
            sock.send(bytes([byte]))
            sent += 1
        status, answer = read_answer(sock, 5)
    finally:
        cut_after = time.monotonic() - started
        sock.close()
    assert status == 408, (status, answer)
    assert answer == {
        "error": f"Request Timeout: the request body arrived slower than 1000 bytes/s "
        f"(after {BODY_TIMEOUT:g} s)",
        "error_type": "request_timeout",
    }
    assert BODY_TIMEOUT <= cut_after < BODY_TIMEOUT + 2, cut_after
    assert sent < len(body)
    text, _ = timed_generate(deadlines, PROMPTS[0], 4)
    assert text == golden(PROMPTS[0], 4)


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    """What `sock` receives until `marker` appears `count` times (10 s at most)."""
    sock.settimeout(10)
    data = b""
    while data.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_pipelined_and_expect_continue_requests_are_served(deadlines: RunningServer) -> None:
    """Requests the front read ahead (pipelined) or asked for (100-continue) reach the app."""
    ping = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(address(deadlines)) as sock:
        sock.sendall(ping * 3)
        assert read_until(sock, b'{"status":"ready"}', 3).count(b"HTTP/1.1 200 OK") == 3
    body = b'{"inputs": "1, 2, 3,"}'
    with socket.create_connection(address(deadlines)) as sock:
        sock.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert read_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = read_until(sock, b"]")
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"100 Continue" not in answer


# --- the connection cap and the worker's death ----------------------------------------------------


CAP = 32
"""MAX_CONNECTIONS of the server below: 16 streams and 16 slow clients fill it."""
STREAM_TOKENS = 48
LOAD_SECONDS: list[float] = []
"""How long the server below took to start and load the model."""


@pytest.fixture(scope="module")
def capped(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    started = time.monotonic()
    running = launch_server(
        smollm2_dir,
        tmp_path_factory.mktemp("capped"),
        MAX_BATCH_SIZE="16",
        MAX_CONNECTIONS=str(CAP),
        REQUEST_HEADER_TIMEOUT="60",
    )
    LOAD_SECONDS.append(time.monotonic() - started)
    yield running
    assert running.stop() == 0, running.log()[-5000:]


def stream_gaps(
    server: RunningServer,
    count: int,
    max_new_tokens: int,
    running: threading.Event | None = None,
    last_events: list[float] | None = None,
) -> list[list[float]]:
    """`count` streams at once; each one's seconds between token events, counted once every
    stream has its first token (`running` is set then). Each stream's last event time is
    appended to `last_events`: its connection is open until then."""
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": max_new_tokens}}
    url = f"{server.url}/generate_stream"
    barrier = threading.Barrier(count, action=running.set if running else None)

    def one(_: int) -> list[float]:
        response = requests.post(url, json=body, stream=True, timeout=60)
        events = (line for line in response.iter_lines() if line.startswith(b"data: "))
        next(events)
        barrier.wait(60)  # every stream runs before any gap counts
        stamps = [time.monotonic() for _ in events]
        assert len(stamps) == max_new_tokens - 1
        if last_events is not None:
            last_events.append(stamps[-1])
        return [b - a for a, b in itertools.pairwise(stamps)]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_connections_over_the_cap_are_refused_at_once_and_streams_keep_pace(
    capped: RunningServer,
) -> None:
    """With 16 streams and 16 slow clients filling the cap, new connections get 503
    `overloaded` in under a second, /ping still answers, and the streams' inter-token latency
    stays within 1.5x of the same streams alone."""
    host, port = address(capped)
    alone = statistics.median(itertools.chain(*stream_gaps(capped, 16, STREAM_TOKENS)))

    running = threading.Event()
    last_events: list[float] = []
    flooding = threading.Event()
    flooding.set()
    fillers: list[socket.socket] = []
    refusals: list[tuple[float, float, int, Any]] = []
    full = threading.Event()
    """Set at the first refusal: the server itself counts the cap as full."""

    def flood() -> None:
        """Once the streams run: slow clients fill the cap, then new connections keep coming."""
        running.wait(60)
        for _ in range(CAP - 16):
            fillers.append(socket.create_connection((host, port)))
            fillers[-1].sendall(b"POST /generate HTTP/1.1\r\n")
        time.sleep(0.2)
        while flooding.is_set():
            started = time.monotonic()
            with socket.create_connection((host, port)) as sock:
                sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status, body = read_answer(sock, 5)
            refusals.append((time.monotonic(), time.monotonic() - started, status, body))
            if status == 503:
                full.set()
            time.sleep(0.01)

    def silent_then_ping() -> list[tuple[float, float, int, float, int]]:
        """(connected at, seconds, status) of a silent connection, then of a /ping, five times.
        A silent connection made after a stream ended is within the cap again (its kept-alive
        connection is closed to make room), and rightly waits for its headers: those time out
        (status 0) and are left out below."""
        # Not before the cap is full (a busy machine takes a while to open the fillers).
        assert full.wait(60), "no connection was refused: the cap never filled"
        seen = []
        for _ in range(5):
            started = time.monotonic()
            with socket.create_connection((host, port)) as silent:
                try:
                    status, _ = read_answer(silent, 3)  # says nothing: refused after probation
                except TimeoutError:
                    status = 0
            refused = time.monotonic() - started
            pinged = time.monotonic()
            # Connection: close, or the kept-alive ping is the idle connection that the next
            # silent one replaces, within the cap.
            ping = requests.get(
                f"{capped.url}/ping", headers={"Connection": "close"}, timeout=5
            ).status_code
            seen.append((started, refused, status, time.monotonic() - pinged, ping))
        return seen

    with ThreadPoolExecutor(2) as pool:
        flooder = pool.submit(flood)
        checks = pool.submit(silent_then_ping)
        try:
            flooded_gaps = stream_gaps(capped, 16, STREAM_TOKENS, running, last_events)
        finally:
            flooding.clear()
            flooder.result()
            for sock in fillers:
                sock.close()
        probes = checks.result()
    flooded = statistics.median(itertools.chain(*flooded_gaps))
    # Answered while every stream (and filler) held its connection: the cap was full.
    refusals = [(s, st, body) for at, s, st, body in refusals if at < min(last_events)]
    again = statistics.median(itertools.chain(*stream_gaps(capped, 16, STREAM_TOKENS)))
    baseline = (alone + again) / 2
    worst = max(seconds for seconds, _, _ in refusals)
    print(
        f"\ninter-token latency alone {alone * 1000:.0f} ms and {again * 1000:.0f} ms, flooded "
        f"{flooded * 1000:.0f} ms ({flooded / baseline:.2f}x); {len(refusals)} refused, "
        f"slowest {worst:.3f} s; probes {[tuple(round(x, 3) for x in p[1:]) for p in probes]}"
    )
    assert len(refusals) >= 20
    for _, status, body in refusals:
        assert status == 503 and body["error_type"] == "overloaded", (status, body)
    assert worst < 1.0
    while_full = [probe for probe in probes if probe[0] < min(last_events)]
    assert len(while_full) >= 2, probes
    for _, refused, status, _pinged, _ping in while_full:
        assert status == 503 and PROBATION_SECONDS <= refused < 1.0, probes
    for *_, pinged, ping in probes:
        assert ping == 200 and pinged < 1.0, probes
    assert flooded <= 1.5 * baseline, (alone, flooded, again)


def test_sigkill_of_the_worker_under_streams_ends_every_client_and_it_comes_back(
    capped: RunningServer, golden
) -> None:
    """8 streams, then SIGKILL of the worker: every client gets its answer or an error, none
    hangs; the master starts a worker that loads (503) then serves (200) golden answers."""
    process = worker(capped)
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 400}}
    started = threading.Barrier(9)

    def stream(_: int) -> str:
        try:
            response = requests.post(
                f"{capped.url}/generate_stream", json=body, stream=True, timeout=(5, 30)
            )
            lines = response.iter_lines()
            next(line for line in lines if line.startswith(b"data: "))
            started.wait(120)
            for _ in lines:
                pass
            return "ended"
        except requests.RequestException as exc:
            return type(exc).__name__

    with ThreadPoolExecutor(8) as pool:
        outcomes = [pool.submit(stream, i) for i in range(8)]
        started.wait(120)
        killed_at = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        ended = [future.result(timeout=60) for future in outcomes]
    clients_done = time.monotonic() - killed_at
    statuses = []
    load_seconds = LOAD_SECONDS[-1]
    while time.monotonic() - killed_at < 3 * load_seconds + 30:
        try:
            status = requests.get(f"{capped.url}/ping", timeout=1).status_code
        except requests.RequestException:
            status = 0
        if not statuses or statuses[-1][1] != status:
            statuses.append((round(time.monotonic() - killed_at, 1), status))
        if status == 200:
            break
        time.sleep(0.1)
    back_after = time.monotonic() - killed_at
    print(
        f"\nclients after SIGKILL: {ended} within {clients_done:.1f} s; /ping {statuses}; "
        f"first load {load_seconds:.1f} s, back after {back_after:.1f} s"
    )
    assert all(outcome in ("ended", "ChunkedEncodingError", "ConnectionError") for outcome in ended)
    assert clients_done < 10
    assert [status for _, status in statuses if status][-2:] == [503, 200], statuses
    assert back_after < 2 * load_seconds + 10
    assert worker(capped).pid != process.pid
    text, _ = timed_generate(capped, PROMPTS[1], 16)
    assert text == golden(PROMPTS[1], 16)
