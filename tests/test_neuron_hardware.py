"""The Neuron path on real hardware: `make test-neuron` on an inf2, trn1 or trn2 instance.

Tests marked `neuron` export SmolLM2-135M (the bundled test model, tensor parallel degree 2,
batch 4 x 512 tokens, fp32) with `python -m handler.model.neuron_export`, then run the real
server on it with `SERVING_BACKEND=neuron`: loading, greedy answers against the CPU
`transformers` reference, a one-token prompt, 8 concurrent streams, SIGTERM while a stream
runs, and a restart that reuses the export saved by compile-on-start instead of compiling again.
Where there is no Neuron device or no optimum-neuron, each skips and says why. The last test is
not marked: it checks, everywhere, that the suite is one command and skips here.

Nothing here can run on the machines that develop this project: whoever has an inf2 / trn1 /
trn2 instance runs `make test-neuron` in the Neuron image (or with requirements-neuron.txt
installed) and reports what fails.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from tests.conftest import PROMPTS, RunningServer, assert_margin_rule, launch_server

ROOT = Path(__file__).resolve().parents[1]
CORES = 2
"""Neuron cores of the export: the smallest instances (inf2.xlarge, trn1.2xlarge) have 2."""
COMPILE_TIMEOUT = 3600
"""Seconds an export (or a start that compiles) may take."""
MARGIN_STEPS = 4.0
"""The device's float32 sums differ in order from the CPU's: a chosen token may fall this many
bf16 rounding steps short of the reference's best (`assert_margin_rule`), never whole nats."""
hardware = pytest.mark.neuron


def missing_hardware() -> str | None:
    """Why the Neuron suite cannot run here, or None when it can."""
    if not glob.glob("/dev/neuron*"):
        return (
            "no Neuron device (/dev/neuron*): run `make test-neuron` on an inf2, trn1 or trn2 "
            "instance, in the Neuron image or with requirements-neuron.txt installed"
        )
    if importlib.util.find_spec("optimum.neuron") is None:
        return (
            "optimum-neuron is not installed: use the Neuron image, or pip install "
            "--extra-index-url https://pip.repos.neuron.amazonaws.com -r requirements-neuron.txt"
        )
    return None


