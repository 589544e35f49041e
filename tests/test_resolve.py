"""Model resolution (hub cache, local and mounted directories) and backend choice, offline."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from handler.config import Settings, read_settings
from handler.errors import ConfigError
from handler.model import resolve
from handler.model.resolve import BackendChoice, ResolvedModel, choose_backend, resolve_model

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_secretTOKENvalue123"
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def settings(**env: str) -> Settings:
    return read_settings([], env)


def write_model(path: Path, model_type: str = "llama", **extra: Any) -> Path:
    """A model directory that passes resolution: a config and an (empty) safetensors file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def resolve_in(tmp_path: Path, config: Settings) -> ResolvedModel:
    """Resolve with SageMaker and Endpoints directories under `tmp_path` (absent unless made)."""
    return resolve_model(
        config, sagemaker_dir=tmp_path / "opt-ml-model", endpoints_dir=tmp_path / "repository"
    )


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """`HF_HUB_OFFLINE=1`; huggingface_hub read its constant at import, so set that too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the arguments of every `snapshot_download` call, then run the real one."""
    calls: list[dict[str, Any]] = []
    real = resolve.snapshot_download

    def spy(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return real(repo_id, **kwargs)

    monkeypatch.setattr(resolve, "snapshot_download", spy)
    return calls


def fake_hub(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[dict[str, Any]]:
    """Replace `snapshot_download` by a hub holding `files`: it writes the matching ones."""
    calls: list[dict[str, Any]] = []

    def download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        repo = Path(kwargs["cache_dir"]) / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        wanted = filter_repo_objects(
            files,
            allow_patterns=kwargs["allow_patterns"],
            ignore_patterns=kwargs["ignore_patterns"],
        )
        for name in wanted:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(files[name])
        return str(snapshot)

    monkeypatch.setattr(resolve, "snapshot_download", download)
    return calls


def raising_hub(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def download(repo_id: str, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(resolve, "snapshot_download", download)


def hub_response(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.url = f"https://huggingface.co/api/models/{REPO_ID}/revision/main"
    return response


# --- hub ----------------------------------------------------------------------------------------


def test_hub_id_from_prepopulated_offline_cache(
    tmp_path: Path,
    smollm2_dir: Path,
    offline: None,
    hub_calls: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in (*SMALL_FILES, "model.safetensors"):
        (snapshot / name).symlink_to(smollm2_dir / name)
    config = settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(cache), HF_TOKEN=TOKEN)

    with caplog.at_level(logging.INFO, logger="handler.model.resolve"):
        model = resolve_in(tmp_path, config)

    assert model.path == snapshot
    assert model.model_id == REPO_ID
    assert model.revision == COMMIT
    assert f"from cache {cache}" in model.source and "offline" in model.source
    assert hub_calls, "snapshot_download was not called"
    for call in hub_calls:
        assert call["repo_id"] == REPO_ID
        assert call["local_files_only"] is True
        assert call["cache_dir"] == str(cache)
        assert call["token"] == TOKEN
    assert hub_calls[0]["revision"] == "main"
    records = [r for r in caplog.records if r.name == "handler.model.resolve"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    line = records[0].getMessage()
    assert f"hub id {REPO_ID} (revision main -> {COMMIT}" in line
    assert "because HF_MODEL_ID / --model-id is set" in line
    assert TOKEN not in caplog.text


def test_offline_model_missing_from_cache(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "hub"
    config = settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(cache))
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, config)
    message = str(caught.value)
    assert f"Model {REPO_ID} (revision main) is not in the hub cache at {cache}" in message
    assert "HF_HUB_OFFLINE" in message
    assert isinstance(caught.value.__cause__, LocalEntryNotFoundError)


def test_unreachable_hub_and_model_not_cached(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    raising_hub(monkeypatch, LocalEntryNotFoundError("cannot find the snapshot folder"))
    config = settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="the hub could not be reached") as caught:
        resolve_in(tmp_path, config)
    assert "network access to huggingface.co" in str(caught.value)


def test_download_prefers_safetensors_shards_of_the_index(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    files = {
        "config.json": json.dumps({"model_type": "mistral"}).encode(),
        "tokenizer.json": b"{}",
        "tokenizer.model": b"",
        "chat_template.jinja": b"",
        "README.md": b"",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": b"",
        "model-00002-of-00002.safetensors": b"",
        "consolidated.safetensors": b"",
        "pytorch_model.bin": b"",
        "onnx/model.onnx": b"",
        "modeling_mistral.py": b"",
    }
    calls = fake_hub(monkeypatch, files)
    cache = tmp_path / "hub"

    model = resolve_in(tmp_path, settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(cache)))

    assert sorted(p.name for p in model.path.rglob("*") if p.is_file()) == [
        "chat_template.jinja",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
    ]
    assert [call["revision"] for call in calls] == ["main", COMMIT]
    assert all(call["local_files_only"] is False for call in calls)
    assert "safetensors weights" in model.source


def test_download_falls_back_to_bin_without_safetensors(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "config.json": json.dumps({"model_type": "gpt2"}).encode(),
        "vocab.json": b"{}",
        "merges.txt": b"",
        "pytorch_model.bin": b"",
        "training_args.bin": b"",
    }
    fake_hub(monkeypatch, files)
    config = settings(HF_MODEL_ID="openai-community/gpt2", HUGGINGFACE_HUB_CACHE=str(tmp_path))

    model = resolve_in(tmp_path, config)

    assert sorted(p.name for p in model.path.iterdir()) == [
        "config.json",
        "merges.txt",
        "pytorch_model.bin",
        "vocab.json",
    ]
    assert "pytorch_model*.bin weights (the repository has no safetensors)" in model.source


def test_download_keeps_neuron_export_artifacts(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "config.json": json.dumps({"model_type": "llama"}).encode(),
        "neuron_config.json": b"{}",
        "model.pt": b"",
        "checkpoint/weights/tp0_sharded_checkpoint.safetensors": b"",
        "checkpoint/weights/tp1_sharded_checkpoint.safetensors": b"",
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        ".gitattributes": b"",
    }
    fake_hub(monkeypatch, files)
    config = settings(HF_MODEL_ID="aws-neuron/Llama-export", HUGGINGFACE_HUB_CACHE=str(tmp_path))

    model = resolve_in(tmp_path, config)

    fetched = {str(p.relative_to(model.path)) for p in model.path.rglob("*") if p.is_file()}
    assert fetched == set(files) - {".gitattributes"}


def test_remote_code_files_only_with_trust_remote_code(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_json = {"model_type": "custom-lm", "auto_map": {"AutoConfig": "configuration_x.X"}}
    files = {
        "config.json": json.dumps(config_json).encode(),
        "configuration_x.py": b"",
        "model.safetensors": b"",
    }
    fake_hub(monkeypatch, files)
    env = {"HF_MODEL_ID": "org/custom", "HUGGINGFACE_HUB_CACHE": str(tmp_path / "hub")}

    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, read_settings([], env))
    assert "model_type 'custom-lm'" in str(caught.value)
    assert "auto_map" in str(caught.value)
    model = resolve_in(tmp_path, read_settings([], {**env, "HF_MODEL_TRUST_REMOTE_CODE": "1"}))
    assert (model.path / "configuration_x.py").is_file()


def test_unwritable_cache_dir(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    cache.chmod(0o500)
    if os.access(cache, os.W_OK):
        cache.chmod(0o700)
        pytest.skip("root ignores directory permissions; see test_uncreatable_cache_dir")
    raising_hub(monkeypatch, AssertionError("downloaded despite an unwritable cache"))
    try:
        with pytest.raises(ConfigError) as caught:
            resolve_in(tmp_path, settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(cache)))
    finally:
        cache.chmod(0o700)
    message = str(caught.value)
    assert f"The hub cache directory {cache} cannot be created or written" in message
    assert "HUGGINGFACE_HUB_CACHE" in message and "HF_HOME" in message


def test_uncreatable_cache_dir(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "hub"
    raising_hub(monkeypatch, AssertionError("downloaded despite an uncreatable cache"))
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(cache)))
    message = str(caught.value)
    assert f"The hub cache directory {cache} cannot be created or written" in message
    assert "Set HUGGINGFACE_HUB_CACHE (or HF_HOME) to a writable directory" in message


def test_gated_model_without_token(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = GatedRepoError(f"Access to model {REPO_ID} is restricted.", response=hub_response(401))
    raising_hub(monkeypatch, error)
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(tmp_path)))
    message = str(caught.value)
    assert f"Model {REPO_ID} is gated" in message
    assert "set HF_TOKEN" in message


def test_gated_model_with_token_lacking_access(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    error = GatedRepoError(f"Access to model {REPO_ID} is restricted.", response=hub_response(403))
    raising_hub(monkeypatch, error)
    config = settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(tmp_path), HF_TOKEN=TOKEN)
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, config)
    message = str(caught.value)
    assert f"The token in HF_TOKEN has no access to gated model {REPO_ID}" in message
    assert TOKEN not in message and TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("error", "env", "expected"),
    [
        (
            RepositoryNotFoundError("404", response=hub_response(404)),
            {},
            f"Model {REPO_ID} was not found on the hub: check HF_MODEL_ID / --model-id, or it is "
            "private: set HF_TOKEN",
        ),
        (
            RepositoryNotFoundError("404", response=hub_response(404)),
            {"HF_TOKEN": TOKEN},
            "the token in HF_TOKEN has no access to it",
        ),
        (
            RevisionNotFoundError("404", response=hub_response(404)),
            {"HF_MODEL_REVISION": "v9"},
            f"Revision 'v9' (HF_MODEL_REVISION / --revision) does not exist in model {REPO_ID}",
        ),
    ],
)
def test_hub_errors(
    tmp_path: Path,
    online: None,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    env: dict[str, str],
    expected: str,
) -> None:
    raising_hub(monkeypatch, error)
    config = settings(HF_MODEL_ID=REPO_ID, HUGGINGFACE_HUB_CACHE=str(tmp_path), **env)
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, config)
    assert expected in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings(HF_MODEL_ID=str(missing)))
    assert f"{str(missing)!r} looks like a local path, but no such directory exists" in str(
        caught.value
    )


