"""The full server on the Neuron backend, with a fake only at the model boundary.

The server process gets a stand-in `optimum.neuron` (tests/fake_optimum) whose loader returns
`FakeNeuronModel`: the exact `forward(input_ids, position_ids, seq_ids, sampling_params)`
contract over the real SmolLM2 weights. Everything above it (backend choice, compiled shapes,
`NeuronBackend`, generator, routes) is the real code.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from handler import config
from handler import engine as engine_module
from handler.model.resolve import ResolvedModel
from handler.server.app import create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState
from tests.conftest import PROMPTS, RunningServer, launch_server

FAKE_OPTIMUM = Path(__file__).parent / "fake_optimum"


def exported_model(smollm2_dir: Path, root: Path, on_device_sampling: bool) -> Path:
    """SmolLM2's files plus the `neuron_config.json` an export for batch 4 x 512 would write."""
    model = root / ("exported-ods" if on_device_sampling else "exported")
    model.mkdir()
    for item in smollm2_dir.iterdir():
        (model / item.name).symlink_to(item)
    neuron_config = {
        "batch_size": 4,
        "sequence_length": 512,
        "tp_degree": 2,
        "torch_dtype": "float32",
        "target": "inf2",
        "on_device_sampling": on_device_sampling,
    }
    (model / "neuron_config.json").write_text(json.dumps(neuron_config))
    return model


def launch_neuron(model: Path, log_dir: Path, **env: str) -> RunningServer:
    return launch_server(
        model, log_dir, PYTHONPATH=str(FAKE_OPTIMUM), SERVING_BACKEND="auto", **env
    )


@pytest.fixture(scope="module")
def neuron_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("neuron")
    server = launch_neuron(exported_model(smollm2_dir, root, False), root)
    yield server
    assert server.stop() == 0, server.log()


def generate(server: RunningServer, prompt: str, n: int, **parameters: object) -> requests.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, **parameters}}
    return requests.post(f"{server.url}/generate", json=body, timeout=120)


def test_neuron_backend_is_chosen_with_the_compiled_shapes(neuron_server: RunningServer) -> None:
    info = requests.get(f"{neuron_server.url}/info", timeout=10).json()
    assert info["backend"] == "neuron" and info["device"] == "neuron"
    assert info["max_batch_size"] == 4 and info["max_total_tokens"] == 512
    assert info["on_device_sampling"] is False
    assert "neuron backend on neuron" in neuron_server.log()


def test_greedy_answers_equal_transformers_alone_and_concurrently(
    neuron_server: RunningServer, golden
) -> None:
    for prompt in PROMPTS[:3]:
        assert generate(neuron_server, prompt, 12).json()["generated_text"] == golden(prompt, 12)
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + 3 * i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda job: generate(neuron_server, *job).json(), jobs))
    assert [t["generated_text"] for t in texts] == [golden(p, n) for p, n in jobs]


def test_on_device_sampling_serves_greedy_answers_and_refuses_seeds(
    smollm2_dir: Path, tmp_path: Path, golden
) -> None:
    server = launch_neuron(exported_model(smollm2_dir, tmp_path, True), tmp_path)
    try:
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["on_device_sampling"] is True
        answer = generate(server, PROMPTS[1], 10, details=True).json()
        assert answer["generated_text"] == golden(PROMPTS[1], 10)
        assert all(t["logprob"] is None for t in answer["details"]["tokens"])
        refused = generate(server, PROMPTS[1], 10, seed=3, do_sample=True)
        assert refused.status_code == 422
        assert "on-device sampling" in refused.json()["error"]
        # The fix it names is a switch that exists.
        switch = "NEURON_ON_DEVICE_SAMPLING=false (--on-device-sampling false)"
        assert switch in refused.json()["error"]
        sampled = generate(server, PROMPTS[1], 10, do_sample=True, top_k=5, temperature=0.8)
        assert sampled.status_code == 200
        # Structured output needs host sampling: a 422 naming the field and the switch.
        grammar = {"type": "json", "value": {"type": "object"}}
        refused = generate(server, PROMPTS[1], 10, grammar=grammar)
        assert refused.status_code == 422 and "`grammar`" in refused.json()["error"]
        assert switch in refused.json()["error"]
        body = {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "response_format": {"type": "json_object"},
        }
        refused = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert refused.status_code == 422 and "`response_format`" in refused.json()["error"]
        assert switch in refused.json()["error"]
        after = generate(server, PROMPTS[1], 10)  # the next normal request is unaffected
        assert after.json()["generated_text"] == golden(PROMPTS[1], 10)
    finally:
        assert server.stop() == 0, server.log()


