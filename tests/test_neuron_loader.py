"""Neuron model preparation: every branch of `prepare_neuron_model`, without optimum-neuron.

A fake `optimum.neuron` tree goes into `sys.modules`: one module per module of
`neuron_contract.CONTRACT`, each exposing only the names the contract declares, each a recording
fake that refuses keyword arguments the contract does not declare, and each as strict as the
function of optimum-neuron 0.4.5 it stands for: `get_neuron_config` takes the dtype from the
model config (`DTYPE_MAPPER.pt(config.dtype)`, which raises on None), `get_available_cores`
parses `NEURON_RT_VISIBLE_CORES` as `utils/system.py` does, the export aligns the compilation
target with this machine (`align_compilation_target`), and `from_pretrained` finds the weights
as `load_weights` does (`backend/pretrained_model.py`). Hub repositories are local directories
in `FakeOptimum.hub`. The export process is a fake `subprocess.Popen` that writes what the real
one would, except in the test that runs the real `python -m handler.model.neuron_export` up to
its failure on this machine without optimum-neuron.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
from transformers import LlamaConfig

from handler import engine as engine_module
from handler.config import CompiledShape, ConfigError, Settings, read_settings
from handler.model import neuron_backend, neuron_cache, neuron_export, neuron_loader
from handler.model.neuron_cache import export_dir, export_key, export_root
from handler.model.neuron_contract import (
    ALIGN_TARGET,
    AVAILABLE_CORES,
    CONTRACT,
    DEFAULT_TARGET,
    EXPORT,
    FROM_PRETRAINED,
    GET_NEURON_CONFIG,
    NEURON_CONFIG_FIELDS,
    NEURON_MODEL,
    READ_NEURON_CONFIG,
    SAVE_PRETRAINED,
    SELECT_CACHED,
    ContractEntry,
    compiled_shape,
    is_exported,
)
from handler.model.neuron_cores import available_cores, check_available_cores
from handler.model.neuron_loader import load_neuron_model, prepare_neuron_model
from handler.model.resolve import ResolvedModel

MODEL = "acme/llama-3-8b"
TOKEN = "hf_secret_token_value"
INSTANCE_TARGETS = {"inf2": "trn1", "trn1": "trn1", "trn1n": "trn1", "trn2": "trn2"}
"""optimum-neuron's `INSTANCE_VALUE_MAP`: the compilation target of each instance family."""
REAL_AUTO_CONFIG = transformers.AutoConfig.from_pretrained


# --- the fake optimum-neuron -------------------------------------------------------------------


class FakeNeuronConfig:
    """optimum-neuron's `NxDNeuronConfig`, limited to the attributes the contract declares."""

    __slots__ = NEURON_CONFIG_FIELDS.attributes

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)


@dataclass
class HubConfig:
    """What `AutoConfig.from_pretrained` gives for a hub model that is not in `FakeOptimum.hub`."""

    dtype: torch.dtype | None

    def get_text_config(self) -> HubConfig:
        return self