# --- local and mounted directories ------------------------------------------------------------


def test_local_directory(tmp_path: Path) -> None:
    path = write_model(tmp_path / "models" / "my-model")
    model = resolve_in(tmp_path, settings(HF_MODEL_ID=str(path)))
    assert model == ResolvedModel(path, "my-model", f"local directory {path}", None)


def test_model_id_wins_over_sagemaker_dir(tmp_path: Path) -> None:
    write_model(tmp_path / "opt-ml-model")
    path = write_model(tmp_path / "chosen")
    assert resolve_in(tmp_path, settings(HF_MODEL_ID=str(path))).path == path


def test_revision_ignored_for_local_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_model(tmp_path / "my-model")
    config = settings(HF_MODEL_ID=str(path), HF_MODEL_REVISION="v2")
    with caplog.at_level(logging.INFO, logger="handler.model.resolve"):
        model = resolve_in(tmp_path, config)
    assert model.revision is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"HF_MODEL_REVISION / --revision 'v2' ignored: the model comes from local directory "
        f"{path}, not the hub"
    ]


def test_sagemaker_dir_wins_over_endpoints_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sagemaker = write_model(tmp_path / "opt-ml-model")
    write_model(tmp_path / "repository")
    with caplog.at_level(logging.INFO, logger="handler.model.resolve"):
        model = resolve_in(tmp_path, settings())
    assert model.path == sagemaker
    assert model.model_id == "opt-ml-model"
    assert model.source == f"SageMaker model data {sagemaker}"
    assert f"because HF_MODEL_ID is not set; {sagemaker} holds a model" in caplog.text


