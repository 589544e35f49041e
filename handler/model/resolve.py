"""Find the model to serve and the backend to serve it with, before anything is loaded.

The model comes from the first of: `HF_MODEL_ID` / `--model-id` (a hub id or a local directory),
SageMaker model data in `/opt/ml/model`, the Inference Endpoints mount (`HF_MODEL_DIR`, default
`/repository`). Hub ids are fetched into the hub cache with `huggingface_hub.snapshot_download`,
which honours `HF_HUB_OFFLINE` itself. Every dead end raises a `ConfigError` that tells the
operator which setting to change; the token never appears in a message or a log line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from handler.config import Settings
from handler.errors import ConfigError
from handler.model.neuron_contract import AVAILABLE_CORES, load_optimum

logger = logging.getLogger(__name__)

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
ENDPOINTS_MODEL_DIR = Path("/repository")

METADATA_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "*.jinja",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
"""Configuration, tokenizer, generation defaults, chat templates and the weight indexes."""
NEURON_PATTERNS = ("neuron_config.json", "model.pt", "model_*.pt", "compiled/*", "checkpoint/*")
"""An exported Neuron model: optimum-neuron 0.4 saves the traced graphs as `model.pt` (one file
per bundle, `model_<bundle>.pt`, in later releases) and pre-sharded weights under `checkpoint/`;
releases before 0.1 saved NEFF files under `compiled/`."""
REMOTE_CODE_PATTERNS = ("*.py", "*.tiktoken")
"""Fetched only with `trust_remote_code`: the model's own modelling and tokenizer code."""
SAFETENSORS_PATTERNS = ("*.safetensors",)
SAFETENSORS_IGNORED = ("consolidated*.safetensors", "original/*")
"""Duplicate checkpoints in another layout (Mistral's `consolidated`, Llama's `original/`)."""
BIN_PATTERNS = ("pytorch_model.bin",)


@dataclass(frozen=True)
class ResolvedModel:
    """A local directory holding the model, and how it was found."""

    path: Path
    """Directory with `config.json`, tokenizer files and weights (or Neuron artifacts)."""
    model_id: str
    """What `/info` and `/v1/models` report: the hub id, or the directory's name."""
    source: str
    """Where the files come from, for the start-up log."""
    revision: str | None
    """Commit the hub revision resolved to (`/info` `model_sha`); None for local directories."""


@dataclass(frozen=True)
class BackendChoice:
    """Which `ModelBackend` implementation serves the model, on which device, and why."""

    name: Literal["neuron", "torch"]
    device: str
    """`neuron`, `cuda` or `cpu`."""
    reason: str


# --- model -------------------------------------------------------------------------------------


def resolve_model(
    settings: Settings,
    *,
    sagemaker_dir: Path = SAGEMAKER_MODEL_DIR,
    endpoints_dir: Path = ENDPOINTS_MODEL_DIR,
) -> ResolvedModel:
    """Find (and download if needed) the model; log where it comes from in one line.

    Raises `ConfigError` when there is no model, it cannot be fetched, or it cannot be served.
    """
    if settings.model_id:
        why = "HF_MODEL_ID / --model-id is set"
        local = Path(settings.model_id)
        if local.is_dir():
            resolved = _local_model(settings, local, f"local directory {local}")
        else:
            resolved = _hub_model(settings, settings.model_id)
    else:
        resolved, why = _mounted_model(settings, sagemaker_dir, endpoints_dir)
    _check_model_dir(settings, resolved)
    logger.info("Model %r: %s, because %s", resolved.model_id, resolved.source, why)
    return resolved


def _mounted_model(
    settings: Settings, sagemaker_dir: Path, endpoints_dir: Path
) -> tuple[ResolvedModel, str]:
    """The model in the SageMaker or Inference Endpoints directory, whichever holds one."""
    places = [(f"SageMaker model data {sagemaker_dir}", sagemaker_dir)]
    if settings.model_dir:
        places.append((f"HF_MODEL_DIR={settings.model_dir}", Path(settings.model_dir)))
    else:
        places.append((f"Inference Endpoints mount {endpoints_dir}", endpoints_dir))
    reasons = ["HF_MODEL_ID is not set"]
    for label, path in places:
        if _holds_model(path):
            reasons.append(f"{path} holds a model")
            return _local_model(settings, path, label), "; ".join(reasons)
        reasons.append(f"{path} holds none")
    raise ConfigError(
        "No model to serve. Looked in:\n"
        "  - HF_MODEL_ID / --model-id: not set\n"
        + "".join(f"  - {label}: {_describe(path)}\n" for label, path in places)
        + "Set HF_MODEL_ID (or --model-id) to a hub id such as "
        "HuggingFaceTB/SmolLM2-135M-Instruct or to a local directory, put the model files in "
        f"{sagemaker_dir} (SageMaker model data), or mount them at {endpoints_dir} "
        "(or the directory HF_MODEL_DIR names)."
    )