def write_export(
    path: Path,
    batch_size: int,
    sequence_length: int,
    tp_degree: int,
    *,
    weights: bool = True,
    **extra: Any,
) -> Path:
    """A directory the fake `NeuronConfig.from_pretrained` reads as an exported model; with
    `weights`, pre-sharded ones (`checkpoint/weights/tp<rank>_sharded_checkpoint.safetensors`),
    as the export of a local model holds them."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "tp_degree": tp_degree,
        "torch_dtype": "bfloat16",
        "target": "trn1",
        "on_device_sampling": True,
        "checkpoint_id": None,
        "optimum_neuron_version": "0.4.5",
        **extra,
    }
    (path / "neuron_config.json").write_text(json.dumps(config))
    (path / "model.pt").write_bytes(b"traced graphs")
    if weights:
        shards = path / "checkpoint" / "weights"
        shards.mkdir(parents=True, exist_ok=True)
        for rank in range(tp_degree):
            (shards / f"tp{rank}_sharded_checkpoint.safetensors").write_bytes(b"shard")
    return path


def write_model(path: Path, *, dtype: str | None = "bfloat16") -> Path:
    """A standard (not exported) model directory: a tiny Llama config.json (naming `dtype`, or
    no dtype at all) and its weights."""
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    values = config.to_dict()
    values.pop("torch_dtype", None)
    values.pop("dtype", None)
    if dtype is not None:
        values["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(values))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


@dataclass
class FakeOptimum:
    """Recording fakes of the optimum-neuron entry points in `CONTRACT`."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    device_cores: int = 32
    cached_entries: list[dict[str, Any]] = field(default_factory=lambda: [{"batch_size": 8}])
    model_dtype: torch.dtype | None = torch.bfloat16
    """The dtype in the config of hub models outside `hub`."""
    lookup_error: Exception | None = None
    host_family: str = "inf2"
    """The instance family of this (fake) machine."""
    hub: dict[str, Path] = field(default_factory=dict)
    """Hub repositories: id -> a directory holding their files."""
    loaded_weights: list[str] = field(default_factory=list)
    """Where `from_pretrained` found the weights it loaded."""
    exported: Any = None

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def called(self, entry: ContractEntry) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for name, args, kwargs in self.calls if name == entry.name]

    def record(self, entry: ContractEntry, function: Callable[..., Any]) -> Callable[..., Any]:
        allowed = set(entry.keywords) | set(entry.forwarded)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            undeclared = sorted(set(kwargs) - allowed)
            if undeclared:
                raise TypeError(f"{entry.name} got {undeclared}, not declared in CONTRACT")
            self.calls.append((entry.name, args, kwargs))
            return function(*args, **kwargs)

        return recorded

    # The behaviour of each entry point.

    def files(self, model: str) -> Path | None:
        """The files of `model`: a local directory, or a repository of `hub`."""
        if os.path.exists(model):
            return Path(model)
        return self.hub.get(model)

    def auto_config(self, model: str | Path, **kwargs: Any) -> Any:
        """`transformers.AutoConfig.from_pretrained`, with `hub` as the hub."""
        files = self.files(str(model))
        if files is None:
            return HubConfig(self.model_dtype)
        return REAL_AUTO_CONFIG(str(files))

    def read_neuron_config(self, path: str, **_: Any) -> FakeNeuronConfig:
        files = self.files(path)
        file = (files or Path(path)) / "neuron_config.json"
        if not file.is_file():
            raise OSError(f"{path} does not appear to have a file named neuron_config.json")
        values = json.loads(file.read_text())
        version = values.pop("optimum_neuron_version")
        if version != "0.4.5":
            raise ValueError(
                f"This neuron configuration file was generated with optimum-neuron version "
                f"{version}, but this version is 0.4.5."
            )
        values["torch_dtype"] = getattr(torch, values["torch_dtype"])
        declared = {k: v for k, v in values.items() if k in FakeNeuronConfig.__slots__}
        return FakeNeuronConfig(**declared)

    def get_neuron_config(self, model: str, **kwargs: Any) -> FakeNeuronConfig:
        config = kwargs.get("config") or self.auto_config(model).get_text_config()
        dtype = config.dtype
        if not isinstance(dtype, torch.dtype):  # DTYPE_MAPPER.pt
            raise ValueError(
                f"Unable to find `{dtype}` in the dtype mapping, valid values are [..]"
            )
        instance_type = kwargs["instance_type"] or self.host_family
        return FakeNeuronConfig(
            batch_size=kwargs["batch_size"],
            sequence_length=kwargs["sequence_length"],
            tp_degree=kwargs["tensor_parallel_size"],
            torch_dtype=dtype,
            target=INSTANCE_TARGETS[instance_type],
            on_device_sampling=True,  # what Llama's `_get_neuron_config` sets
        )

    def select(self, model: str, **kwargs: Any) -> list[dict[str, Any]]:
        if self.lookup_error is not None:
            raise self.lookup_error
        return self.cached_entries

    def default_target(self) -> str:
        return INSTANCE_TARGETS[self.host_family]

    def align(self, target: str, override: bool) -> str:
        """`align_compilation_target` on a machine with Neuron devices."""
        target = INSTANCE_TARGETS[target]
        env_target = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE")
        if env_target == target:
            return target
        if env_target is not None and not override:
            return env_target
        current = INSTANCE_TARGETS[self.host_family]
        if target != current and not override:
            raise ValueError(
                f"The current platform is {current} but we are compiling for {target}. Please "
                f"set the NEURON_PLATFORM_TARGET_OVERRIDE to {target} or use the optimum-cli"
            )
        return target

    def export(self, model: str, **kwargs: Any) -> Any:
        config = kwargs["neuron_config"]
        # `NxDPreTrainedModel._export` aligns the target with this machine first.
        compilation_target = self.align(config.target, override=False)
        if compilation_target != config.target:
            raise ValueError(
                f"The compilation target is {config.target} but the "
                "NEURON_PLATFORM_TARGET_OVERRIDE environment variable is set to "
                f"{compilation_target}, Please set it to the correct value."
            )

        def save_pretrained(directory: str) -> None:
            write_export(
                Path(directory),
                config.batch_size,
                config.sequence_length,
                config.tp_degree,
                torch_dtype=str(config.torch_dtype).removeprefix("torch."),
                on_device_sampling=config.on_device_sampling,
            )

        exported = type("ExportedModel", (), {})()
        exported.neuron_config = config
        exported.save_pretrained = self.record(SAVE_PRETRAINED, save_pretrained)
        self.exported = exported
        return exported

    def available_cores(self) -> int:
        """`get_available_cores` of `utils/system.py`, reading the environment as it does."""
        max_cores = self.device_cores
        num_cores = min(int(os.environ.get("NEURON_RT_NUM_CORES", max_cores)), max_cores)
        visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
        if visible is None:
            return num_cores
        if "-" in visible:
            start, end = visible.split("-")
            return min(int(end) - int(start) + 1, num_cores)
        return min(1, num_cores)

    def from_pretrained(self, model_id: str, **kwargs: Any) -> tuple[str, str]:
        """`_from_pretrained` (the compiled graphs of a hub id are downloaded alone), then
        `load_weights`, as in `backend/pretrained_model.py`."""
        files = self.files(model_id)
        if files is None:
            raise OSError(f"{model_id} is neither a directory nor a hub repository")
        neuron_config = json.loads((files / "neuron_config.json").read_text())
        if os.path.exists(model_id):
            checkpoint = Path(model_id, "checkpoint")
            if checkpoint.exists():
                return self._load_weights_from_path(checkpoint, neuron_config)
            try:
                return self._load_weights_from_path(Path(model_id), neuron_config)
            except FileNotFoundError:
                pass
        if neuron_config.get("checkpoint_id") is not None:
            snapshot = self.hub[neuron_config["checkpoint_id"]]  # snapshot_download
            return self._load_weights_from_path(snapshot, neuron_config)
        raise ValueError(f"Checkpoint file not found under {model_id}.")

    def _load_weights_from_path(self, path: Path, neuron_config: dict[str, Any]) -> tuple[str, str]:
        shards = path / "weights"
        if (shards / "tp0_sharded_checkpoint.safetensors").exists():
            for rank in range(neuron_config["tp_degree"]):
                (shards / f"tp{rank}_sharded_checkpoint.safetensors").read_bytes()
        elif not (path / "model.safetensors").is_file():  # `load_state_dict`
            raise FileNotFoundError(
                f"Can not find model.safetensors or pytorch_model.bin in {path}"
            )
        self.loaded_weights.append(str(path))
        return ("loaded", str(path))

    def modules(self) -> dict[str, ModuleType]:
        model_class = type(
            "NeuronModelForCausalLM",
            (),
            {
                "from_pretrained": staticmethod(self.record(FROM_PRETRAINED, self.from_pretrained)),
                "get_neuron_config": staticmethod(
                    self.record(GET_NEURON_CONFIG, self.get_neuron_config)
                ),
                "export": staticmethod(self.record(EXPORT, self.export)),
            },
        )
        neuron_config_class = type(
            "NeuronConfig",
            (),
            {
                "from_pretrained": staticmethod(
                    self.record(READ_NEURON_CONFIG, self.read_neuron_config)
                )
            },
        )
        objects = {
            NEURON_MODEL: model_class,
            READ_NEURON_CONFIG: neuron_config_class,
            NEURON_CONFIG_FIELDS: FakeNeuronConfig,
            SELECT_CACHED: self.record(SELECT_CACHED, self.select),
            AVAILABLE_CORES: self.record(AVAILABLE_CORES, self.available_cores),
            DEFAULT_TARGET: self.record(DEFAULT_TARGET, self.default_target),
            ALIGN_TARGET: self.record(ALIGN_TARGET, self.align),
        }
        modules: dict[str, ModuleType] = {}
        for entry in CONTRACT:
            top = entry.name.split(".")[0]
            module = modules.setdefault(entry.module, ModuleType(entry.module))
            if entry in objects:
                setattr(module, top, objects[entry])
        return modules


