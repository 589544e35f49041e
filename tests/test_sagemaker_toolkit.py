"""The SageMaker inference toolkit and Multi Model Server mode (`handler.mms`).

- The script functions, called as the toolkit's `Transformer` calls them: content types, accept
  values, and bad requests raising a `BaseInferenceToolkitError` with a 4xx status.
- The toolkit's own `DefaultHandlerService` with `SAGEMAKER_PROGRAM=handler.mms.inference`, and
  our `HandlerService`, driven with MMS's real `Context` as its worker drives them.
- End to end: `SERVING_STACK=mms python -m handler serve` starts the real MMS through
  `sagemaker_inference.model_server.start_model_server` on SmolLM2, answers POST `/invocations`
  with the golden greedy text, and leaves no process behind after SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from mms.context import Context, RequestProcessor
from sagemaker_inference.default_handler_service import DefaultHandlerService
from sagemaker_inference.errors import BaseInferenceToolkitError

from handler.config import ConfigError, flags_as_environ, read_settings
from handler.mms import launcher
from handler.mms.handler_service import HandlerService
from handler.mms.inference import (
    LoadedModel,
    Prediction,
    RequestError,
    input_fn,
    load_model,
    output_fn,
    predict_fn,
)
from tests.conftest import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "MAX_BATCH_SIZE": "2",
    "MAX_TOTAL_TOKENS": "512",
    "HF_AUTO_CAST_TYPE": "fp32",
    "TORCH_COMPILE": "false",  # tests/test_compiled.py covers the compiled step
}
MODEL_VARIABLES = ("HF_MODEL_ID", "MODEL_ID", "SM_ON_MODEL", "SERVING_STACK")
DEEP = b"[" * 100_000 + b"]" * 100_000
"""A body nested deeper than the JSON decoder goes (about 1,000 levels)."""
JRE = "default-jre-headless"
"""Debian's Java runtime (OpenJDK 17 on Debian 12), for MMS's frontend."""


def generate_body(prompt: str = PROMPTS[0], **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": prompt,
        "parameters": {"max_new_tokens": 12, "do_sample": False, **parameters},
    }


def raised(call: Any, *args: Any) -> RequestError:
    """The toolkit error `call(*args)` raises; its status must be a client's (4xx)."""
    with pytest.raises(BaseInferenceToolkitError) as caught:
        call(*args)
    error = caught.value
    assert isinstance(error, RequestError)
    assert 400 <= error.status_code < 500, (error.status_code, error.message)
    return error


# --- settings ----------------------------------------------------------------------------------


def test_flags_reach_the_worker_as_the_same_settings() -> None:
    argv = ["--max-batch-size", "8", "--port", "9001", "--trust-remote-code", "--num-cores", "2"]
    environ = {"HF_BATCH_SIZE": "4", "PORT": "1234", "SM_ON_TENSOR_PARALLEL_SIZE": "4"}
    worker_environ = flags_as_environ(argv, environ)
    assert read_settings([], worker_environ) == read_settings(argv, environ)
    assert worker_environ["MAX_BATCH_SIZE"] == "8" and "HF_BATCH_SIZE" not in worker_environ
    with pytest.raises(ConfigError, match="--hostname"):
        flags_as_environ(["--hostname", "127.0.0.1"], {})