def _holds_model(path: Path) -> bool:
    """True when `path` looks like a model directory (standard or Neuron export)."""
    if not path.is_dir():
        return False
    if (path / "config.json").is_file() or (path / "neuron_config.json").is_file():
        return True
    return any(path.glob("*.safetensors"))


def _describe(path: Path) -> str:
    """Why `path` holds no model, for the no-model message."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return "is empty"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    nested = [path / name for name in entries if _holds_model(path / name)]
    if nested:
        return (
            f"no config.json at the top, but {nested[0].name}/ holds a model: pack the model "
            "archive from inside the model directory (files at its root, no enclosing folder)"
        )
    return f"holds no config.json, *.safetensors or neuron_config.json (found {shown})"


def _local_model(settings: Settings, path: Path, source: str) -> ResolvedModel:
    """A model already on disk; a hub revision does not apply to it."""
    if settings.revision:
        logger.warning(
            "HF_MODEL_REVISION / --revision %r ignored: the model comes from %s, not the hub",
            settings.revision,
            source,
        )
    path = path.resolve()
    return ResolvedModel(path=path, model_id=path.name, source=source, revision=None)


def _hub_model(settings: Settings, repo_id: str) -> ResolvedModel:
    """Fetch what serving needs of hub model `repo_id` into the hub cache (or find it there)."""
    if repo_id.startswith(("/", ".", "~")):
        raise ConfigError(
            f"HF_MODEL_ID / --model-id {repo_id!r} looks like a local path, but no such "
            "directory exists: check the path (and that the volume is mounted in the container)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(
            f"HF_MODEL_ID / --model-id {repo_id!r} is neither an existing local directory nor a "
            f"valid hub id ({exc}): use 'org/name' or a directory path"
        ) from None
    cache_dir = Path(settings.hub_cache or hub_constants.HF_HUB_CACHE)
    offline = bool(hub_constants.HF_HUB_OFFLINE)
    if not offline:
        _check_cache_writable(cache_dir)
    revision = settings.revision or "main"

    def fetch(at: str, patterns: Sequence[str], ignore: Sequence[str] = ()) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=at,
                token=settings.hf_token,
                cache_dir=str(cache_dir),
                local_files_only=offline,
                allow_patterns=list(patterns),
                ignore_patterns=list(ignore) or None,
            )
        )

    try:
        patterns = [*METADATA_PATTERNS, *NEURON_PATTERNS]
        if settings.trust_remote_code:
            patterns += REMOTE_CODE_PATTERNS
        snapshot = fetch(revision, patterns)
        commit = snapshot.name
        fetch(commit, *_safetensors_selection(snapshot))
        weights = "safetensors weights"
        if not _has_safetensors(snapshot) and not (snapshot / "neuron_config.json").is_file():
            fetch(commit, _bin_selection(snapshot))
            weights = "pytorch_model*.bin weights (the repository has no safetensors)"
    except Exception as exc:
        error = _hub_error(exc, settings, repo_id, revision, cache_dir, offline)
        if error is None:
            raise
        raise error from exc
    mode = ", offline (HF_HUB_OFFLINE)" if offline else ""
    source = f"hub id {repo_id} (revision {revision} -> {commit}, {weights}) from cache {cache_dir}"
    return ResolvedModel(path=snapshot, model_id=repo_id, source=source + mode, revision=commit)


def _safetensors_selection(snapshot: Path) -> tuple[list[str], list[str]]:
    """Patterns for the safetensors weights: the shards the index names, when there is one."""
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        return _index_shards(index), []
    return list(SAFETENSORS_PATTERNS), list(SAFETENSORS_IGNORED)


def _bin_selection(snapshot: Path) -> list[str]:
    """Patterns for `pytorch_model*.bin` weights, for repositories without safetensors."""
    index = snapshot / "pytorch_model.bin.index.json"
    return _index_shards(index) if index.is_file() else list(BIN_PATTERNS)


def _index_shards(index: Path) -> list[str]:
    """The shard files a `*.index.json` weight map names."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{index} is not a valid weight index ({exc})") from exc
    return sorted(set(weight_map.values()))


