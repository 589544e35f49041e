"""Loading is immune to the serving stacks' timeouts.

- gunicorn: the real server, with a 2 s worker timeout and a fake load that holds the GIL for
  6 s in a native call (as reading weights or loading compiled graphs can), must keep its worker
  and reach the next loading stage; outside loading the timeout still applies.
- Multi Model Server: with a 2 s response timeout (`SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS`),
  our handler service answers MMS's load and each request within it while a slow load goes on,
  then serves the model once loaded.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from gunicorn.config import Config
from gunicorn.workers.workertmp import WorkerTmp

from handler.config import read_settings
from handler.mms import inference
from handler.mms.handler_service import HandlerService
from handler.server.launcher import LoadingHeartbeat
from tests.conftest import PROMPTS, free_port
from tests.test_sagemaker_toolkit import MODEL_VARIABLES, SHAPES, generate_body, handle, mms_context

ROOT = Path(__file__).resolve().parents[1]

SLOW_GUNICORN_LOAD = """
import ctypes
import sys
import threading
import time

from handler import engine
from handler.config import read_settings
from handler.server import launcher


def slow_load(settings, report, **kwargs):
    report("loading")
    time.sleep(2)  # the worker's main loop runs and checks in (until then it cannot time out)
    ctypes.PyDLL(None).sleep({hold})  # a native call that never releases the GIL
    report("warming_up")
    threading.Event().wait()


engine.load_engine = slow_load
settings = read_settings(["--hostname", "127.0.0.1", "--port", "{port}"], {{}})
launcher.ServingApplication(settings, {{}}, worker_timeout={timeout}).run()
"""


def test_heartbeat_reads_as_current_only_while_loading() -> None:
    heartbeat = LoadingHeartbeat(WorkerTmp(Config()))
    try:
        heartbeat.notify()
        before = heartbeat.last_update()
        assert before == heartbeat.tmp.last_update()
        with heartbeat.loading():
            assert heartbeat.last_update() == math.inf
        ended = heartbeat.last_update()
        assert ended > before and ended <= time.monotonic()
    finally:
        heartbeat.close()


def test_gunicorn_keeps_a_worker_whose_load_holds_the_gil(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(SLOW_GUNICORN_LOAD.format(hold=6, port=port, timeout=2))
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        stages = []
        deadline = time.monotonic() + 90
        while not stages or stages[-1] != "warming_up":
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"{stages}\n{log_path.read_text()}"
            assert "WORKER TIMEOUT" not in log_path.read_text(), log_path.read_text()
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/ping", timeout=1)
                stages.append(answer.json()["status"])
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.2)
        log = log_path.read_text()
        assert "WORKER TIMEOUT" not in log, log
        assert log.count("Booting worker") == 1, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0, log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()


# --- Multi Model Server --------------------------------------------------------------------------

MMS_TIMEOUT = 2
"""`SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS` of the test: MMS restarts a worker that has not
replied within it, the model load included."""
LOAD_SECONDS = 6


@pytest.fixture
def slow_mms_load(
    monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path
) -> Iterator[list[HandlerService]]:
    """The worker's environment with a short MMS timeout, and a load that takes 6 s more."""
    for name, value in SHAPES.items():
        monkeypatch.setenv(name, value)
    for name in MODEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", str(MMS_TIMEOUT))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # initialize() edits it
    real_load = inference.load_engine

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(LOAD_SECONDS)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(inference, "load_engine", slow_load)
    services: list[HandlerService] = []
    yield services
    for service in services:
        model = service.transformer.model
        if model is not None:
            model.state.loaded.wait(120)
            model.close()


@pytest.mark.slow
def test_mms_replies_within_its_timeout_while_the_model_loads(
    slow_mms_load: list[HandlerService], smollm2_dir: Path, golden: Any
) -> None:
    service = HandlerService()
    slow_mms_load.append(service)
    started = time.monotonic()
    service.initialize(mms_context(smollm2_dir, None, None))
    assert time.monotonic() - started < MMS_TIMEOUT, "the load reply came after MMS's timeout"

    body = json.dumps(generate_body(PROMPTS[0], max_new_tokens=8)).encode()
    answers = []
    deadline = time.monotonic() + 120
    while not answers or answers[-1][0] != 200:
        assert time.monotonic() < deadline, answers
        asked = time.monotonic()
        answers.append(handle(service, smollm2_dir, body))
        assert time.monotonic() - asked < MMS_TIMEOUT, "a reply came after MMS's timeout"
    status, _, first = answers[0]
    assert status == 503, answers[0]
    assert json.loads(first)["error_type"] == "healthcheck"
    assert "not ready yet" in json.loads(first)["error"]
    [answer] = json.loads(answers[-1][2])
    assert answer["generated_text"].endswith(golden(PROMPTS[0], 8))  # with the prompt or not


def test_mms_load_waits_up_to_the_response_timeout_less_a_margin() -> None:
    assert read_settings([], {}).mms_response_timeout() == 3600  # the toolkit's 60 minutes
    minutes = read_settings([], {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "2"})
    assert minutes.mms_response_timeout() == 120
    both = {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "2", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30"}
    assert read_settings([], both).mms_response_timeout() == 30
    assert inference.load_wait(read_settings([], {})) == 3600 - inference.REPLY_MARGIN
    short = read_settings([], {"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "2"})
    assert inference.load_wait(short) == 1