def test_serving_stack_setting() -> None:
    assert read_settings([], {}).serving_stack == "gunicorn"
    assert read_settings([], {"SERVING_STACK": "MMS"}).serving_stack == "mms"
    with pytest.raises(ConfigError, match="SERVING_STACK='uvicorn' is invalid"):
        read_settings([], {"SERVING_STACK": "uvicorn"})
    workers = {"SERVING_STACK": "mms", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    with pytest.raises(ConfigError, match="SAGEMAKER_MODEL_SERVER_WORKERS=2"):
        read_settings([], workers)
    assert read_settings([], {**workers, "SERVING_STACK": "gunicorn"}).model_server_workers == 2


def test_mms_environment() -> None:
    environ = {"PORT": "9000", "PATH": "/usr/bin", "SAGEMAKER_MODEL_SERVER_WORKERS": "1"}
    settings = read_settings(["--port", "8085"], environ)
    out = launcher.mms_environ(settings, ["--port", "8085"], environ)
    assert out["SAGEMAKER_BIND_TO_PORT"] == "8085" and "PORT" not in out
    assert out["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1"
    assert out["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert out["PATH"].endswith(os.pathsep + "/usr/bin")
    assert out["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == "2"  # 2,000,000 bytes, rounded up
    from_port_variable = launcher.mms_environ(read_settings([], environ), [], environ)
    assert from_port_variable["SAGEMAKER_BIND_TO_PORT"] == "9000"


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--hostname", "127.0.0.1"], {}, "--hostname cannot reach the MMS worker"),
        ([], {"JAVA_HOME": "/nonexistent"}, "needs Java 11 or later"),
        (["--port", "40000"], {}, "ports up to 32766, not 40000"),
        ([], {"API_KEY": "secret"}, "no authentication"),
    ],
)
def test_mms_start_refusals(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], expected: str
) -> None:
    """Stopped with status 2 and the fix before anything starts (the environment untouched)."""
    settings = read_settings(argv, {"SERVING_STACK": "mms", **environ})
    before = dict(os.environ)
    assert launcher.serve(settings, argv, {"SERVING_STACK": "mms", **environ}) == 2
    assert expected in capsys.readouterr().err
    assert dict(os.environ) == before


def test_model_directory(tmp_path: Path) -> None:
    """MMS registers its model from `$SAGEMAKER_BASE_DIR/model`: created when the settings name
    the model, a stop with the reason when nothing would hold one."""
    model_dir = tmp_path / "ml" / "model"
    assert "No model to serve" in str(launcher.prepare_model_dir(model_dir, named=False))
    assert launcher.prepare_model_dir(model_dir, named=True) is None and model_dir.is_dir()
    assert launcher.prepare_model_dir(model_dir, named=False) is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    problem = launcher.prepare_model_dir(blocked / "model", named=True)
    assert problem is not None and "SAGEMAKER_BASE_DIR" in problem


# --- input_fn and output_fn: what the transformer passes ----------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (json.dumps(generate_body()), "application/json"),  # the transformer decoded it
        (json.dumps(generate_body()).encode(), "application/json; charset=utf-8"),
        (json.dumps(generate_body()).encode(), "Application/JSON;charset=UTF-8"),
        (json.dumps(generate_body()).encode("utf-16"), "application/json; charset=utf-16"),
        (bytearray(json.dumps(generate_body()).encode()), "text/json"),
        (json.dumps(generate_body()).encode(), None),
        (json.dumps(generate_body()).encode(), "application/octet-stream"),  # the server's rule
    ],
)
def test_input_fn_reads_json_bodies(body: str | bytes, content_type: str | None) -> None:
    request = input_fn(body, content_type)
    assert request.inputs == PROMPTS[0]
    assert request.parameters is not None and request.parameters.max_new_tokens == 12


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error_type", "says"),
    [
        (b"inputs,parameters\nhello,", "text/csv", 415, "unsupported_media_type", "text/csv"),
        (b"\x93NUMPY", "application/x-npy", 415, "unsupported_media_type", "application/json"),
        (None, "application/x-www-form-urlencoded", 415, "unsupported_media_type", "form"),
        (b'{"inputs": ', "application/json", 400, "bad_request", "not valid JSON"),
        (b'{"inputs": "\xff"}', "application/json", 400, "bad_request", "not valid JSON"),
        (DEEP, "application/json", 400, "bad_request", "nested too deeply"),
        (DEEP.decode(), "application/json", 400, "bad_request", "nested too deeply"),
        (b'{"inputs": "\\ud800"}', "application/json", 400, "bad_request", "surrogate"),
        (b'{"inputs": "\xed\xa0\x80"}', "application/json", 400, "bad_request", "not valid JSON"),
        (b"[1, 2]", "application/json", 422, "validation", "expected a JSON object"),
        (b'{"parameters": {}}', "application/json", 422, "validation", "`inputs`"),
        (b'{"inputs": 5}', "application/json", 422, "validation", "`inputs`"),
        (b'{"inputs": "x", "stream": true}', "application/json", 422, "validation", "`stream`"),
        (b'{"messages": []}', "application/json", 422, "validation", "SERVING_STACK=gunicorn"),
        (b'{"inputs": "x", "parameters": {"top_q": 1}}', None, None, None, None),
    ],
)
def test_input_fn_refuses_bad_bodies_with_4xx(
    body: str | bytes | None,
    content_type: str | None,
    status: int | None,
    error_type: str | None,
    says: str | None,
) -> None:
    if status is None:  # unknown parameters are ignored, as TGI's router ignores them
        input_fn(body, content_type)
        return
    error = raised(input_fn, body, content_type)
    assert (error.status_code, error.error_type) == (status, error_type)
    assert says in error.message
    assert json.loads(error.body()) == {"error": error.message, "error_type": error_type}


