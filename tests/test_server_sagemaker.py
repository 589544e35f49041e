"""boto3's `sagemaker-runtime` client through the local SageMaker runtime stand-in, against the
real server: the same answers as direct calls, streams reassembled from awkward `PayloadPart`s."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
from botocore.client import BaseClient

from deploy.invoke import invoke, invoke_stream, make_client
from deploy.sagemaker_local import LocalSageMakerRuntime
from tests.conftest import PROMPTS, RunningServer, free_port

ENDPOINT = "smollm2-local"


@pytest.fixture(scope="module")
def runtime(server: RunningServer) -> Iterator[BaseClient]:
    with LocalSageMakerRuntime(server.url, chunk_sizes=(1, 7, 3, 64, 2)) as front:
        yield make_client(endpoint_url=front.url, region="us-east-1")


def test_invoke_endpoint_generate_chat_and_completions(
    runtime: BaseClient, server: RunningServer, golden
) -> None:
    params = {"max_new_tokens": 12, "details": True}
    answer = invoke(runtime, ENDPOINT, {"inputs": PROMPTS[0], "parameters": params})
    assert isinstance(answer, list)
    # `/invocations` returns the full text by default, as TGI's does.
    assert answer[0]["generated_text"] == PROMPTS[0] + golden(PROMPTS[0], 12)
    assert answer[0]["details"]["finish_reason"] == "length"

    chat = {"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0, "max_tokens": 12}
    direct = requests.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120).json()
    through = invoke(runtime, ENDPOINT, chat)
    assert through["object"] == "chat.completion"
    assert through["choices"][0]["message"] == direct["choices"][0]["message"]

    completion = invoke(
        runtime, ENDPOINT, {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    )
    assert completion["choices"][0]["text"] == golden(PROMPTS[1], 8)


def test_invoke_endpoint_with_response_stream(runtime: BaseClient, golden) -> None:
    prompt = PROMPTS[6]  # Japanese: multi-byte characters cut across PayloadParts
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}}
    events = list(invoke_stream(runtime, ENDPOINT, payload))
    assert [e["index"] for e in events] == list(range(1, 17))
    assert events[-1]["generated_text"] == prompt + golden(prompt, 16)
    assert "".join(e["token"]["text"] for e in events) == golden(prompt, 16)

    chat = {
        "messages": [{"role": "user", "content": "Count to five."}],
        "temperature": 0,
        "max_tokens": 16,
    }
    chunks = list(invoke_stream(runtime, ENDPOINT, chat))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = invoke(runtime, ENDPOINT, {**chat, "stream": False})
    assert streamed == whole["choices"][0]["message"]["content"]


def test_client_errors_arrive_as_model_error(runtime: BaseClient) -> None:
    bad = {"inputs": PROMPTS[0], "parameters": {"temperature": -1}}
    with pytest.raises(runtime.exceptions.ModelError) as raised:
        invoke(runtime, ENDPOINT, bad)
    error = raised.value.response
    assert error["OriginalStatusCode"] == 422
    assert "temperature" in error["OriginalMessage"]
    assert '"error_type":"validation"' in error["OriginalMessage"]


def test_invoke_cli_prints_a_streamed_answer_equal_to_the_whole_one(
    server: RunningServer, golden
) -> None:
    """`python -m deploy.invoke` as the README shows it, through the stand-in CLI."""
    port = free_port()
    stand_in = ["-m", "deploy.sagemaker_local", "--upstream", server.url, "--port", str(port)]
    front = subprocess.Popen(
        [sys.executable, *stand_in],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        payload = json.dumps({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 16}})
        invoke = [sys.executable, "-m", "deploy.invoke", "--endpoint", "local"]
        invoke += ["--endpoint-url", url]
        whole = subprocess.run([*invoke, payload], capture_output=True, text=True, timeout=120)
        streamed = subprocess.run(
            [*invoke, "--stream", payload], capture_output=True, text=True, timeout=120
        )
    finally:
        front.terminate()
        front.wait(10)
    assert whole.returncode == 0 and streamed.returncode == 0, whole.stderr + streamed.stderr
    answer = json.loads(whole.stdout)[0]["generated_text"]
    assert answer == PROMPTS[0] + golden(PROMPTS[0], 16)  # the full text, by default
    assert streamed.stdout == golden(PROMPTS[0], 16) + "\n"  # the streamed tokens