@pytest.fixture(scope="module")
def neuron_machine() -> None:
    reason = missing_hardware()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def exported(
    neuron_machine: None, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """SmolLM2 exported for Neuron, with the server's own exporter."""
    output = tmp_path_factory.mktemp("neuron") / "smollm2-neuron"
    command = [sys.executable, "-m", "handler.model.neuron_export"]
    command += ["--model-id", str(smollm2_dir), "--num-cores", str(CORES)]
    command += ["--batch-size", "4", "--sequence-length", "512", "--auto-cast-type", "fp32"]
    command += ["--output", str(output)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=COMPILE_TIMEOUT
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (output / "neuron_config.json").is_file()
    return output


@pytest.fixture(scope="module")
def neuron_server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    server = launch_neuron(exported, tmp_path_factory.mktemp("server"))
    yield server
    assert server.stop() == 0, server.log()


def launch_neuron(model: Path, log_dir: Path, **env: str) -> RunningServer:
    server = launch_server(model, log_dir, wait=False, SERVING_BACKEND="neuron", **env)
    server.wait_ready(timeout=COMPILE_TIMEOUT)
    return server


def generate(server: RunningServer, prompt: str, n: int) -> dict[str, Any]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}
    answer = requests.post(f"{server.url}/generate", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()


def token_ids(answer: dict[str, Any]) -> list[int]:
    return [token["id"] for token in answer["details"]["tokens"]]


def check_greedy(
    reference: AutoModelForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: dict[str, Any],
) -> None:
    assert_margin_rule(reference, tokenizer(prompt).input_ids, token_ids(answer), MARGIN_STEPS)


@hardware
def test_the_exported_model_loads_on_the_neuron_backend(neuron_server: RunningServer) -> None:
    info = requests.get(f"{neuron_server.url}/info", timeout=10).json()
    assert (info["backend"], info["device"]) == ("neuron", "neuron")
    assert (info["max_batch_size"], info["max_total_tokens"]) == (4, 512)
    assert "neuron backend on neuron" in neuron_server.log()


@hardware
def test_greedy_answers_follow_the_cpu_reference(
    neuron_server: RunningServer, reference_model: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    for prompt in PROMPTS[:4]:
        check_greedy(reference_model, tokenizer, prompt, generate(neuron_server, prompt, 16))


@hardware
def test_one_token_prompt(
    neuron_server: RunningServer, reference_model: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Every position is 0: the device's tie-break among equal positions must not matter."""
    prompt = next(w for w in ("Hello", "The", "Once") if len(tokenizer(w).input_ids) == 1)
    check_greedy(reference_model, tokenizer, prompt, generate(neuron_server, prompt, 12))


@hardware
def test_eight_concurrent_streams(
    neuron_server: RunningServer, reference_model: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Twice the slots: streams join and leave the batch while others decode."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + 3 * i) for i in range(8)]

    def stream(job: tuple[str, int]) -> tuple[list[int], str]:
        body = {"inputs": job[0], "parameters": {"max_new_tokens": job[1]}}
        ids, text = [], ""
        with requests.post(
            f"{neuron_server.url}/generate_stream", json=body, stream=True, timeout=300
        ) as answer:
            assert answer.status_code == 200, answer.text
            for line in answer.iter_lines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    ids.append(event["token"]["id"])
                    text = event.get("generated_text") or text
        return ids, text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, jobs))
    for (prompt, n), (ids, text) in zip(jobs, results):
        assert len(ids) <= n and text
        assert_margin_rule(reference_model, tokenizer(prompt).input_ids, ids, MARGIN_STEPS)
        assert token_ids(generate(neuron_server, prompt, n)) == ids  # alone = in a busy batch


@hardware
def test_sigterm_lets_the_running_stream_finish(
    exported: Path, tmp_path: Path, reference_model: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    server = launch_neuron(exported, tmp_path)
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 48}}
    events: list[dict[str, Any]] = []
    first = threading.Event()

    def stream() -> None:
        with requests.post(
            f"{server.url}/generate_stream", json=body, stream=True, timeout=300
        ) as answer:
            for line in answer.iter_lines():
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first.wait(120), server.log()
        server.process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert server.process.wait(timeout=60) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)
    assert events[-1]["generated_text"] is not None  # the stream ended with its last event
    ids = [event["token"]["id"] for event in events]
    assert len(ids) == 48, server.log()
    assert_margin_rule(reference_model, tokenizer(PROMPTS[0]).input_ids, ids, MARGIN_STEPS)


@hardware
def test_restart_reuses_the_export_instead_of_compiling_again(
    neuron_machine: None, smollm2_dir: Path, tmp_path: Path
) -> None:
    """A standard model with compile-on-start: the first start exports into the export cache,
    the second loads that export."""
    env = {"NEURON_COMPILE_ON_START": "true", "NEURON_EXPORT_CACHE": str(tmp_path / "exports")}
    env["HF_NUM_CORES"] = str(CORES)
    first = launch_neuron(smollm2_dir, tmp_path, **env)
    assert first.stop() == 0, first.log()
    assert "Saved the exported model at" in first.log()
    started = time.monotonic()
    second = launch_neuron(smollm2_dir, tmp_path, **env)
    try:
        log = second.log()
        assert "reusing exported model at" in log, log
        assert "Exporting in a separate process" not in log, log
    finally:
        assert second.stop() == 0, second.log()
    assert time.monotonic() - started < COMPILE_TIMEOUT


def test_the_hardware_suite_is_one_command_and_skips_without_a_device(tmp_path: Path) -> None:
    """`make test-neuron` runs the tests marked `neuron`; here they skip and say why."""
    plan = subprocess.run(
        ["make", "-n", "test-neuron"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert plan.returncode == 0, plan.stderr
    assert "-m pytest -m neuron" in plan.stdout and "tests/test_neuron_hardware.py" in plan.stdout
    assert "pip install --quiet torch" not in plan.stdout  # the Neuron SDK's torch stays
    reason = missing_hardware()
    if reason is None:
        pytest.skip("a Neuron machine: `make test-neuron` runs the suite itself")
    command = [sys.executable, "-m", "pytest", "-m", "neuron", "-rs", "-q"]
    run = subprocess.run(
        [*command, "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 skipped" in run.stdout and "1 deselected" in run.stdout, run.stdout
    assert reason in run.stdout.replace("\n", " ") or "no Neuron device" in run.stdout