# --- the functions on the real model ------------------------------------------------------------


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> Iterator[LoadedModel]:
    """A named model (`HF_MODEL_ID`) wins over the directory the toolkit passes."""
    loaded = load_model("/nonexistent/opt/ml/model", {**SHAPES, "HF_MODEL_ID": str(smollm2_dir)})
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def prediction(model: LoadedModel) -> Prediction:
    return predict_fn(input_fn(json.dumps(generate_body()), "application/json"), model)


@pytest.mark.slow
def test_functions_give_the_golden_greedy_answer(
    model: LoadedModel, smollm2_dir: Path, golden: Any
) -> None:
    """input_fn -> predict_fn -> output_fn, as the toolkit's default transform_fn chains them."""
    body = generate_body(PROMPTS[1], max_new_tokens=16, details=True)
    data = input_fn(json.dumps(body).encode(), "application/json; charset=utf-8")
    answer, content_type = output_fn(predict_fn(data, model), "application/json")
    assert content_type == "application/json"
    (generated,) = json.loads(answer)
    # As POST / and TGI's /invocations: the full text by default.
    assert generated["generated_text"] == PROMPTS[1] + golden(PROMPTS[1], 16)
    assert generated["details"]["finish_reason"] == "length"
    assert generated["details"]["generated_tokens"] == 16
    assert model.engine.settings == read_settings([], {**SHAPES, "HF_MODEL_ID": str(smollm2_dir)})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"top_p": 2.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"max_new_tokens": 600}, "must be <= 512"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 stop sequences"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_predict_fn_validates_like_the_server(
    model: LoadedModel, parameters: dict[str, Any], says: str
) -> None:
    data = input_fn(json.dumps(generate_body(**parameters)), "application/json")
    counts = model.metrics.counts

    def counted() -> tuple[int, int]:
        failed = counts.value("tgi_request_failure", err="validation")
        return counts.value("tgi_request_count"), failed

    received, failed = counted()
    error = raised(predict_fn, data, model)
    assert (error.status_code, error.error_type) == (422, "validation")
    assert says in error.message and error.message.startswith("Input validation error")
    assert counted() == (received + 1, failed + 1)  # as the HTTP server counts it


@pytest.mark.slow
@pytest.mark.parametrize(
    "accept",
    [
        "application/json",
        None,
        "*/*",
        "application/*",
        "text/html, application/json;q=0.9",
        "APPLICATION/JSON; charset=utf-8",
    ],
)
def test_output_fn_accepts_json(prediction: Prediction, accept: str | None) -> None:
    answer, content_type = output_fn(prediction, accept)
    assert content_type == "application/json"
    assert json.loads(answer)[0]["generated_text"] == prediction.call.prefix + prediction.final.text


@pytest.mark.slow
@pytest.mark.parametrize("accept", ["text/event-stream", "text/csv", "application/x-npy"])
def test_output_fn_refuses_other_accepts_with_406(prediction: Prediction, accept: str) -> None:
    error = raised(output_fn, prediction, accept)
    assert (error.status_code, error.error_type) == (406, "not_acceptable")
    assert accept in error.message


# --- handler services, driven with MMS's own Context ---------------------------------------------


def mms_context(model_dir: Path, content_type: str | None, accept: str | None) -> Context:
    """The context MMS's worker hands a handler service: request headers as MMS passes them."""
    context = Context("model", str(model_dir), None, 1, None, "1.1.11")
    headers = {"body": {"content-type": content_type or ""}}
    if content_type:
        headers["Content-Type"] = content_type
    if accept:
        headers["Accept"] = accept
    context.request_ids = {0: "test-request"}
    context.request_processor = [RequestProcessor(headers)]
    return context