def test_neuron_export_in_sagemaker_dir(tmp_path: Path) -> None:
    sagemaker = tmp_path / "opt-ml-model"
    sagemaker.mkdir()
    (sagemaker / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (sagemaker / "neuron_config.json").write_text("{}")
    (sagemaker / "model.pt").write_bytes(b"")
    assert resolve_in(tmp_path, settings()).path == sagemaker


def test_empty_sagemaker_dir_falls_through_to_endpoints_dir(tmp_path: Path) -> None:
    (tmp_path / "opt-ml-model").mkdir()
    endpoints = write_model(tmp_path / "repository")
    model = resolve_in(tmp_path, settings())
    assert model.path == endpoints
    assert model.source == f"Inference Endpoints mount {endpoints}"
    assert model.model_id == "repository"


def test_hf_model_dir_replaces_endpoints_dir(tmp_path: Path) -> None:
    write_model(tmp_path / "repository")
    chosen = write_model(tmp_path / "mounted" / "llama")
    model = resolve_in(tmp_path, settings(HF_MODEL_DIR=str(chosen)))
    assert model.path == chosen
    assert model.source == f"HF_MODEL_DIR={chosen}"


def test_no_model_anywhere(tmp_path: Path) -> None:
    (tmp_path / "opt-ml-model").mkdir()
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings())
    message = str(caught.value)
    assert "HF_MODEL_ID / --model-id: not set" in message
    assert f"SageMaker model data {tmp_path / 'opt-ml-model'}: is empty" in message
    assert f"Inference Endpoints mount {tmp_path / 'repository'}: does not exist" in message
    assert "HF_MODEL_DIR" in message


def test_no_model_in_hf_model_dir_names_it(tmp_path: Path) -> None:
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (mounted / "notes.txt").write_text("")
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings(HF_MODEL_DIR=str(mounted)))
    assert f"HF_MODEL_DIR={mounted}: holds no config.json" in str(caught.value)
    assert "(found notes.txt)" in str(caught.value)


def test_sagemaker_archive_with_enclosing_folder(tmp_path: Path) -> None:
    write_model(tmp_path / "opt-ml-model" / "my-model")
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings())
    assert "my-model/ holds a model: pack the model archive from inside" in str(caught.value)


