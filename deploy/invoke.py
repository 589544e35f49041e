"""Call a SageMaker endpoint serving this container the way client code does, with boto3.

``invoke`` sends one JSON request. ``invoke_stream`` streams: SageMaker cuts the container's
server-sent events into ``PayloadPart``s at arbitrary byte boundaries (inside lines, JSON objects
and UTF-8 characters), so the parts are buffered and split back into events here. Both work the
same against a real endpoint and against ``deploy.sagemaker_local``::

    python -m deploy.invoke --endpoint my-endpoint '{"inputs": "What is Deep Learning?"}'
    python -m deploy.invoke --endpoint local --endpoint-url http://127.0.0.1:8081 --stream \\
        '{"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 64}}'
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError, EventStreamError

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class EndpointStreamError(RuntimeError):
    """The endpoint reported a failure (``ModelStreamError``...) in the middle of a stream."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def invoke(
    client: BaseClient,
    endpoint_name: str,
    payload: dict[str, Any],
    accept: str = "application/json",
    **kwargs: Any,
) -> dict[str, Any] | list[Any]:
    """The JSON answer to one request; ``kwargs`` go to ``invoke_endpoint`` (CustomAttributes)."""
    response = client.invoke_endpoint(
        EndpointName=endpoint_name,
        Body=json.dumps(payload),
        ContentType="application/json",
        Accept=accept,
        **kwargs,
    )
    return json.loads(response["Body"].read())


def invoke_stream(
    client: BaseClient, endpoint_name: str, payload: dict[str, Any], **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Each streamed event's JSON, as it arrives. ``"stream": true`` is added unless given."""
    response = client.invoke_endpoint_with_response_stream(
        EndpointName=endpoint_name,
        Body=json.dumps({"stream": True, **payload}),
        ContentType="application/json",
        Accept="text/event-stream",
        **kwargs,
    )
    yield from read_sse(payload_bytes(response["Body"]))


def payload_bytes(events: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """The bytes of each ``PayloadPart``; a stream error raises ``EndpointStreamError``."""
    try:
        for event in events:
            if "PayloadPart" in event:
                yield event["PayloadPart"]["Bytes"]
            else:
                name, error = next(iter(event.items()))
                raise EndpointStreamError(name, error.get("Message", ""))
    except EventStreamError as exc:
        error = exc.response.get("Error", {})
        raise EndpointStreamError(error.get("Code", "?"), error.get("Message", "")) from exc


def read_sse(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON ``data`` of server-sent events from bytes cut anywhere; stops at ``[DONE]``."""
    data: list[str] = []
    for line in _lines(chunks):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            text, data = "\n".join(data), []
            if text == "[DONE]":
                return
            yield json.loads(text)


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Complete lines, decoded only once whole; the end of the stream ends the last event."""
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.decode("utf-8").removesuffix("\r")
    if pending:
        yield pending.decode("utf-8").removesuffix("\r")
    yield ""


def event_text(event: dict[str, Any]) -> str:
    """The new text in a streamed event: TGI ``token.text`` or OpenAI ``choices[0]``."""
    if token := event.get("token"):
        return "" if token.get("special") else token.get("text", "")
    choice = (event.get("choices") or [{}])[0]
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def make_client(endpoint_url: str | None = None, region: str | None = None) -> BaseClient:
    """A ``sagemaker-runtime`` client; a loopback ``endpoint_url`` (the local stand-in, which
    checks no signature) gets placeholder credentials."""
    credentials = {}
    if endpoint_url and urlsplit(endpoint_url).hostname in _LOOPBACK:
        credentials = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}
    region = region or boto3.Session().region_name or "us-east-1"
    return boto3.client(
        "sagemaker-runtime", endpoint_url=endpoint_url, region_name=region, **credentials
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print the answer, or the streamed text as it arrives."""
    parser = argparse.ArgumentParser(prog="python -m deploy.invoke", description=__doc__)
    parser.add_argument("payload", help='JSON request body, e.g. \'{"inputs": "Hello"}\'')
    parser.add_argument("--endpoint", required=True, help="endpoint name")
    parser.add_argument("--endpoint-url", help="e.g. http://127.0.0.1:8081 for the stand-in")
    parser.add_argument("--region", help="AWS region (default: configured, else us-east-1)")
    parser.add_argument("--stream", action="store_true", help="InvokeEndpointWithResponseStream")
    args = parser.parse_args(argv)
    client = make_client(args.endpoint_url, args.region)
    payload = json.loads(args.payload)
    try:
        if args.stream:
            for event in invoke_stream(client, args.endpoint, payload):
                print(event_text(event), end="", flush=True)
            print()
        else:
            print(json.dumps(invoke(client, args.endpoint, payload), indent=2, ensure_ascii=False))
    except (BotoCoreError, ClientError, EndpointStreamError) as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