def handle(
    service: Any,
    model_dir: Path,
    body: bytes,
    content_type: str | None = "application/json",
    accept: str | None = "application/json",
) -> tuple[int, str | None, str]:
    """Status, response content type and body of one request."""
    context = mms_context(model_dir, content_type, accept)
    (answer,) = service.handle([{"body": body}], context)
    status, _ = context.get_response_status(0)
    return status, context.get_response_content_type(0), answer


@pytest.fixture
def toolkit_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the environment, as in an MMS worker; no model named there."""
    for name, value in SHAPES.items():
        monkeypatch.setenv(name, value)
    for name in MODEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # initialize() edits it


@pytest.mark.slow
def test_stock_toolkit_with_this_script(
    toolkit_environment: None, monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path, golden: Any
) -> None:
    """The toolkit's own handler service, with `SAGEMAKER_PROGRAM` naming our module: the model
    comes from the directory MMS passes, and errors keep their 4xx status."""
    monkeypatch.setenv("SAGEMAKER_PROGRAM", "handler.mms.inference")
    service = DefaultHandlerService()
    service.initialize(mms_context(smollm2_dir, None, None))
    loaded: LoadedModel = service._service._model
    try:
        assert loaded.engine.model_id == smollm2_dir.name
        body = json.dumps(generate_body(PROMPTS[2], max_new_tokens=10)).encode()
        status, content_type, answer = handle(service, smollm2_dir, body, accept="*/*")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(answer) == [{"generated_text": PROMPTS[2] + golden(PROMPTS[2], 10)}]
        bad = json.dumps(generate_body(top_k=-1)).encode()
        status, _, answer = handle(service, smollm2_dir, bad)
        assert status == 422 and "`top_k` must be strictly positive" in answer
        status, _, _ = handle(service, smollm2_dir, b"a,b", content_type="text/csv")
        assert status == 415
    finally:
        loaded.close()


@pytest.mark.slow
def test_handler_service_answers_errors_with_json_bodies(
    toolkit_environment: None, monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path, golden: Any
) -> None:
    """Our handler service: the server's error body, no traceback; a crash is a 500."""
    service = HandlerService()
    service.initialize(mms_context(smollm2_dir, None, None))
    loaded = service.transformer.model
    assert loaded is not None
    try:
        body = json.dumps(generate_body(PROMPTS[0], max_new_tokens=8)).encode()
        status, content_type, answer = handle(service, smollm2_dir, body, accept=None)
        assert (status, content_type) == (200, "application/json")
        assert json.loads(answer) == [{"generated_text": PROMPTS[0] + golden(PROMPTS[0], 8)}]

        cases = [
            (json.dumps(generate_body(temperature=0)).encode(), "application/json", None),
            (b"{", "application/json", None),
            (b"1,2", "text/csv", None),
            (body, "application/json", "text/event-stream"),
        ]
        for data, content_type, accept in cases:
            status, response_type, answer = handle(
                service, smollm2_dir, data, content_type, accept or "application/json"
            )
            error = json.loads(answer)
            assert status in (400, 406, 415, 422) and response_type == "application/json"
            assert set(error) == {"error", "error_type"} and "Traceback" not in answer

        # A 400 as from the HTTP server, not the 500 of an exception the toolkit does not know.
        status, response_type, answer = handle(service, smollm2_dir, DEEP)
        assert (status, response_type) == (400, "application/json")
        assert json.loads(answer)["error_type"] == "bad_request"
        assert "nested too deeply" in json.loads(answer)["error"]

        def crash(*args: Any) -> None:
            raise RuntimeError("a bug with /internal/details")

        monkeypatch.setattr(loaded.engine.generator, "submit", crash)
        context = mms_context(smollm2_dir, "application/json", "application/json")
        (answer,) = service.handle([{"body": body}], context)
        assert context.get_response_status(0) == (500, "Internal Server Error")
        assert json.loads(answer) == {
            "error": "Internal server error",
            "error_type": "server_error",
        }
    finally:
        loaded.close()


# --- the real Multi Model Server -----------------------------------------------------------------


