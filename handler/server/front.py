"""The worker's connection front: requests are read in the worker's event loop, without a thread.

gunicorn's `gthread` worker keeps idle keep-alive sockets in its selector, but reads each
request's headers and body in a pool thread with blocking calls and no deadline: a few hundred
clients that send their headers slowly hold every thread, and health checks and generations wait
behind them. `FrontThreadWorker` moves the reading into the worker's selector loop, as nginx and
uvicorn do:

- A connection is read without blocking into a buffer until its request is complete (headers
  and body, framed by `RequestFraming`); only then does a pool thread get it, and gunicorn's
  parser reads the request from that buffer without touching the socket.
- The headers must arrive within `request_header_timeout` seconds of the connection (or, on a
  kept-alive connection, of the next request's first byte), the body within
  `request_body_timeout` seconds of the headers plus one second per `request_body_min_rate`
  bytes received (Apache's `mod_reqtimeout` rule). Past that, the client gets a 408 in TGI's
  error shape and the connection is closed.
- At most `max_connections` connections are open. Beyond that, idle keep-alive connections are
  closed first (oldest first, as nginx reuses them); a new connection over the cap gets
  `PROBATION_SECONDS` to send a health check (`/ping`, `/health`), which is served, since
  SageMaker replaces an instance whose `/ping` fails; anything else gets 503 `overloaded`.
  Beyond `PROBATION_CONNECTIONS` such connections at once, a new one is closed unanswered.
- An error the front answers itself is followed by a lingering close (half-close, discard what
  the client still sends, for `LINGER_SECONDS` at most), so that the answer is not lost to a
  reset.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import logging
import math
import re
import selectors
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""A request line and headers longer than this get 431 (nginx allows 4 x 8 KiB by default)."""
RECV_BYTES = 64 * 1024
PROBATION_SECONDS = 0.5
"""How long a connection over the cap may take to send a health check before its 503."""
PROBATION_CONNECTIONS = 64
"""Connections over the cap read at once for a health check; more are closed unanswered."""
LINGER_SECONDS = 2.0
"""How long the front drains a connection it answered with an error before closing it."""
LINGER_BYTES = 64 * 1024
HEALTH_CHECK = re.compile(rb"(?:GET|HEAD) /(?:ping|health)(?:\?[^ ]*)? HTTP/1\.[01]\r?\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(
    status: int, reason: str, message: str, error_type: str | None = None, headers: str = ""
) -> bytes:
    """A complete HTTP/1.1 answer carrying TGI's error body, that closes the connection;
    `error_type` defaults to the reason in snake case (`request_timeout`)."""
    error_type = error_type or reason.lower().replace(" ", "_")
    body = json.dumps(
        {"error": f"{reason}: {message}" if message else reason, "error_type": error_type}
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return (head + body).encode("latin-1")


class RequestFraming:
    """Where the first request of a connection's buffer ends, found as its bytes arrive.

    Only the framing is read here (the end of the headers, `Content-Length`, chunked
    `Transfer-Encoding`): gunicorn's parser reads the request itself, and refuses what is
    malformed, once the front hands it over. A head whose framing cannot be told (two lengths,
    a length that is not a number, an unknown transfer coding) is handed over as soon as it is
    complete, for gunicorn to refuse with a 400; a `Content-Length` over `max_body` too, for the
    app to refuse with a 413 without reading the body.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.head_end: int | None = None
        """Offset just past the blank line that ends the headers."""
        self.end: int | None = None
        """Offset just past the request, once known."""
        self.expects_continue = False
        self.chunked = False
        self._chunk_at = 0
        """Chunked bodies: where the next chunk-size line starts."""
        self._in_trailers = False
        self._buffered = 0

    @property
    def complete(self) -> bool:
        """The whole request has arrived (as of the last `scan`)."""
        return self.end is not None and self._buffered >= self.end

    def body_received(self, buffered: int) -> int:
        return 0 if self.head_end is None else buffered - self.head_end

    def scan(self, buffer: bytes | bytearray) -> None:
        """Advance over `buffer` (the same buffer, grown since the last call)."""
        self._buffered = len(buffer)
        if self.end is not None:
            return
        if self.head_end is None:
            found = buffer.find(b"\r\n\r\n")
            if found < 0:
                return
            self.head_end = found + 4
            self._read_head(bytes(buffer[: self.head_end]))
            if self.end is not None:
                return
        if self.chunked:
            self._scan_chunks(buffer)

    def head_too_large(self, buffered: int) -> bool:
        return self.head_end is None and buffered > MAX_HEAD_BYTES

    def body_too_large(self, buffered: int) -> bool:
        return self.end is None and self.body_received(buffered) > self.max_body + 64 * 1024

    def _read_head(self, head: bytes) -> None:
        assert self.head_end is not None
        lines = head.split(b"\r\n")
        version = lines[0].rsplit(b" ", 1)[-1]
        lengths, codings = set(), []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                lengths.add(value)
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expects_continue = version == b"HTTP/1.1"
        if codings:
            if codings[-1] == b"chunked" and not lengths:
                self.chunked = True
                self._chunk_at = self.head_end
            else:
                self.end = self.head_end  # gunicorn refuses it
        elif lengths:
            value = next(iter(lengths))
            if len(lengths) > 1 or not value.isdigit() or int(value) > self.max_body:
                self.end = self.head_end  # a 400 or a 413 that needs no body
            else:
                self.end = self.head_end + int(value)
        else:
            self.end = self.head_end

    def _scan_chunks(self, buffer: bytes | bytearray) -> None:
        while True:
            line_end = buffer.find(b"\r\n", self._chunk_at)
            if line_end < 0:
                return
            if self._in_trailers:
                if line_end == self._chunk_at:  # the empty line after the trailers
                    self.end = line_end + 2
                    return
                self._chunk_at = line_end + 2
                continue
            size_text = bytes(buffer[self._chunk_at : line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self.end = line_end + 2  # malformed: gunicorn refuses it
                return
            if size == 0:
                self._in_trailers = True
                self._chunk_at = line_end + 2
                continue
            chunk_end = line_end + 2 + size + 2
            if len(buffer) < chunk_end:
                return
            self._chunk_at = chunk_end


@dataclass
class Reading:
    """A connection the front is reading (or draining, after answering it with an error)."""

    conn: TConn
    buffer: bytearray
    framing: RequestFraming
    deadline: float
    """When it expires, as last computed (a body's deadline moves as its bytes arrive)."""
    probation: bool = False
    lingering: bool = False
    active: bool = True
    body_started: float | None = None
    latest: float = math.inf
    """No deadline goes past this (set when the worker stops)."""
    drained: int = 0
    sent_continue: bool = False


class FrontThreadWorker(ThreadWorker):
    """A `gthread` worker whose connections are read by its event loop, not by its threads.

    Settings come from `configure` (the server's `Settings`), called in the worker process
    before it runs; the gunicorn config's `worker_connections` is not used: connections are
    never left unaccepted, they are served, read or refused at once.
    """

    header_timeout = 10.0
    body_timeout = 10.0
    body_min_rate = 1000
    max_connections = 2048
    max_body = 2_000_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_connections = sys.maxsize  # the loop never stops accepting
        self.max_keepalived = sys.maxsize  # idle connections are capped with the others
        self.reading: dict[int, Reading] = {}
        self.deadlines: list[tuple[float, int, Reading]] = []
        self._seq = itertools.count()
        self.over_cap = 0
        """Connections on probation or lingering: open, but outside the cap."""
        self._stop_capped = False

    @classmethod
    def configure(
        cls,
        header_timeout: float,
        body_timeout: float,
        body_min_rate: int,
        max_connections: int,
        max_body: int,
    ) -> None:
        cls.header_timeout = header_timeout
        cls.body_timeout = body_timeout
        cls.body_min_rate = body_min_rate
        cls.max_connections = max_connections
        cls.max_body = max_body

    # --- entry points from the gthread loop ----------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        while self.nr_conns - self.over_cap > self.max_connections and self.keepalived_conns:
            self._close_idle(self.keepalived_conns.popleft())
        if self.nr_conns - self.over_cap <= self.max_connections:
            self._read(conn, self.header_timeout)
        elif self.over_cap < PROBATION_CONNECTIONS:
            self.over_cap += 1
            self._read(conn, PROBATION_SECONDS, probation=True)
        else:
            self.nr_conns -= 1
            conn.close()

    def enqueue_req(self, conn: TConn) -> None:
        """gthread calls this for a new connection, a kept-alive one that became readable, and
        one with the next request already buffered: each is read by the front first."""
        if getattr(conn, "front_ready", False):
            conn.front_ready = False
            super().enqueue_req(conn)
        else:
            self._read(conn, self.header_timeout)

    def handle(self, conn: TConn) -> Any:
        """In a pool thread: give gunicorn's parser the request the front read."""
        conn.data_ready = True  # never wait for data in a thread
        conn.init()
        buffered = getattr(conn, "front_buffer", b"")
        conn.front_buffer = b""
        if buffered:
            conn.parser.unreader.unread(buffered)
        return super().handle(conn)

    def handle_request(self, req: Any, conn: TConn) -> Any:
        if getattr(conn, "front_sent_continue", False):
            # The front already asked for the body; gunicorn would send a second 100.
            req._expected_100_continue = False
            conn.front_sent_continue = False
        return super().handle_request(req, conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.deadlines:
            timeout = max(0.0, min(timeout, self.deadlines[0][0] - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and not self._stop_capped:
            # Stopping: requests still being read get the time kept-alive connections get.
            self._stop_capped = True
            for reading in list(self.reading.values()):
                reading.latest = now + STOP_KEEPALIVE_LINGER
                self._push(reading, min(reading.deadline, reading.latest))
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, _, reading = heapq.heappop(self.deadlines)
            if not reading.active or reading.deadline != deadline:
                continue  # superseded by a later entry
            current = self._deadline(reading)
            if current > now:
                self._push(reading, current)
            else:
                self._expire(reading)

    # --- reading ------------------------------------------------------------------------------

    def _read(self, conn: TConn, timeout: float, probation: bool = False) -> None:
        conn.sock.setblocking(False)
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        now = time.monotonic()
        reading = Reading(
            conn,
            bytearray(leftover),
            RequestFraming(self.max_body),
            deadline=now + timeout,
            probation=probation,
        )
        fd = conn.sock.fileno()
        self.reading[fd] = reading
        self._push(reading, reading.deadline)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, reading))
        if leftover:
            self._advance(reading)

    def _on_readable(self, reading: Reading, _sock: socket.socket) -> None:
        try:
            self._receive(reading)
        except Exception:
            # The event loop serves every connection: one connection's fault closes it alone.
            logger.exception("connection from %s: reading the request failed", reading.conn.client)
            if reading.active:
                self._forget(reading)

    def _receive(self, reading: Reading) -> None:
        try:
            data = reading.conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if reading.lingering:
            reading.drained += len(data)
            if not data or reading.drained > LINGER_BYTES:
                self._forget(reading)
            return
        if not data:
            self._forget(reading)  # the client went away before its request was complete
            return
        reading.buffer += data
        self._advance(reading)

    def _advance(self, reading: Reading) -> None:
        framing, buffered = reading.framing, len(reading.buffer)
        had_head = framing.head_end is not None
        framing.scan(reading.buffer)
        if reading.probation:
            if framing.head_end is not None or buffered > 4096:
                if HEALTH_CHECK.match(reading.buffer) and framing.complete:
                    self._hand_over(reading)
                else:
                    self._refuse(reading)
            return
        if framing.complete:
            self._hand_over(reading)
        elif framing.head_too_large(buffered):
            self._answer(
                reading,
                431,
                "Request Header Fields Too Large",
                f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
            )
        elif framing.body_too_large(buffered):
            self._answer(
                reading,
                413,
                "Payload Too Large",
                f"The body is larger than the payload limit ({self.max_body} bytes)",
            )
        elif framing.head_end is not None and not had_head:
            reading.body_started = time.monotonic()
            if framing.expects_continue:
                self._send(reading, CONTINUE)
                reading.sent_continue = True
            self._push(reading, self._deadline(reading))

    def _deadline(self, reading: Reading) -> float:
        """Headers: their deadline. Body: `body_timeout` after the headers, plus a second per
        `body_min_rate` bytes received."""
        if reading.lingering or reading.probation or reading.body_started is None:
            return reading.deadline
        received = reading.framing.body_received(len(reading.buffer))
        deadline = reading.body_started + self.body_timeout + received / self.body_min_rate
        return min(deadline, reading.latest)

    def _expire(self, reading: Reading) -> None:
        if reading.lingering:
            self._forget(reading)
        elif reading.probation:
            # A busy loop may reach the deadline before the readiness event of a health check
            # that has arrived: read what the socket holds first.
            self._receive(reading)
            if reading.active and reading.probation:
                self._refuse(reading)
        elif reading.body_started is None:
            self._answer(
                reading,
                408,
                "Request Timeout",
                f"the request headers took longer than {self.header_timeout:g} s",
            )
        else:
            self._answer(
                reading,
                408,
                "Request Timeout",
                f"the request body arrived slower than {self.body_min_rate} bytes/s "
                f"(after {self.body_timeout:g} s)",
            )

    def _refuse(self, reading: Reading) -> None:
        self._answer(
            reading,
            503,
            "Service Unavailable",
            f"the server has {self.max_connections} connections open "
            "(MAX_CONNECTIONS): retry later",
            error_type="overloaded",
            headers="Retry-After: 1\r\n",
        )

    # --- leaving the front --------------------------------------------------------------------

    def _hand_over(self, reading: Reading) -> None:
        conn = reading.conn
        self._unregister(reading)
        if reading.probation:
            self.over_cap -= 1
        conn.front_buffer = bytes(reading.buffer)
        conn.front_sent_continue = reading.sent_continue
        conn.front_ready = True
        self.enqueue_req(conn)

    def _answer(
        self,
        reading: Reading,
        status: int,
        reason: str,
        message: str,
        error_type: str | None = None,
        headers: str = "",
    ) -> None:
        """Send an error and linger: half-close, then discard what the client still sends."""
        self._send(reading, error_response(status, reason, message, error_type, headers))
        if status != 503:
            logger.info("connection from %s: %d %s", reading.conn.client, status, message)
        try:
            reading.conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._forget(reading)
            return
        if not reading.probation:
            self.over_cap += 1
        reading.probation = False
        reading.lingering = True
        self._push(reading, time.monotonic() + LINGER_SECONDS)

    def _send(self, reading: Reading, data: bytes) -> None:
        # A full buffer or a gone client: the connection closes anyway.
        with contextlib.suppress(OSError):
            reading.conn.sock.send(data)

    def _forget(self, reading: Reading) -> None:
        self._unregister(reading)
        if reading.lingering or reading.probation:
            self.over_cap -= 1
        self.nr_conns -= 1
        reading.conn.close()

    def _unregister(self, reading: Reading) -> None:
        reading.active = False
        self.reading.pop(reading.conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(reading.conn.sock)

    def _push(self, reading: Reading, deadline: float) -> None:
        reading.deadline = deadline
        heapq.heappush(self.deadlines, (deadline, next(self._seq), reading))

    def _close_idle(self, conn: TConn) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()