def test_structured_output_is_enforced_with_host_sampling(neuron_server: RunningServer) -> None:
    """A Neuron model that returns logits samples on the host, where grammars apply."""
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    grammar = {"type": "json", "value": schema}
    answer = generate(neuron_server, "Is the sky blue? JSON:", 30, grammar=grammar).json()
    parsed = json.loads(answer["generated_text"])
    assert parsed["answer"] in ("yes", "no") and isinstance(parsed["score"], int)


def test_a_setting_that_contradicts_the_compiled_model_stops_start_up(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    model = exported_model(smollm2_dir, tmp_path, False)
    server = launch_server(
        model,
        tmp_path,
        wait=False,
        PYTHONPATH=str(FAKE_OPTIMUM),
        MAX_BATCH_SIZE="8",
    )
    assert server.process.wait(timeout=120) == 3
    log = server.log()
    assert "MAX_BATCH_SIZE" in log and "8" in log and "4" in log, log


# --- in this process: the engine the server's worker builds ----------------------------------


@pytest.fixture
def fake_optimum_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """tests/fake_optimum importable in this process, as `launch_neuron`'s PYTHONPATH makes it
    in the server's."""

    def loaded() -> list[str]:
        return [name for name in sys.modules if name.split(".")[0] == "optimum"]

    monkeypatch.syspath_prepend(str(FAKE_OPTIMUM))
    for name in loaded():
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in loaded():
        del sys.modules[name]


def test_settings_are_read_once_and_the_revision_reaches_info(
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_optimum_here: None,
) -> None:
    """The worker's path: settings read once from flags and environment, the exported model's
    shapes applied to them (not read again), and the hub commit it came at in `/info`."""
    reads: list[Any] = []
    real_read = config._read_given

    def counted(*args: Any) -> Any:
        reads.append(args)
        return real_read(*args)

    monkeypatch.setattr(config, "_read_given", counted)
    real_resolve = engine_module.resolve_model

    def from_the_hub(settings: config.Settings) -> ResolvedModel:
        resolved = real_resolve(settings)
        return dataclasses.replace(resolved, model_id="acme/smollm2-neuron", revision="abc123")

    monkeypatch.setattr(engine_module, "resolve_model", from_the_hub)
    model = exported_model(smollm2_dir, tmp_path, False)
    environ = {"SERVING_BACKEND": "neuron", "MAX_INPUT_TOKENS": "100"}
    settings = config.read_settings(["--model-id", str(model)], environ)
    stages: list[str] = []

    engine = engine_module.load_engine(settings, stages.append, environ=environ)
    try:
        assert len(reads) == 1
        assert stages == ["downloading", "compiling", "loading", "warming_up"]
        assert engine.backend_name == "neuron"
        applied = engine.settings
        assert (applied.max_batch_size, applied.max_total_tokens) == (4, 512)  # compiled
        assert (applied.max_input_tokens, applied.max_batch_prefill_tokens) == (100, 400)
        assert (applied.num_cores, applied.on_device_sampling) == (2, False)
        state = ServerState(settings)
        state.engine = engine
        info = create_app(state, Metrics()).test_client().get("/info").get_json()
        assert info["model_id"] == "acme/smollm2-neuron" and info["model_sha"] == "abc123"
        assert (info["max_batch_size"], info["max_total_tokens"]) == (4, 512)
    finally:
        engine.generator.stop()