def install_java() -> None:
    """Java from Debian's packages when it is missing; skips the test when it cannot be had."""
    if shutil.which("java"):
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("Multi Model Server needs Java: none on PATH, and no apt-get to run as root")
    for step in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", JRE]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = done.stderr.strip()[-300:]
            pytest.skip(f"Multi Model Server needs Java; `apt-get {step[1]}` failed: {tail}")
    if shutil.which("java") is None:
        pytest.skip(f"Multi Model Server needs Java; {JRE} installed no `java` on PATH")


def group_processes(pgid: int) -> list[str]:
    """The processes still in process group `pgid`, described."""
    found = []
    for process in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def free_mms_port() -> int:
    """A free port MMS accepts: below 32767, under the kernel's usual ephemeral range."""
    for port in random.sample(range(20000, launcher.MAX_PORT + 1), 500):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 32767")


def running_mms() -> list[int]:
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        if "com.amazonaws.ml.mms.ModelServer" in (process.info["cmdline"] or []):
            pids.append(process.pid)
    return pids


@pytest.mark.slow
def test_mms_end_to_end(smollm2_dir: Path, tmp_path: Path, golden: Any) -> None:
    """`SERVING_STACK=mms python -m handler serve` on the SageMaker layout: the model in
    `$SAGEMAKER_BASE_DIR/model`, a flag and the environment giving the settings, one worker."""
    install_java()
    assert not running_mms(), "another Multi Model Server runs here: the toolkit allows one"
    base_dir = tmp_path / "ml"
    base_dir.mkdir()
    (base_dir / "model").symlink_to(smollm2_dir, target_is_directory=True)
    port = free_mms_port()
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HF_", "MAX_", "SAGEMAKER_", "SM_")) and name not in MODEL_VARIABLES
    }
    environ.update(
        SERVING_STACK="mms",
        SAGEMAKER_BASE_DIR=str(base_dir),
        TMPDIR=str(tmp_path),
        PYTHONPATH=str(ROOT),
        MAX_TOTAL_TOKENS="512",
    )
    log_path = tmp_path / "mms.log"
    command = [sys.executable, "-m", "handler", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--max-batch-size", "2"],
            cwd=tmp_path,  # the worker must find the code without the working directory
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def failure(what: str) -> str:
        return f"{what}\n{log_path.read_text(errors='replace')[-6000:]}"

    try:
        pings: list[tuple[int, str]] = []
        deadline = time.monotonic() + 60
        while not pings or pings[-1][0] != 200:
            assert process.poll() is None, failure(f"serve exited with {process.returncode}")
            assert time.monotonic() < deadline, failure("MMS did not answer /ping in 60 s")
            try:
                response = requests.get(f"{url}/ping", timeout=2)
                pings.append((response.status_code, response.json().get("status", "")))
            except requests.ConnectionError:
                time.sleep(0.2)

        # Sent as soon as /ping answers, usually before the model has loaded: MMS holds it.
        body = generate_body(PROMPTS[3], max_new_tokens=16)
        response = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert response.status_code == 200, failure(response.text)
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json() == [{"generated_text": PROMPTS[3] + golden(PROMPTS[3], 16)}]

        bad = requests.post(f"{url}/invocations", json=generate_body(top_p=2.0), timeout=30)
        assert bad.status_code == 422, failure(bad.text)
        assert bad.json()["error_type"] == "validation" and "top_p" in bad.json()["error"]
        csv = requests.post(
            f"{url}/invocations", data="a,b", headers={"Content-Type": "text/csv"}, timeout=30
        )
        assert csv.status_code == 415 and csv.json()["error_type"] == "unsupported_media_type"
        stream = requests.post(
            f"{url}/invocations",
            json=body,
            headers={"Accept": "text/event-stream"},
            timeout=60,
        )
        assert stream.status_code == 406, failure(stream.text)
        ping = requests.get(f"{url}/ping", timeout=5)
        assert (ping.status_code, ping.json()) == (200, {"status": "Healthy"})
        assert {status for status, _ in pings} == {200}, pings

        log = log_path.read_text(errors="replace")
        assert "Default workers per model: 1" in log
        assert log.count("ready to serve") == 1, "the model must load once, in one worker"
        assert "2 slots of 512 tokens" in log, "the flag and the environment reach the worker"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, failure("serve did not stop on SIGTERM")
        assert group_processes(process.pid) == [], failure("MMS left processes behind")
    finally:  # whatever happened, no JVM or worker outlives the test
        if group_processes(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
