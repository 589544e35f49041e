"""A local stand-in for the SageMaker runtime front end, for boto3's unchanged client.

On AWS, ``runtime.sagemaker.<region>.amazonaws.com`` sits between the caller and the container:
it turns ``InvokeEndpoint`` and ``InvokeEndpointWithResponseStream`` into ``POST /invocations`` on
the container, reports the container's 4xx/5xx answers as ``ModelError``, and cuts streamed bytes
into event-stream ``PayloadPart`` messages at arbitrary boundaries (inside SSE lines, JSON objects
and UTF-8 characters). This server does the same in front of a local container, so client code
written for a real endpoint can be run, unchanged, against ``make serve`` or a ``docker run``,
including the awkward part boundaries that otherwise show up only in production.

Run it next to a container::

    python -m deploy.sagemaker_local --upstream http://127.0.0.1:8080 --port 8081

then point boto3 at it (signatures are not checked, any credentials do)::

    client = boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8081",
                          region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    client.invoke_endpoint(EndpointName="any-name", ContentType="application/json",
                           Body=b'{"inputs": "What is Deep Learning?"}')

Every endpoint name reaches the one upstream. Parts of a stream are cut at the stream offsets that
the cycle of ``chunk_sizes`` reaches (1, 8, 11, 75, 77, 78, 85... bytes by default) and wherever
the upstream's data pauses; bytes are never held back.

Errors, as SageMaker reports them:

* the container answers 4xx / 5xx (both operations; streaming: before the first byte): HTTP 424
  ``ModelError`` with ``ErrorCode`` ``CLIENT_ERROR_FROM_MODEL`` / ``SERVER_ERROR_FROM_MODEL``,
  ``OriginalStatusCode``, ``OriginalMessage`` (the container's body), ``LogStreamArn``, ``Message``;
* the container stays silent longer than ``timeout`` or breaks its answer before streaming
  starts: ``ModelError`` with ``OriginalStatusCode`` 0;
* the container cannot be reached: HTTP 503 ``ServiceUnavailable`` (botocore retries it);
* the stream breaks or stalls once started: a ``ModelStreamError`` event with ``ErrorCode``
  ``StreamBroken`` / ``ModelInvocationTimeExceeded`` (botocore raises ``EventStreamError``);
* a bug in this server: HTTP 500 ``InternalFailure``, or an ``InternalStreamFailure`` event.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import struct
import threading
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote

import requests
import urllib3

log = logging.getLogger("deploy.sagemaker_local")

DEFAULT_CHUNK_SIZES = (1, 7, 3, 64, 2)
ACCOUNT_ID = "000000000000"
REGION = "us-east-1"
DEFAULT_VARIANT = "AllTraffic"
EVENT_STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

_OPERATIONS = {
    "invocations": "InvokeEndpoint",
    "invocations-response-stream": "InvokeEndpointWithResponseStream",
}
_PATH = re.compile(r"/endpoints/([^/]+)/(invocations|invocations-response-stream)")
_TO_CONTAINER = (
    "X-Amzn-SageMaker-Custom-Attributes",
    "X-Amzn-SageMaker-Target-Model",
    "X-Amzn-SageMaker-Inference-Id",
    "X-Amzn-SageMaker-Session-Id",
)
_FROM_CONTAINER = (
    "X-Amzn-SageMaker-Custom-Attributes",
    "X-Amzn-SageMaker-New-Session-Id",
    "X-Amzn-SageMaker-Closed-Session-Id",
)
_TIMEOUT_MESSAGE = (
    "Your invocation timed out while waiting for a response from container primary. Review the "
    "latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again."
)
_BROKEN_MESSAGE = "The model container closed the connection before it finished answering."


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude, string headers, payload and the two CRC32s."""
    encoded = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        encoded += struct.pack(">B", len(raw_name)) + raw_name
        encoded += struct.pack(">BH", 7, len(raw_value)) + raw_value
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event carrying ``data``."""
    headers = {
        ":event-type": "PayloadPart",
        ":message-type": "event",
        ":content-type": "application/octet-stream",
    }
    return encode_event(headers, data)


def stream_exception(exception_type: str, message: str, error_code: str | None = None) -> bytes:
    """An exception event (``ModelStreamError``, ``InternalStreamFailure``) ending a stream."""
    body: dict[str, str] = {"Message": message}
    if error_code is not None:
        body["ErrorCode"] = error_code
    headers = {
        ":exception-type": exception_type,
        ":message-type": "exception",
        ":content-type": "application/json",
    }
    return encode_event(headers, json.dumps(body).encode())


def reframe(pieces: Iterable[bytes], chunk_sizes: Sequence[int] | None) -> Iterator[bytes]:
    """Cut a byte stream at every offset the cycle of ``chunk_sizes`` reaches and wherever a piece
    ends, holding nothing back; ``None`` passes the pieces through as they come."""
    if chunk_sizes is None:
        yield from (piece for piece in pieces if piece)
        return
    sizes = itertools.cycle(chunk_sizes)
    left = next(sizes)
    for piece in pieces:
        while piece:
            part, piece = piece[:left], piece[left:]
            left -= len(part)
            if left == 0:
                left = next(sizes)
            yield part


def _read_available(response: requests.Response) -> Iterator[bytes]:
    """The upstream body, each piece as soon as it arrives (``iter_content`` waits to fill)."""
    while piece := response.raw.read1(65536):
        yield piece


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError) or any(
        isinstance(arg, urllib3.exceptions.TimeoutError) for arg in exc.args
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    server_address: tuple[str, int]
    """The bound address, as the socket reports it (an IPv4 host as text, the port chosen)."""

    def __init__(
        self,
        address: tuple[str, int],
        upstream: str,
        chunk_sizes: tuple[int, ...] | None,
        timeout: float,
    ) -> None:
        super().__init__(address, _Handler)
        self.upstream = upstream
        self.chunk_sizes = chunk_sizes
        self.upstream_timeout = timeout


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 300
    _streaming = False

    def do_POST(self) -> None:
        self._streaming = False
        self._request_id = str(uuid.uuid4())
        body = self._read_body()
        match = _PATH.fullmatch(self.path.split("?", 1)[0])
        if match is None:
            self._send_error(404, "UnknownOperationException", {"Message": "Unknown operation"})
            return
        endpoint, operation = unquote(match[1]), _OPERATIONS[match[2]]
        try:
            if operation == "InvokeEndpoint":
                self._invoke(endpoint, body)
            else:
                self._invoke_stream(endpoint, body)
        except ConnectionError:
            self.close_connection = True
        except Exception:
            log.exception("%s failed in the stand-in", operation)
            self.close_connection = True
            message = {"Message": "The stand-in failed; see its log."}
            if not self._streaming:
                self._send_error(500, "InternalFailure", message)
                return
            try:
                self._write_chunk(stream_exception("InternalStreamFailure", message["Message"]))
                self._write_chunk(b"")
            except OSError:
                pass

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline().strip():
            pass
        return body

    def _call_upstream(
        self, endpoint: str, body: bytes, accept_header: str
    ) -> requests.Response | None:
        """POST to the container's ``/invocations``; on failure answer the caller, return None."""
        headers = {"Accept-Encoding": "identity"}
        for ours, theirs in [("Content-Type", "Content-Type"), (accept_header, "Accept")]:
            if (value := self.headers.get(ours)) is not None:
                headers[theirs] = value
        headers |= {name: value for name in _TO_CONTAINER if (value := self.headers.get(name))}
        try:
            return requests.post(
                f"{self.server.upstream}/invocations",
                data=body,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(10, self.server.upstream_timeout),
            )
        except requests.RequestException as exc:
            if _timed_out(exc) and not isinstance(exc, requests.ConnectTimeout):
                self._send_model_error(endpoint, 0, _TIMEOUT_MESSAGE)
            else:
                log.warning("upstream %s unreachable: %s", self.server.upstream, exc)
                message = f"The model container at {self.server.upstream} could not be reached."
                self._send_error(503, "ServiceUnavailable", {"Message": message})
            return None

    def _invoke(self, endpoint: str, body: bytes) -> None:
        response = self._call_upstream(endpoint, body, "Accept")
        if response is None:
            return
        with response:
            try:
                content = response.content
            except requests.RequestException as exc:
                message = _TIMEOUT_MESSAGE if _timed_out(exc) else _BROKEN_MESSAGE
                self._send_model_error(endpoint, 0, message)
                return
            if response.status_code >= 400:
                original = content.decode("utf-8", errors="replace")
                self._send_model_error(endpoint, response.status_code, original)
                return
            self._start_response(response, response.headers.get("Content-Type"))
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

    def _invoke_stream(self, endpoint: str, body: bytes) -> None:
        response = self._call_upstream(endpoint, body, "X-Amzn-SageMaker-Accept")
        if response is None:
            return
        with response:
            if response.status_code >= 400:
                try:
                    original = response.content.decode("utf-8", errors="replace")
                except requests.RequestException:
                    original = _BROKEN_MESSAGE
                self._send_model_error(endpoint, response.status_code, original)
                return
            self._start_response(response, EVENT_STREAM_CONTENT_TYPE)
            if content_type := response.headers.get("Content-Type"):
                self.send_header("X-Amzn-SageMaker-Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._streaming = True
            try:
                for part in reframe(_read_available(response), self.server.chunk_sizes):
                    self._write_chunk(payload_part(part))
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                if _timed_out(exc):
                    code, why = "ModelInvocationTimeExceeded", "stopped sending for too long"
                else:
                    code, why = "StreamBroken", "closed the connection mid-stream"
                log.warning("upstream stream ended early (%s): %s", code, exc)
                message = f"{code}: the model container {why}."
                self._write_chunk(stream_exception("ModelStreamError", message, code))
            self._write_chunk(b"")

    def _start_response(self, response: requests.Response, content_type: str | None) -> None:
        self.send_response(200)
        if content_type:
            self.send_header("Content-Type", content_type)
        variant = self.headers.get("X-Amzn-SageMaker-Target-Variant") or DEFAULT_VARIANT
        self.send_header("x-Amzn-Invoked-Production-Variant", variant)
        self.send_header("x-amzn-RequestId", self._request_id)
        for name in _FROM_CONTAINER:
            if value := response.headers.get(name):
                self.send_header(name, value)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))

    def _send_model_error(self, endpoint: str, status: int, original: str) -> None:
        side = "client" if 400 <= status < 500 else "server"
        group = f"/aws/sagemaker/Endpoints/{endpoint}"
        console = f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}"
        fields = {
            "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL",
            "LogStreamArn": f"arn:aws:logs:{REGION}:{ACCOUNT_ID}:log-group:{group}",
            "Message": (
                f'Received {side} error ({status}) from primary with message "{original}". '
                f"See {console}#logEventViewer:group={group} in account {ACCOUNT_ID} "
                "for more information."
            ),
            "OriginalMessage": original,
            "OriginalStatusCode": status,
        }
        self._send_error(424, "ModelError", fields)

    def _send_error(self, status: int, error_type: str, fields: dict[str, Any]) -> None:
        data = json.dumps(fields).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("x-amzn-RequestId", self._request_id)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalSageMakerRuntime:
    """The stand-in, bound at construction (``port=0``: any free port), served by ``start()``.

    ``chunk_sizes``: the cycle of part sizes re-framing streams (``None``: upstream pieces as they
    arrive). ``timeout``: seconds the container may stay silent before the call fails.
    """

    def __init__(
        self,
        upstream: str,
        chunk_sizes: Sequence[int] | None = DEFAULT_CHUNK_SIZES,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = 60.0,
    ) -> None:
        if chunk_sizes is not None and (not chunk_sizes or min(chunk_sizes) < 1):
            raise ValueError(f"chunk_sizes must be positive sizes or None, not {chunk_sizes!r}")
        sizes = None if chunk_sizes is None else tuple(chunk_sizes)
        self._server = _Server((host, port), upstream.rstrip("/"), sizes, timeout)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The ``endpoint_url`` to give boto3."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        """Serve in a daemon thread (once: a second call does nothing)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="sagemaker-local", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _chunk_sizes(text: str) -> tuple[int, ...] | None:
    if text.lower() == "none":
        return None
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("expected positive sizes like 1,7,3,64,2, or none")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve the stand-in in front of ``--upstream`` until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.sagemaker_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--upstream", default="http://127.0.0.1:8080", help="the container")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on")
    parser.add_argument(
        "--chunk-sizes",
        type=_chunk_sizes,
        default=DEFAULT_CHUNK_SIZES,
        help="cycle of PayloadPart sizes, e.g. 1,7,3,64,2; none: as the upstream sends",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="upstream silence limit (s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    runtime = LocalSageMakerRuntime(
        args.upstream, args.chunk_sizes, args.host, args.port, args.timeout
    )
    log.info("SageMaker runtime stand-in on %s -> %s/invocations", runtime.url, args.upstream)
    log.info(
        'boto3.client("sagemaker-runtime", endpoint_url="%s", region_name="%s", '
        'aws_access_key_id="x", aws_secret_access_key="x")',
        runtime.url,
        REGION,
    )
    try:
        runtime.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.stop()


if __name__ == "__main__":
    main()