def _has_safetensors(path: Path) -> bool:
    return any(path.rglob("*.safetensors"))


CACHE_PROBE_BYTES = 64 * 1024
"""Written (and synced) into the hub cache at start: creating an empty file succeeds on a full
disk, writing to it does not."""


def _check_cache_writable(cache_dir: Path) -> None:
    """Fail before downloading when the hub cache cannot be created or written, or is full."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir) as probe:
            probe.write(b"\0" * CACHE_PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(
                f"The hub cache directory {cache_dir} is full ({exc.strerror or exc}); models "
                "are downloaded there. Free space on that volume, give the container a larger "
                "one (SageMaker: volume_size; docker: a bigger /data volume), or set "
                "HUGGINGFACE_HUB_CACHE (or HF_HOME) to a directory with room for the model."
            ) from exc
        raise ConfigError(
            f"The hub cache directory {cache_dir} cannot be created or written "
            f"({exc.strerror or exc}); models are downloaded there. Set HUGGINGFACE_HUB_CACHE "
            "(or HF_HOME) to a writable directory, e.g. a mounted volume such as /data, or make "
            f"{cache_dir} writable."
        ) from exc


def _hub_error(
    exc: Exception,
    settings: Settings,
    repo_id: str,
    revision: str,
    cache_dir: Path,
    offline: bool,
) -> ConfigError | None:
    """The operator-facing message for a failed hub fetch; None for errors that are ours."""
    token_given = settings.hf_token is not None
    page = f"https://huggingface.co/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if token_given:
            return ConfigError(
                f"The token in HF_TOKEN has no access to gated model {repo_id}: accept its "
                f"conditions on {page} with the account that owns the token, or use a token of "
                "an account that has access"
            )
        return ConfigError(
            f"Model {repo_id} is gated: accept its conditions on {page}, then set HF_TOKEN to "
            "a read token of that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ConfigError(
            f"Revision {revision!r} (HF_MODEL_REVISION / --revision) does not exist in model "
            f"{repo_id}: use a branch, tag or commit hash listed on {page}/commits/main"
        )
    if isinstance(exc, RepositoryNotFoundError):
        access = (
            "the token in HF_TOKEN has no access to it"
            if token_given
            else "it is private: set HF_TOKEN to a token with read access"
        )
        return ConfigError(
            f"Model {repo_id} was not found on the hub: check HF_MODEL_ID / --model-id, or {access}"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        if offline:
            return ConfigError(
                f"Model {repo_id} (revision {revision}) is not in the hub cache at {cache_dir} "
                "and network access is off (HF_HUB_OFFLINE): download it into that cache first "
                f"(`huggingface-cli download {repo_id} --cache-dir {cache_dir}`), or unset "
                "HF_HUB_OFFLINE"
            )
        return ConfigError(
            f"Model {repo_id} (revision {revision}) is not in the hub cache at {cache_dir} and "
            "the hub could not be reached: give the container network access to "
            "huggingface.co, or provide the model files in /opt/ml/model or HF_MODEL_DIR"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            fix = (
                "the token in HF_TOKEN is invalid or lacks read access"
                if token_given
                else "set HF_TOKEN to a read token"
            )
            return ConfigError(f"The hub refused access to model {repo_id} ({status}): {fix}")
        return ConfigError(
            f"Downloading model {repo_id} from the hub failed (HTTP {status}): "
            f"{_redact(str(exc).splitlines()[0], settings.hf_token)}; retry later"
        )
    if isinstance(exc, OSError):
        return ConfigError(
            f"Downloading model {repo_id} into {cache_dir} failed "
            f"({_redact(str(exc), settings.hf_token)}): check network access and free disk space "
            "in the hub cache (HUGGINGFACE_HUB_CACHE / HF_HOME)"
        )
    return None


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<redacted>") if token else text


def _check_model_dir(settings: Settings, model: ResolvedModel) -> None:
    """The directory must hold a config `transformers` understands and weights to load."""
    config_path = model.path / "config.json"
    if not config_path.is_file():
        raise ConfigError(
            f"{model.path} (from {model.source}) has no config.json: point HF_MODEL_ID at the "
            "directory that contains config.json, tokenizer files and *.safetensors weights"
        )
    try:
        config: Any = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_path} is not valid JSON ({exc})") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not settings.trust_remote_code:
        _check_architecture(config_path, model_type, ships_code="auto_map" in config)
    if not _has_weights(model.path):
        raise ConfigError(
            f"{model.path} (from {model.source}) holds no weights: expected *.safetensors "
            "(or pytorch_model*.bin, or an exported Neuron model with neuron_config.json)"
        )


def _check_architecture(config_path: Path, model_type: str | None, *, ships_code: bool) -> None:
    """Reject a `model_type` that this `transformers` does not know, unless remote code is on."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type is None:
        raise ConfigError(
            f"{config_path} has no model_type: it is not a transformers model configuration"
        )
    if model_type in CONFIG_MAPPING:
        return
    hint = (
        "the model ships its own code (auto_map in config.json): review it, then set "
        "HF_MODEL_TRUST_REMOTE_CODE=true (or --trust-remote-code)"
        if ships_code
        else "use a model of a supported architecture, or set HF_MODEL_TRUST_REMOTE_CODE=true "
        "(or --trust-remote-code) if the model's repository provides its own code"
    )
    raise ConfigError(
        f"Unknown architecture: {config_path} declares model_type {model_type!r}, which "
        f"transformers {transformers.__version__} does not know; {hint}"
    )