@pytest.fixture
def optimum(monkeypatch: pytest.MonkeyPatch) -> FakeOptimum:
    fake = FakeOptimum()
    monkeypatch.setitem(sys.modules, "optimum", ModuleType("optimum"))
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake.auto_config)
    for name in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE", raising=False)
    return fake


@dataclass
class FakeExportProcess:
    """`subprocess.Popen` of the export: records the command and writes the export."""

    runs: list[tuple[list[str], dict[str, str]]] = field(default_factory=list)
    returncode: int = 0
    output: str = "compiling 3 graphs\nCompiler status PASS\n"

    def __call__(self, command: list[str], *, env: dict[str, str], **_: Any) -> Any:
        self.runs.append((command, env))
        process = self

        class Process:
            stdout = io.StringIO(process.output)
            returncode = process.returncode

            def __enter__(self) -> Process:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def wait(self) -> int:
                if process.returncode == 0:
                    value = dict(zip(command[3::2], command[4::2]))
                    write_export(
                        Path(value["--output"]),
                        int(value["--batch-size"]),
                        int(value["--sequence-length"]),
                        int(value["--num-cores"]),
                        torch_dtype={"bf16": "bfloat16", "fp16": "float16"}[
                            value.get("--auto-cast-type", "bf16")
                        ],
                        on_device_sampling=value.get("--on-device-sampling", "true") == "true",
                    )
                return process.returncode

        return Process()


@pytest.fixture
def export_process(monkeypatch: pytest.MonkeyPatch) -> FakeExportProcess:
    fake = FakeExportProcess()
    monkeypatch.setattr(neuron_cache.subprocess, "Popen", fake)
    return fake


def settings_for(tmp_path: Path, **env: str) -> Settings:
    environ = {
        "MAX_BATCH_SIZE": "8",
        "MAX_TOTAL_TOKENS": "4096",
        "HF_NUM_CORES": "2",
        "HF_TOKEN": TOKEN,
        "NEURON_EXPORT_CACHE": str(tmp_path / "exports"),
        **env,
    }
    return read_settings([], environ)


# --- exported models ---------------------------------------------------------------------------