@pytest.mark.parametrize("where", ["model_id", "sagemaker"])
def test_directory_without_config(tmp_path: Path, where: str) -> None:
    path = tmp_path / ("weights-only" if where == "model_id" else "opt-ml-model")
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"")
    env = {"HF_MODEL_ID": str(path)} if where == "model_id" else {}
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings(**env))
    assert f"{path} (from " in str(caught.value)
    assert "has no config.json: point HF_MODEL_ID at the directory" in str(caught.value)


def test_directory_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "config-only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"holds no weights: expected \*\.safetensors"):
        resolve_in(tmp_path, settings(HF_MODEL_ID=str(path)))


def test_unknown_architecture(tmp_path: Path) -> None:
    path = write_model(tmp_path / "odd", model_type="mystery-net")
    with pytest.raises(ConfigError) as caught:
        resolve_in(tmp_path, settings(HF_MODEL_ID=str(path)))
    message = str(caught.value)
    assert "Unknown architecture" in message and "model_type 'mystery-net'" in message
    assert "HF_MODEL_TRUST_REMOTE_CODE=true" in message
    trusted = settings(HF_MODEL_ID=str(path), HF_MODEL_TRUST_REMOTE_CODE="true")
    assert resolve_in(tmp_path, trusted).path == path


# --- backend ----------------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def devices(*names: str) -> Callable[[], list[str]]:
    return lambda: list(names)


@pytest.fixture
def optimum_neuron(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Install a stand-in `optimum.neuron.utils.system` reporting a given number of cores."""

    def install(cores: int) -> None:
        names = ["optimum", "optimum.neuron", "optimum.neuron.utils", "optimum.neuron.utils.system"]
        for name in names:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setattr(
            sys.modules["optimum.neuron.utils.system"],
            "get_available_cores",
            lambda: cores,
            raising=False,
        )

    return install


def test_backend_torch_requested(no_cuda: None) -> None:
    choice = choose_backend(
        settings(SERVING_BACKEND="torch"), neuron_devices=devices("/dev/neuron0")
    )
    assert choice.name == "torch" and choice.device == "cpu"
    assert choice.reason == (
        "backend torch requested (--backend / SERVING_BACKEND); device auto: no CUDA device"
    )


def test_backend_auto_with_neuron_devices(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="handler.model.resolve"):
        choice = choose_backend(settings(), neuron_devices=devices("/dev/neuron0", "/dev/neuron1"))
    assert choice == BackendChoice(
        "neuron", "neuron", "backend auto: 2 Neuron device(s) found (/dev/neuron0, /dev/neuron1)"
    )
    assert [r.getMessage() for r in caplog.records] == [
        "Backend neuron on neuron: backend auto: 2 Neuron device(s) found "
        "(/dev/neuron0, /dev/neuron1)"
    ]


def test_backend_auto_with_cores_from_optimum_neuron(
    optimum_neuron: Callable[[int], None],
) -> None:
    optimum_neuron(2)
    choice = choose_backend(settings(), neuron_devices=devices())
    assert choice.name == "neuron"
    assert choice.reason == "backend auto: optimum-neuron reports 2 available Neuron core(s)"


def test_backend_auto_without_neuron_is_torch_cpu(no_cuda: None) -> None:
    choice = choose_backend(settings(), neuron_devices=devices())
    assert choice == BackendChoice(
        "torch", "cpu", "backend auto: no Neuron device (/dev/neuron*); device auto: no CUDA device"
    )


def test_backend_auto_uses_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choice = choose_backend(settings(), neuron_devices=devices())
    assert (choice.name, choice.device) == ("torch", "cuda")
    assert choice.reason.endswith("device auto: CUDA is available")


def test_backend_neuron_requested_with_devices() -> None:
    choice = choose_backend(
        settings(SERVING_BACKEND="neuron"), neuron_devices=devices("/dev/neuron0")
    )
    assert (choice.name, choice.device) == ("neuron", "neuron")
    assert choice.reason.startswith("backend neuron requested; 1 Neuron device(s) found")


def test_backend_neuron_requested_without_devices() -> None:
    with pytest.raises(ConfigError) as caught:
        choose_backend(settings(SERVING_BACKEND="neuron"), neuron_devices=devices())
    message = str(caught.value)
    assert "Backend neuron requested (--backend / SERVING_BACKEND) but no Neuron device" in message
    assert "/dev/neuron" in message and "SERVING_BACKEND=torch" in message


def test_cuda_requested_without_cuda(no_cuda: None) -> None:
    with pytest.raises(ConfigError) as caught:
        choose_backend(settings(SERVING_DEVICE="cuda"), neuron_devices=devices())
    assert "SERVING_DEVICE=cuda (--device cuda) but torch sees no CUDA device" in str(caught.value)
