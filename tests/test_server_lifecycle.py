"""Readiness while loading, draining on SIGTERM, slots freed by clients that go away."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.conftest import PROMPTS, RunningServer, launch_server

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A prompt the model continues for hundreds of tokens without stopping."""


def data_events(lines: Iterator[bytes]) -> Iterator[dict]:
    """The JSON of each `data: ` line. Keep one iterator per response: abandoning a
    `requests` line iterator closes the connection."""
    for line in lines:
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: ") :])


def metric(server: RunningServer, name: str) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not reported")


def test_ping_is_503_with_the_stage_while_loading_then_200(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    server = launch_server(smollm2_dir, tmp_path, wait=False)
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"{server.url}/ping", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            body = response.json()
            seen.append((response.status_code, body.get("status", "")))
            if response.status_code == 200:
                break
            assert response.status_code == 503
            assert body["error_type"] == "healthcheck" and body["error"]
            health = requests.get(f"{server.url}/health", timeout=2)
            assert health.status_code in (503, 200)
            time.sleep(0.05)
        assert seen and seen[-1] == (200, "ready"), seen
        stages = [stage for status, stage in seen if status == 503]
        assert stages, "the server answered before loading, as it must"
        assert set(stages) <= {"starting", "downloading", "loading", "warming_up"}
        assert "loading" in stages or "warming_up" in stages
        assert requests.get(f"{server.url}/health", timeout=2).status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_refuses_new_requests_finishes_running_ones_and_exits_0(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    server = launch_server(smollm2_dir, tmp_path, SHUTDOWN_GRACE_SECONDS="25")
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 30, "details": True}}
    streams = [
        requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=60)
        for _ in range(2)
    ]
    lines = [stream.iter_lines() for stream in streams]
    for stream_lines in lines:
        assert next(data_events(stream_lines))["index"] == 1
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = requests.post(f"{server.url}/generate", json={"inputs": "Hi"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error_type"] == "healthcheck"
    assert requests.get(f"{server.url}/ping", timeout=2).status_code == 503
    for stream_lines in lines:
        events = list(data_events(stream_lines))
        assert events[-1]["details"]["generated_tokens"] == 30
        assert events[-1]["generated_text"]
    assert server.process.wait(timeout=60) == 0, server.log()
    assert "drained: 0 requests left" in server.log()


def test_abandoned_streams_free_their_slots(server: RunningServer, golden) -> None:
    """8 streams dropped by their clients (4 running, 4 waiting), then 4 requests (the batch
    size) that all complete with their greedy answers."""
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 400}}
    streams, lines = [], []
    for index in range(8):
        stream = requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=60)
        streams.append(stream)
        lines.append(stream.iter_lines())  # kept: a dropped line iterator closes the connection
        if index < 4:  # running: wait for its first token; the other 4 wait for a slot
            next(data_events(lines[-1]))
    deadline = time.monotonic() + 30
    while metric(server, "tgi_queue_size") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "tgi_batch_current_size") == 4
    assert metric(server, "tgi_queue_size") == 4
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 10
    while metric(server, "tgi_batch_current_size") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "tgi_batch_current_size") == 0
    assert metric(server, "tgi_queue_size") == 0

    def run(prompt: str) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 8}}
        response = requests.post(f"{server.url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["generated_text"]

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(run, PROMPTS[:4]))
    assert texts == [golden(p, 8) for p in PROMPTS[:4]]
    cancelled = 'tgi_request_failure{err="cancelled"}'
    assert metric(server, cancelled) >= 8


def test_a_model_that_cannot_load_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    server = launch_server(missing, tmp_path, wait=False, HF_HUB_OFFLINE="1")
    assert server.process.wait(timeout=120) == 3
    log = server.log()
    assert "loading the model failed" in log and "no-such-model" in log