def test_exported_model_is_served_as_is(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    model_dir = write_export(tmp_path / "llama-neuron", 4, 2048, 2)
    settings = read_settings([], {"HF_TOKEN": TOKEN})

    prepared = prepare_neuron_model(settings, model_dir, None, cores_available=2, environ={})
    loaded = load_neuron_model(prepared.model, token=settings.hf_token)

    assert prepared.model == str(model_dir)
    assert prepared.origin == "exported"
    assert prepared.shape == CompiledShape(
        4, 2048, num_cores=2, auto_cast_type="bf16", on_device_sampling=True
    )
    assert optimum.called(FROM_PRETRAINED) == [
        ((str(model_dir),), {"revision": None, "token": TOKEN})
    ]
    assert loaded == ("loaded", str(model_dir / "checkpoint"))
    assert optimum.called(GET_NEURON_CONFIG) == []
    assert optimum.called(SELECT_CACHED) == []
    assert export_process.runs == []
    settings = read_settings([], {}).with_compiled(prepared.shape)
    assert (settings.max_batch_size, settings.max_total_tokens) == (4, 2048)
    assert (settings.num_cores, settings.auto_cast_type) == (2, "bf16")
    assert settings.on_device_sampling is True


def test_batch_size_contradicting_the_exported_model_stops_start_up(
    tmp_path: Path, optimum: FakeOptimum
) -> None:
    model_dir = write_export(tmp_path / "llama-neuron", 4, 2048, 2)

    with pytest.raises(ConfigError) as error:
        read_settings([], {"MAX_BATCH_SIZE": "8"}).with_compiled(compiled_shape(model_dir))

    message = str(error.value)
    assert "MAX_BATCH_SIZE=8 but the model was compiled for batch size 4" in message
    assert "set MAX_BATCH_SIZE=4" in message


def test_exported_model_needing_more_cores_than_available(
    tmp_path: Path, optimum: FakeOptimum
) -> None:
    model_dir = write_export(tmp_path / "llama-neuron", 4, 2048, 8)

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(
            read_settings([], {}),
            model_dir,
            None,
            cores_available=2,
            environ={},
            visible_cores_spec="0-1",
        )

    message = str(error.value)
    assert f"{model_dir} was compiled for 8 Neuron cores but only 2 available" in message
    assert "NEURON_RT_VISIBLE_CORES=0-1" in message
    assert optimum.called(FROM_PRETRAINED) == []


def test_export_from_another_optimum_neuron_version(tmp_path: Path, optimum: FakeOptimum) -> None:
    model_dir = write_export(tmp_path / "old", 4, 2048, 2, optimum_neuron_version="0.3.0")

    with pytest.raises(ConfigError) as error:
        is_exported(model_dir)

    message = str(error.value)
    assert "generated with optimum-neuron version 0.3.0" in message
    assert "Export it again with this image (optimum-neuron 0.4.5" in message


def test_export_from_optimum_neuron_before_0_1_is_refused(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    model_dir = tmp_path / "old-export"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "neuron": {"batch_size": 4}}')

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(read_settings([], {}), model_dir, None, cores_available=2, environ={})

    message = str(error.value)
    assert f"{model_dir} was exported by an optimum-neuron release before 0.1" in message
    assert "optimum-neuron 0.4.5 cannot load" in message
    assert optimum.names() == [READ_NEURON_CONFIG.name]
    assert export_process.runs == []


def test_standard_model_is_not_exported(tmp_path: Path, optimum: FakeOptimum) -> None:
    (tmp_path / "config.json").write_text("{}")

    assert not is_exported(tmp_path)
    with pytest.raises(ConfigError, match="is not an exported Neuron model"):
        compiled_shape(tmp_path)


# --- exports -----------------------------------------------------------------------------------


def test_cached_configuration_is_exported_in_a_separate_process(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    settings = settings_for(tmp_path, HF_AUTO_CAST_TYPE="bf16")
    environ = {"PATH": "/usr/bin", "PYTHONPATH": "/opt/lib"}

    prepared = prepare_neuron_model(settings, MODEL, "abc123", cores_available=2, environ=environ)

    [(_, get_kwargs)] = optimum.called(GET_NEURON_CONFIG)
    assert get_kwargs.pop("config").dtype == torch.bfloat16  # HF_AUTO_CAST_TYPE applied
    assert optimum.called(GET_NEURON_CONFIG) == [
        (
            (MODEL,),
            {
                "token": TOKEN,
                "revision": "abc123",
                "instance_type": None,
                "batch_size": 8,
                "sequence_length": 4096,
                "tensor_parallel_size": 2,
            },
        )
    ]
    assert optimum.called(SELECT_CACHED) == [
        (
            (MODEL,),
            {
                "task": "text-generation",
                "cache_repo_id": "aws-neuron/optimum-neuron-cache",
                "instance_type": "trn1",
                "batch_size": 8,
                "sequence_length": 4096,
                "tensor_parallel_size": 2,
                "torch_dtype": "bf16",
            },
        )
    ]
    [(command, env)] = export_process.runs
    partial = command[-1]
    assert command == [
        sys.executable,
        "-m",
        "handler.model.neuron_export",
        "--model-id",
        MODEL,
        "--revision",
        "abc123",
        "--batch-size",
        "8",
        "--sequence-length",
        "4096",
        "--num-cores",
        "2",
        "--auto-cast-type",
        "bf16",
        "--output",
        partial,
    ]
    assert not any(TOKEN in argument for argument in command)
    assert env["HF_TOKEN"] == TOKEN
    assert env["CUSTOM_CACHE_REPO"] == "aws-neuron/optimum-neuron-cache"
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(neuron_cache.PROJECT_ROOT), "/opt/lib"]

    target = export_dir(settings_for(tmp_path, HF_AUTO_CAST_TYPE="bf16"), MODEL, "abc123", "trn1")
    assert Path(partial).parent == target.parent
    assert not Path(partial).exists()
    assert prepared.model == str(target)
    assert prepared.origin == "compiled"
    assert prepared.shape == CompiledShape(
        8, 4096, num_cores=2, auto_cast_type="bf16", on_device_sampling=True
    )
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_saved_export_is_reused_on_the_next_start(
    tmp_path: Path,
    optimum: FakeOptimum,
    export_process: FakeExportProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(tmp_path)
    first = prepare_neuron_model(settings, MODEL, "abc123", cores_available=2, environ={})
    optimum.calls.clear()
    caplog.set_level(logging.INFO, logger=neuron_loader.__name__)

    second = prepare_neuron_model(settings, MODEL, "abc123", cores_available=2, environ={})

    assert len(export_process.runs) == 1
    assert second.model == first.model
    assert second.origin == "reused"
    assert second.shape == first.shape
    assert optimum.called(GET_NEURON_CONFIG) == []
    assert optimum.called(SELECT_CACHED) == []
    assert f"reusing exported model at {first.model}" in caplog.text


def test_uncached_export_is_refused_without_compile_on_start(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    optimum.cached_entries = []

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(settings_for(tmp_path), MODEL, "abc123", cores_available=2, environ={})

    message = str(error.value)
    assert (
        f"No precompiled Neuron artifacts for {MODEL} (revision abc123) with batch size 8, "
        "sequence length 4096, 2 cores, dtype bf16 in the hub cache aws-neuron/optimum-neuron-cache"
    ) in message
    assert "up to an hour" in message
    assert "NEURON_COMPILE_ON_START=true (--compile-on-start)" in message
    assert "container_startup_health_check_timeout" in message
    assert (
        f"python -m handler.model.neuron_export --model-id {MODEL} --revision abc123 "
        "--batch-size 8 --sequence-length 4096 --num-cores 2 --auto-cast-type bf16 --output DIR"
    ) in message
    assert f"optimum-cli neuron cache lookup {MODEL}" in message
    assert TOKEN not in message
    assert export_process.runs == []


def test_failed_cache_lookup_counts_as_a_miss_and_says_why(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    optimum.lookup_error = ValueError("No hub cache registry found for neuronx-cc-2.21.33363.0")

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(settings_for(tmp_path), MODEL, None, cores_available=2, environ={})

    assert "(the lookup failed: ValueError: No hub cache registry found" in str(error.value)
    assert "revision main" in str(error.value)
    assert export_process.runs == []


def test_uncached_export_allowed_by_compile_on_start_warns(
    tmp_path: Path,
    optimum: FakeOptimum,
    export_process: FakeExportProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    optimum.cached_entries = []
    settings = settings_for(tmp_path, NEURON_COMPILE_ON_START="true")

    prepared = prepare_neuron_model(settings, MODEL, None, cores_available=2, environ={})

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.name == neuron_loader.__name__
    text = warning.getMessage()
    assert f"No precompiled Neuron artifacts for {MODEL} (revision main) with batch size 8" in text
    assert "because NEURON_COMPILE_ON_START is set" in text
    assert f"saved at {prepared.model}" in text
    assert len(export_process.runs) == 1
    assert prepared.origin == "compiled"


def test_dtype_alias_reaches_optimum_neuron_normalised(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    optimum.model_dtype = torch.float32
    settings = settings_for(tmp_path, HF_AUTO_CAST_TYPE="bfloat16")

    prepared = prepare_neuron_model(settings, MODEL, None, cores_available=2, environ={})

    [(_, lookup)] = optimum.called(SELECT_CACHED)
    assert lookup["torch_dtype"] == "bf16"
    [(command, _)] = export_process.runs
    assert command[command.index("--auto-cast-type") + 1] == "bf16"
    assert "-tp2-bf16-" in Path(prepared.model).name
    assert prepared.shape.auto_cast_type == "bf16"


def test_model_dtype_is_used_when_none_is_set(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    optimum.model_dtype = torch.float16

    prepare_neuron_model(settings_for(tmp_path), MODEL, None, cores_available=2, environ={})

    [(_, lookup)] = optimum.called(SELECT_CACHED)
    assert lookup["torch_dtype"] == "fp16"
    [(command, _)] = export_process.runs
    assert command[command.index("--auto-cast-type") + 1] == "fp16"


def test_all_available_cores_by_default(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    settings = read_settings([], {"NEURON_EXPORT_CACHE": str(tmp_path)})

    prepared = prepare_neuron_model(settings, MODEL, None, cores_available=4, environ={})

    [(_, kwargs)] = optimum.called(GET_NEURON_CONFIG)
    assert kwargs["tensor_parallel_size"] == 4
    assert prepared.shape.num_cores == 4


def test_failed_export_reports_the_end_of_its_log(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    export_process.returncode = 70
    export_process.output = "".join(f"line {i}\n" for i in range(100)) + "neuronx-cc: OOM\n"
    settings = settings_for(tmp_path)

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(settings, MODEL, None, cores_available=2, environ={})

    message = str(error.value)
    assert f"Exporting {MODEL} (revision main) with batch size 8" in message
    assert "failed (exit code 70)" in message
    assert "    neuronx-cc: OOM" in message
    assert "line 99" in message
    assert "line 50\n" not in message
    assert list((tmp_path / "exports").iterdir()) == []


def test_real_export_process_failing_without_optimum_neuron(
    tmp_path: Path, optimum: FakeOptimum
) -> None:
    """The real `python -m handler.model.neuron_export` child, which has no optimum-neuron here."""
    settings = settings_for(tmp_path)

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(
            settings, MODEL, None, cores_available=2, environ=dict(os.environ, HF_TOKEN="stale")
        )

    message = str(error.value)
    assert "failed (exit code 1)" in message
    assert "The Neuron backend needs optimum-neuron 0.4.5" in message
    assert list((tmp_path / "exports").iterdir()) == []


def test_missing_optimum_neuron(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optimum.neuron", None)
    monkeypatch.setitem(sys.modules, "optimum.neuron.configuration_utils", None)

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(settings_for(tmp_path), MODEL, None, cores_available=2, environ={})

    message = str(error.value)
    assert "requirements-neuron.txt" in message
    assert "https://pip.repos.neuron.amazonaws.com" in message
    assert "SERVING_BACKEND=torch" in message


# --- cores -------------------------------------------------------------------------------------


def test_more_cores_requested_than_available(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    settings = settings_for(tmp_path, HF_NUM_CORES="8")

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(
            settings, MODEL, None, cores_available=2, environ={}, visible_cores_spec="4-5"
        )

    message = str(error.value)
    assert (
        "HF_NUM_CORES=8 Neuron cores requested but only 2 available to this process "
        "(NEURON_RT_VISIBLE_CORES=4-5)"
    ) in message
    assert "set HF_NUM_CORES (--num-cores) between 1 and 2" in message
    assert optimum.calls == [
        (READ_NEURON_CONFIG.name, (MODEL,), {"token": TOKEN, "revision": "main"})
    ]
    assert export_process.runs == []


def test_no_cores_at_all() -> None:
    with pytest.raises(ConfigError) as error:
        check_available_cores(1, 0)

    message = str(error.value)
    assert "No Neuron cores are available to this process" in message
    assert "NEURON_RT_VISIBLE_CORES is not set" in message
    assert "SERVING_BACKEND=torch" in message


@pytest.mark.parametrize(
    ("num_cores", "visible", "expected"),
    [
        (None, None, 32),
        ("4", None, 4),
        (4, None, 4),
        (None, "3", 1),
        (None, "4-7", 4),
        ("2", "0-7", 2),
    ],
)
def test_available_cores(
    optimum: FakeOptimum,
    monkeypatch: pytest.MonkeyPatch,
    num_cores: int | str | None,
    visible: str | None,
    expected: int,
) -> None:
    """The count agrees with optimum-neuron's own, which reads the same variables."""
    if num_cores is not None:
        monkeypatch.setenv("NEURON_RT_NUM_CORES", str(num_cores))
    if visible is not None:
        monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", visible)
    assert available_cores(num_cores, visible) == expected
    assert optimum.called(AVAILABLE_CORES) == [((), {})]
    assert optimum.available_cores() == min(expected, optimum.device_cores)


@pytest.mark.parametrize("visible", ["0,1", "0,2,4-5", "0-1,8-9"])
def test_visible_core_lists_stop_start_up_with_the_forms_that_work(
    optimum: FakeOptimum, monkeypatch: pytest.MonkeyPatch, visible: str
) -> None:
    """optimum-neuron counts '0,1' as one core and raises on '0,2,4-5' (`utils/system.py`):
    such values are refused before it reads them, naming the forms that work."""
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", visible)

    with pytest.raises(ConfigError) as error:
        available_cores(None, visible)

    message = str(error.value)
    assert f"NEURON_RT_VISIBLE_CORES={visible!r} is a list" in message
    assert "one core index (3) or one range of contiguous cores (0-3)" in message
    assert optimum.called(AVAILABLE_CORES) == []


@pytest.mark.parametrize(
    ("num_cores", "visible", "named"),
    [(None, "a-b", "NEURON_RT_VISIBLE_CORES='a-b'"), ("two", None, "NEURON_RT_NUM_CORES='two'")],
)
def test_invalid_core_variables(
    optimum: FakeOptimum, num_cores: str | None, visible: str | None, named: str
) -> None:
    with pytest.raises(ConfigError, match=f"{named} is invalid"):
        available_cores(num_cores, visible)


# --- export keys -------------------------------------------------------------------------------


def test_export_key_names_every_shape_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        neuron_cache,
        "sdk_versions",
        lambda: {"optimum-neuron": "0.4.5", "neuronx-cc": "2.21.33363.0+2b2a9e9f"},
    )
    settings = Settings(max_batch_size=8, max_total_tokens=4096, num_cores=2, auto_cast_type="bf16")

    key = export_key(MODEL, "refs/pr/1", settings, "trn1")

    assert key == (
        "acme--llama-3-8b--refs_pr_1--bs8-seq4096-tp2-bf16-trn1-sampling-auto"
        "--optimum-neuron-0.4.5-neuronx-cc-2.21.33363.0_2b2a9e9f"
    )
    variants = {
        export_key(MODEL, "refs/pr/1", Settings(**changed), "trn1")
        for changed in (
            {"max_batch_size": 4, "max_total_tokens": 4096, "num_cores": 2},
            {"max_batch_size": 8, "max_total_tokens": 2048, "num_cores": 2},
            {"max_batch_size": 8, "max_total_tokens": 4096, "num_cores": 4},
            {"max_batch_size": 8, "max_total_tokens": 4096, "num_cores": 2},
        )
    }
    assert len(variants | {key, export_key(MODEL, "main", settings, "trn1")}) == 6
    with pytest.raises(ValueError, match="num_cores"):
        export_key(MODEL, None, Settings(), "trn1")


def test_export_key_holds_the_target_and_where_tokens_are_sampled() -> None:
    """An export for trn2 is not reused on inf2 (a shared NEURON_EXPORT_CACHE volume), nor one
    with on-device sampling where host sampling is asked for."""
    settings = Settings(num_cores=2)
    keys = {
        export_key(MODEL, None, settings, "trn1"),
        export_key(MODEL, None, settings, "trn2"),
        export_key(MODEL, None, Settings(num_cores=2, on_device_sampling=True), "trn1"),
        export_key(MODEL, None, Settings(num_cores=2, on_device_sampling=False), "trn1"),
    }
    assert len(keys) == 4
    assert "-trn2-sampling-auto--" in export_key(MODEL, None, settings, "trn2")
    host = export_key(MODEL, None, Settings(num_cores=2, on_device_sampling=False), "trn1")
    assert "-trn1-sampling-host--" in host


def test_export_key_of_a_local_model_follows_its_files(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    settings = Settings(num_cores=2)

    before = export_key(model_dir, "ignored", settings, "trn1")
    assert before.startswith("local--my-model--")
    assert before == export_key(model_dir, None, settings, "trn1")
    (model_dir / "model.safetensors").write_bytes(b"new weights")
    assert export_key(model_dir, None, settings, "trn1") != before


def test_export_root() -> None:
    assert export_root(Settings(hub_cache="/data")) == Path("/data/neuron-exports")
    assert export_root(Settings(hub_cache="/data", export_cache="/mnt/x")) == Path("/mnt/x")
    assert export_root(Settings()) == Path.home() / ".cache/huggingface/hub/neuron-exports"


# --- the export entry point --------------------------------------------------------------------


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "</s>": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(
        model_dir
    )
    GenerationConfig(eos_token_id=2, temperature=0.6, do_sample=True).save_pretrained(model_dir)
    return write_model(model_dir, dtype="float32")


def test_export_entry_point(tmp_path: Path, optimum: FakeOptimum, tokenizer_dir: Path) -> None:
    optimum.model_dtype = torch.float32
    output = tmp_path / "out"
    argv = ["--model-id", str(tokenizer_dir), "--num-cores", "2", "--batch-size", "4"]
    argv += ["--sequence-length", "1024", "--auto-cast-type", "bfloat16", "--output", str(output)]

    assert neuron_export.main(argv) == 0

    assert optimum.names() == [
        GET_NEURON_CONFIG.name,
        ALIGN_TARGET.name,
        EXPORT.name,
        SAVE_PRETRAINED.name,
    ]
    [(_, get_kwargs)] = optimum.called(GET_NEURON_CONFIG)
    assert get_kwargs.pop("config").dtype == torch.bfloat16
    assert get_kwargs == {
        "token": None,
        "revision": None,
        "instance_type": None,
        "batch_size": 4,
        "sequence_length": 1024,
        "tensor_parallel_size": 2,
    }
    [(export_args, export_kwargs)] = optimum.called(EXPORT)
    assert export_args == (str(tokenizer_dir),)
    assert export_kwargs["neuron_config"].torch_dtype == torch.bfloat16
    assert {k: v for k, v in export_kwargs.items() if k != "neuron_config"} == {
        "token": None,
        "revision": None,
        "load_weights": False,
    }
    assert optimum.called(SAVE_PRETRAINED) == [((str(output),), {})]
    assert compiled_shape(output) == CompiledShape(
        4, 1024, num_cores=2, auto_cast_type="bf16", on_device_sampling=True
    )
    assert (output / "tokenizer.json").is_file()
    assert json.loads((output / "generation_config.json").read_text())["temperature"] == 0.6


def test_export_cli_parses_without_optimum_neuron() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "handler.model.neuron_export", "--help"],
        capture_output=True,
        text=True,
        cwd=neuron_cache.PROJECT_ROOT,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    for flag in ("--model-id", "--num-cores", "--batch-size", "--sequence-length", "--output"):
        assert flag in result.stdout
    assert "HF_TOKEN" in result.stdout


def test_export_cli_rejects_an_unknown_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        neuron_export.main(
            ["--model-id", MODEL, "--num-cores", "2", "--output", "x", "--auto-cast-type", "int8"]
        )

    assert "'int8': use bf16, fp16 or fp32" in capsys.readouterr().err


# --- issue 17: what the reading against optimum-neuron 0.4.5 found ------------------------------


def test_hub_hosted_export_loads_from_the_downloaded_snapshot(
    tmp_path: Path, optimum: FakeOptimum, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export pushed to the hub with pre-sharded weights and no `checkpoint_id`, served by
    hub id: optimum-neuron's `load_weights` finds `checkpoint/` only in a local directory, so
    the engine hands it the snapshot `resolve_model` downloaded, not the hub id."""
    repository = write_export(tmp_path / "hub" / "acme--llama-neuron", 4, 2048, 2)
    optimum.hub["acme/llama-neuron"] = repository
    snapshot = tmp_path / "snapshot"  # what resolve_model fetched: the same files
    write_export(snapshot, 4, 2048, 2)
    resolved = ResolvedModel(snapshot, "acme/llama-neuron", "hub id acme/llama-neuron", "abc123")
    monkeypatch.setattr(neuron_backend, "NeuronBackend", lambda model: model)
    monkeypatch.setattr(engine_module, "assemble", lambda settings, backend, path, **kw: backend)
    environ = {"HF_TOKEN": TOKEN}

    loaded = engine_module.build_neuron_engine(
        read_settings([], environ), resolved, lambda stage: None, environ
    )

    assert loaded == ("loaded", str(snapshot / "checkpoint"))
    [(args, kwargs)] = optimum.called(FROM_PRETRAINED)
    assert args == (str(snapshot),) and kwargs == {"revision": None, "token": TOKEN}


def test_hub_id_of_an_export_without_checkpoint_id_cannot_load(
    tmp_path: Path, optimum: FakeOptimum
) -> None:
    """Counter-check of the fake: given the hub id, it fails as optimum-neuron does."""
    optimum.hub["acme/llama-neuron"] = write_export(tmp_path / "hub", 4, 2048, 2)

    with pytest.raises(ConfigError, match="Checkpoint file not found under acme/llama-neuron"):
        load_neuron_model("acme/llama-neuron", revision="abc123", token=TOKEN)


def test_standard_hub_model_is_still_exported_from_its_id(
    tmp_path: Path,
    optimum: FakeOptimum,
    export_process: FakeExportProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snapshot = write_model(tmp_path / "snapshot")
    resolved = ResolvedModel(snapshot, MODEL, f"hub id {MODEL}", "abc123")
    monkeypatch.setattr(neuron_backend, "NeuronBackend", lambda model: model)
    monkeypatch.setattr(engine_module, "assemble", lambda settings, backend, path, **kw: backend)
    environ = {"NEURON_EXPORT_CACHE": str(tmp_path / "exports"), "HF_NUM_CORES": "2"}

    engine_module.build_neuron_engine(
        read_settings([], environ), resolved, lambda stage: None, environ
    )

    [(command, _)] = export_process.runs
    assert command[4:7] == [MODEL, "--revision", "abc123"]


def test_model_config_without_dtype_says_what_is_missing(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    """optimum-neuron's `get_neuron_config` raises on a config without dtype
    (`DTYPE_MAPPER.pt(None)`): the message names the missing field and the setting, not the
    architecture."""
    model = write_model(tmp_path / "no-dtype", dtype=None)

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(settings_for(tmp_path), model, None, cores_available=2, environ={})

    message = str(error.value)
    assert "names no dtype (`torch_dtype`)" in message
    assert "set HF_AUTO_CAST_TYPE (--auto-cast-type) to bf16, fp16 or fp32" in message
    assert "architecture" not in message
    assert export_process.runs == []


def test_configured_dtype_applies_before_optimum_reads_the_config(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    model = write_model(tmp_path / "no-dtype", dtype=None)
    settings = settings_for(tmp_path, HF_AUTO_CAST_TYPE="fp16")

    prepared = prepare_neuron_model(settings, model, None, cores_available=2, environ={})

    [(_, kwargs)] = optimum.called(GET_NEURON_CONFIG)
    assert kwargs["config"].dtype == torch.float16
    [(command, _)] = export_process.runs
    assert command[command.index("--auto-cast-type") + 1] == "fp16"
    assert prepared.shape.auto_cast_type == "fp16"


def test_export_for_another_instance_family_is_refused_with_a_message(
    tmp_path: Path,
    optimum: FakeOptimum,
    tokenizer_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On an inf2 machine, a trn2 target makes optimum-neuron's export raise a ValueError
    (`align_compilation_target`): `main` refuses before compiling, with a message."""
    argv = ["--model-id", str(tokenizer_dir), "--num-cores", "2", "--output", str(tmp_path / "o")]

    assert neuron_export.main([*argv, "--instance-type", "trn2"]) == 1

    assert optimum.called(EXPORT) == []
    message = caplog.records[-1].getMessage()
    assert "Cannot compile for trn2 (compilation target trn2) on this machine" in message
    assert "The current platform is trn1 but we are compiling for trn2" in message
    assert "Run the export on a trn2 instance" in message
    # inf2, trn1 and trn1n share the compilation target trn1: inf2 compiles for trn1.
    assert neuron_export.main([*argv, "--instance-type", "trn1"]) == 0


def test_export_with_a_contradicting_platform_override_is_refused(
    tmp_path: Path,
    optimum: FakeOptimum,
    tokenizer_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    argv = ["--model-id", str(tokenizer_dir), "--num-cores", "2", "--output", str(tmp_path / "o")]

    assert neuron_export.main(argv) == 1

    assert optimum.called(EXPORT) == []
    assert "NEURON_PLATFORM_TARGET_OVERRIDE=trn2 contradicts" in caplog.records[-1].getMessage()


def test_on_device_sampling_switch_reaches_the_export(
    tmp_path: Path, optimum: FakeOptimum, tokenizer_dir: Path
) -> None:
    """Llama's `_get_neuron_config` always turns on-device sampling on; the switch turns it off
    in the neuron config the export compiles."""
    output = tmp_path / "out"
    argv = ["--model-id", str(tokenizer_dir), "--num-cores", "2", "--output", str(output)]

    assert neuron_export.main([*argv, "--on-device-sampling", "false"]) == 0

    [(_, export_kwargs)] = optimum.called(EXPORT)
    assert export_kwargs["neuron_config"].on_device_sampling is False
    assert compiled_shape(output).on_device_sampling is False


def test_on_device_sampling_switch_at_start_up(
    tmp_path: Path, optimum: FakeOptimum, export_process: FakeExportProcess
) -> None:
    """`NEURON_ON_DEVICE_SAMPLING=false`: its own export key, hub cache entries compiled with
    on-device sampling do not count, and the export process gets the switch."""
    optimum.cached_entries = [{"batch_size": 8, "on_device_sampling": True}]
    settings = settings_for(tmp_path, NEURON_ON_DEVICE_SAMPLING="false")

    with pytest.raises(ConfigError) as error:
        prepare_neuron_model(settings, MODEL, None, cores_available=2, environ={})
    assert "dtype bf16, host sampling in the hub cache" in str(error.value)
    assert "--on-device-sampling false --output DIR" in str(error.value)

    optimum.cached_entries.append({"batch_size": 8, "on_device_sampling": False})
    prepared = prepare_neuron_model(settings, MODEL, None, cores_available=2, environ={})

    [(command, _)] = export_process.runs
    assert command[command.index("--on-device-sampling") + 1] == "false"
    assert "-sampling-host--" in Path(prepared.model).name
    assert prepared.shape.on_device_sampling is False
    assert read_settings([], {}).with_compiled(prepared.shape).on_device_sampling is False


def test_on_device_sampling_contradicting_the_exported_model_stops_start_up(
    tmp_path: Path, optimum: FakeOptimum
) -> None:
    model_dir = write_export(tmp_path / "llama-neuron", 4, 2048, 2, on_device_sampling=True)

    with pytest.raises(ConfigError) as error:
        read_settings(["--on-device-sampling", "false"], {}).with_compiled(
            compiled_shape(model_dir)
        )

    assert "--on-device-sampling=False but the model was compiled for on-device sampling True" in (
        str(error.value)
    )
