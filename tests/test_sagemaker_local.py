"""The SageMaker runtime stand-in, driven by boto3's real client against a tiny fake container.

The fake container answers ``/invocations`` by the request's ``mode``: JSON, a 422 or 500 error,
server-sent events sent in 5-byte pieces, a stream that breaks or stalls after two events.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import boto3
import pytest
import requests
from botocore.client import BaseClient
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import EventStreamError

from deploy import invoke as client_examples
from deploy import sagemaker_local
from deploy.sagemaker_local import (
    DEFAULT_CHUNK_SIZES,
    LocalSageMakerRuntime,
    encode_event,
    reframe,
)

EVENTS: list[dict[str, Any]] = [
    {"token": {"id": 1, "text": "日本", "special": False}, "generated_text": None},
    {"token": {"id": 2, "text": "🙂", "special": False}, "generated_text": None},
    {"token": {"id": 3, "text": " über", "special": False}, "generated_text": None},
    {"token": {"id": 0, "text": "</s>", "special": True}, "generated_text": "日本🙂 über"},
]


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


SSE_BODY = sse(EVENTS[0]) + sse(EVENTS[1]) + b": keep-alive\n\n"
SSE_BODY += b"".join(sse(event) for event in EVENTS[2:]) + b"data: [DONE]\n\n"
VALIDATION_ERROR = {
    "error": "Input validation error: `inputs` is empty",
    "error_type": "validation",
}


class FakeContainer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[dict[str, str], dict[str, Any]]]] = []

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((dict(self.headers), request))
        mode = request["mode"]
        if mode == "json":
            self._answer(
                200, {"generated_text": "日本🙂"}, {"X-Amzn-SageMaker-Custom-Attributes": "seen"}
            )
        elif mode in ("422", "500"):
            self._answer(int(mode), VALIDATION_ERROR if mode == "422" else {"error": "boom"})
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = SSE_BODY if mode == "sse" else sse(EVENTS[0]) + sse(EVENTS[1])
            # The stand-in may hang up first (a stalled stream it timed out): not an error here.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for start in range(0, len(body), 5):
                    piece = body[start : start + 5]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                if mode == "sse":
                    self.wfile.write(b"0\r\n\r\n")
                elif mode == "stall":
                    time.sleep(2)
            self.close_connection = True

    def _answer(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeContainer)
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def runtime(container: str) -> Iterator[LocalSageMakerRuntime]:
    with LocalSageMakerRuntime(container) as running:
        yield running


def make_client(url: str, **config: Any) -> BaseClient:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(**config),
    )


@pytest.fixture(scope="module")
def client(runtime: LocalSageMakerRuntime) -> BaseClient:
    return make_client(runtime.url)


def body(mode: str) -> bytes:
    return json.dumps({"mode": mode, "inputs": "Hi"}).encode()


def test_event_encoding_is_what_botocore_decodes() -> None:
    headers = {":event-type": "PayloadPart", ":message-type": "event"}
    buffer = EventStreamBuffer()
    buffer.add_data(encode_event(headers, "日本".encode()[:4]) + encode_event({}, b""))
    first, second = list(buffer)
    assert first.headers == headers
    assert first.payload == "日本".encode()[:4]
    assert (second.headers, second.payload) == ({}, b"")


def test_reframe_cuts_at_cycle_offsets_and_piece_ends() -> None:
    parts = list(reframe([b"abcdefghijkl", b"mn"], (1, 7, 3)))
    assert parts == [b"a", b"bcdefgh", b"ijk", b"l", b"mn"]
    assert list(reframe([b"abc", b"", b"d"], None)) == [b"abc", b"d"]


def test_invoke_endpoint_forwards_body_headers_and_answer(
    client: BaseClient, runtime: LocalSageMakerRuntime
) -> None:
    response = client.invoke_endpoint(
        EndpointName="my endpoint/1",
        Body=body("json"),
        ContentType="application/json",
        Accept="application/json",
        CustomAttributes="trace=abc",
        InferenceId="req-1",
        TargetModel="model.tar.gz",
    )
    assert json.loads(response["Body"].read()) == {"generated_text": "日本🙂"}
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "seen"
    headers, request = FakeContainer.seen[-1]
    assert request == {"mode": "json", "inputs": "Hi"}
    assert headers["Content-Type"] == headers["Accept"] == "application/json"
    assert headers["X-Amzn-SageMaker-Custom-Attributes"] == "trace=abc"
    assert headers["X-Amzn-SageMaker-Inference-Id"] == "req-1"
    assert headers["X-Amzn-SageMaker-Target-Model"] == "model.tar.gz"
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    ("status", "original"), [(422, VALIDATION_ERROR), (500, {"error": "boom"})]
)
@pytest.mark.parametrize("streaming", [False, True])
def test_container_errors_become_model_error(
    client: BaseClient, status: int, original: dict[str, Any], streaming: bool
) -> None:
    call = client.invoke_endpoint_with_response_stream if streaming else client.invoke_endpoint
    with pytest.raises(client.exceptions.ModelError) as raised:
        call(EndpointName="ep", Body=body(str(status)), ContentType="application/json")
    error = raised.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["Error"]["Code"] == "ModelError"
    assert error["OriginalStatusCode"] == status
    assert json.loads(error["OriginalMessage"]) == original
    assert error["LogStreamArn"].endswith(":log-group:/aws/sagemaker/Endpoints/ep")
    assert f"error ({status}) from primary" in error["Error"]["Message"]


@pytest.mark.parametrize(
    ("status", "error_code"), [(422, "CLIENT_ERROR_FROM_MODEL"), (500, "SERVER_ERROR_FROM_MODEL")]
)
def test_model_error_body_has_sagemaker_error_code(
    runtime: LocalSageMakerRuntime, status: int, error_code: str
) -> None:
    """botocore keeps only the modeled fields; SageMaker's body also names the error kind."""
    answer = requests.post(f"{runtime.url}/endpoints/ep/invocations", data=body(str(status)))
    assert answer.status_code == 424
    assert answer.headers["x-amzn-ErrorType"] == "ModelError"
    assert answer.json()["ErrorCode"] == error_code