def _has_weights(path: Path) -> bool:
    return (
        _has_safetensors(path)
        or any(path.glob("pytorch_model*.bin"))
        or (path / "neuron_config.json").is_file()
    )


# --- backend -----------------------------------------------------------------------------------


def choose_backend(
    settings: Settings, *, neuron_devices: Callable[[], list[str]] | None = None
) -> BackendChoice:
    """Pick the Neuron or torch backend (`settings.backend`) and the device; log it in one line.

    `neuron_devices` lists the Neuron device files (default: `/dev/neuron*`).
    Raises `ConfigError` when the requested backend or device is not there.
    """
    if settings.backend == "torch":
        choice = _torch_choice(settings, "backend torch requested (--backend / SERVING_BACKEND)")
    else:
        found = _neuron_found(neuron_devices or _neuron_device_files)
        if settings.backend == "neuron":
            if found is None:
                raise ConfigError(
                    "Backend neuron requested (--backend / SERVING_BACKEND) but no Neuron device "
                    "was found (no /dev/neuron*, optimum-neuron reports no cores): run on an "
                    "inf2 or trn1 instance and pass the devices to the container "
                    "(docker run --device /dev/neuron0 ...), or set SERVING_BACKEND=torch"
                )
            choice = BackendChoice("neuron", "neuron", f"backend neuron requested; {found}")
        elif found is not None:
            choice = BackendChoice("neuron", "neuron", f"backend auto: {found}")
        else:
            choice = _torch_choice(settings, "backend auto: no Neuron device (/dev/neuron*)")
    logger.info("Backend %s on %s: %s", choice.name, choice.device, choice.reason)
    return choice


def _neuron_device_files() -> list[str]:
    return sorted(glob("/dev/neuron*"))


def _neuron_found(probe: Callable[[], list[str]]) -> str | None:
    """A description of the Neuron hardware present, or None when there is none."""
    devices = probe()
    if devices:
        return f"{len(devices)} Neuron device(s) found ({', '.join(devices)})"
    cores = _optimum_neuron_cores()
    if cores:
        return f"optimum-neuron reports {cores} available Neuron core(s)"
    return None


def _optimum_neuron_cores() -> int:
    """Neuron cores optimum-neuron can see; 0 when it is not installed or cannot tell."""
    try:
        get_available_cores = load_optimum(AVAILABLE_CORES)
    except (ConfigError, AttributeError):  # not installed, or a release without the function
        return 0
    try:
        return int(get_available_cores())
    except Exception:
        logger.debug("optimum-neuron could not count Neuron cores", exc_info=True)
        return 0


def _torch_choice(settings: Settings, why: str) -> BackendChoice:
    """The torch backend on the requested device (`auto`: CUDA when torch sees one)."""
    import torch

    cuda = torch.cuda.is_available()
    if settings.device == "cuda" and not cuda:
        raise ConfigError(
            "SERVING_DEVICE=cuda (--device cuda) but torch sees no CUDA device: "
            "set SERVING_DEVICE=cpu or auto, or run the container with GPUs (docker run --gpus all)"
        )
    if settings.device == "auto":
        device = "cuda" if cuda else "cpu"
        why += f"; device auto: {'CUDA is available' if cuda else 'no CUDA device'}"
    else:
        device = settings.device
        why += f"; device {device} requested (--device / SERVING_DEVICE)"
    return BackendChoice("torch", device, why)