def test_stream_parts_split_lines_and_characters(client: BaseClient) -> None:
    response = client.invoke_endpoint_with_response_stream(
        EndpointName="ep",
        Body=body("sse"),
        ContentType="application/json",
        Accept="text/event-stream",
    )
    assert response["ContentType"] == "text/event-stream"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    parts = [event["PayloadPart"]["Bytes"] for event in response["Body"]]
    assert b"".join(parts) == SSE_BODY
    cuts = set(itertools.accumulate(len(part) for part in parts[:-1]))
    offsets = itertools.accumulate(itertools.cycle(DEFAULT_CHUNK_SIZES))
    assert set(itertools.takewhile(lambda offset: offset < len(SSE_BODY), offsets)) <= cuts
    assert any(SSE_BODY[cut] & 0xC0 == 0x80 for cut in cuts), "no part splits a UTF-8 character"
    assert any(SSE_BODY[cut - 1 : cut + 1] != b"\n\n" for cut in cuts), "no part splits a line"
    assert FakeContainer.seen[-1][0]["Accept"] == "text/event-stream"


def test_invoke_stream_reassembles_the_events(client: BaseClient) -> None:
    events = client_examples.invoke_stream(client, "ep", {"mode": "sse", "inputs": "Hi"})
    assert list(events) == EVENTS
    assert FakeContainer.seen[-1][1]["stream"] is True


def test_read_sse_reassembles_any_split() -> None:
    crlf = SSE_BODY.replace(b"\n", b"\r\n")
    for stream in (SSE_BODY, crlf):
        assert list(client_examples.read_sse(bytes([b]) for b in stream)) == EVENTS
        for cut in range(len(stream)):
            assert list(client_examples.read_sse([stream[:cut], stream[cut:]])) == EVENTS


@pytest.mark.parametrize(
    ("mode", "timeout", "code"),
    [("broken", 60.0, "StreamBroken"), ("stall", 0.5, "ModelInvocationTimeExceeded")],
)
def test_a_stream_failing_midway_ends_with_model_stream_error(
    container: str, mode: str, timeout: float, code: str
) -> None:
    with LocalSageMakerRuntime(container, timeout=timeout) as runtime:
        stream_client = make_client(runtime.url)
        received = []
        with pytest.raises(client_examples.EndpointStreamError) as raised:
            for event in client_examples.invoke_stream(stream_client, "ep", {"mode": mode}):
                received.append(event)
        assert received == EVENTS[:2]
        assert raised.value.code == "ModelStreamError"
        assert code in raised.value.message
        assert isinstance(raised.value.__cause__, EventStreamError)


def test_a_failure_inside_the_stand_in_ends_the_stream_with_internal_stream_failure(
    client: BaseClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = iter([sagemaker_local.payload_part(b"data: {}")])
    monkeypatch.setattr(sagemaker_local, "payload_part", lambda data: next(parts))
    with pytest.raises(client_examples.EndpointStreamError) as raised:
        list(client_examples.invoke_stream(client, "ep", {"mode": "sse"}))
    assert raised.value.code == "InternalStreamFailure"


def test_unreachable_container_is_service_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with LocalSageMakerRuntime(f"http://127.0.0.1:{port}") as runtime:
        no_retry = make_client(runtime.url, retries={"total_max_attempts": 1})
        with pytest.raises(no_retry.exceptions.ServiceUnavailable):
            no_retry.invoke_endpoint(EndpointName="ep", Body=body("json"))


def test_command_line_client(
    runtime: LocalSageMakerRuntime, capsys: pytest.CaptureFixture[str]
) -> None:
    client_examples.main(["--endpoint", "ep", "--endpoint-url", runtime.url, '{"mode": "json"}'])
    assert json.loads(capsys.readouterr().out) == {"generated_text": "日本🙂"}
    client_examples.main(
        ["--endpoint", "ep", "--endpoint-url", runtime.url, "--stream", '{"mode": "sse"}']
    )
    assert capsys.readouterr().out == "日本🙂 über\n"
    with pytest.raises(SystemExit, match="ModelError"):
        client_examples.main(["--endpoint", "ep", "--endpoint-url", runtime.url, '{"mode": "422"}'])
