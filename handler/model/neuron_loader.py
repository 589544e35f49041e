"""Prepare and load a Neuron model with optimum-neuron (pinned in `requirements-neuron.txt`).

`prepare_neuron_model` decides, before anything is loaded on the device:

1. the model is already exported (it has a `neuron_config.json`): it is served as is, and its
   compiled shapes (`PreparedModel.shape`) go back into `read_settings(..., compiled=shape)` so
   that contradicting settings stop start-up;
2. an export for the same key (`export_key`) was saved under the export cache by an earlier
   start: it is reused;
3. otherwise the model is exported in a separate process (`python -m
   handler.model.neuron_export`), with the compiled artifacts of the hub cache
   (`CUSTOM_CACHE_REPO`) when it has this configuration. Without them the compile can take up
   to an hour, so it only happens when `compile_on_start` allows it.

optimum-neuron is imported inside the functions only: it exists in the Neuron image alone, and
importing this module must stay cheap. Every optimum-neuron name used here or in
`neuron_export` is declared once in `CONTRACT`, which `tests/test_optimum_neuron_contract.py`
checks against the pinned wheel's source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from handler.config import DTYPE_ALIASES, CompiledShape, Settings
from handler.errors import ConfigError

logger = logging.getLogger(__name__)
export_log = logging.getLogger("handler.model.neuron_export")

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""`HF_AUTO_CAST_TYPE` values -> `torch` dtype names."""
OPTIMUM_NEURON_PIN = "0.4.5"
"""The optimum-neuron version `requirements-neuron.txt` pins (named in messages)."""
TASK = "text-generation"
EXPORTS_DIRNAME = "neuron-exports"
EXPORT_LOG_TAIL = 30
"""Lines of the export process's log quoted when it fails."""
PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --- what we use of optimum-neuron -------------------------------------------------------------


@dataclass(frozen=True)
class ContractEntry:
    """One optimum-neuron name we use, checked in the pinned wheel's source by a test."""

    module: str
    """Module we import it from."""
    name: str
    """Name in that module: a function, a class, or `Class.method`."""
    keywords: tuple[str, ...] = ()
    """Keyword arguments we pass; each must be a named parameter."""
    forwarded: tuple[str, ...] = ()
    """Keyword arguments we pass into a `**kwargs` that forwards them (it must take `**kwargs`)."""
    attributes: tuple[str, ...] = ()
    """Instance attributes we read or set; the class's `__init__` must assign each."""


NEURON_MODEL = ContractEntry("optimum.neuron", "NeuronModelForCausalLM")
FROM_PRETRAINED = ContractEntry(
    "optimum.neuron", "NeuronModelForCausalLM.from_pretrained", forwarded=("revision", "token")
)
GET_NEURON_CONFIG = ContractEntry(
    "optimum.neuron",
    "NeuronModelForCausalLM.get_neuron_config",
    keywords=(
        "config",
        "token",
        "revision",
        "instance_type",
        "batch_size",
        "sequence_length",
        "tensor_parallel_size",
    ),
)
EXPORT = ContractEntry(
    "optimum.neuron",
    "NeuronModelForCausalLM.export",
    keywords=("neuron_config", "token", "revision", "load_weights"),
)
SAVE_PRETRAINED = ContractEntry("optimum.neuron", "NeuronModelForCausalLM.save_pretrained")
READ_NEURON_CONFIG = ContractEntry(
    "optimum.neuron.configuration_utils",
    "NeuronConfig.from_pretrained",
    keywords=("token", "revision"),
)
NEURON_CONFIG_FIELDS = ContractEntry(
    "optimum.neuron.models.inference.backend.config",
    "NxDNeuronConfig",
    attributes=(
        "batch_size",
        "sequence_length",
        "tp_degree",
        "torch_dtype",
        "target",
        "on_device_sampling",
    ),
)
SELECT_CACHED = ContractEntry(
    "optimum.neuron.cache.hub_cache",
    "select_hub_cached_entries",
    keywords=(
        "task",
        "cache_repo_id",
        "instance_type",
        "batch_size",
        "sequence_length",
        "tensor_parallel_size",
        "torch_dtype",
    ),
)
AVAILABLE_CORES = ContractEntry("optimum.neuron.utils.system", "get_available_cores")
DEFAULT_TARGET = ContractEntry("optimum.neuron.utils.instance", "get_default_compilation_target")
ALIGN_TARGET = ContractEntry(
    "optimum.neuron.utils.instance", "align_compilation_target", keywords=("override",)
)

CONTRACT: tuple[ContractEntry, ...] = (
    NEURON_MODEL,
    FROM_PRETRAINED,
    GET_NEURON_CONFIG,
    EXPORT,
    SAVE_PRETRAINED,
    READ_NEURON_CONFIG,
    NEURON_CONFIG_FIELDS,
    SELECT_CACHED,
    AVAILABLE_CORES,
    DEFAULT_TARGET,
    ALIGN_TARGET,
)
"""Everything this module and `neuron_export` use of optimum-neuron."""


def load_optimum(entry: ContractEntry) -> Any:
    """The object `entry` names, imported now; `ConfigError` when optimum-neuron is missing."""
    try:
        found: Any = importlib.import_module(entry.module)
        for part in entry.name.split("."):
            found = getattr(found, part)
    except ImportError as exc:
        raise missing_optimum(exc) from exc
    except RuntimeError as exc:
        # optimum.neuron's lazy module reports a failed import of a submodule this way.
        if isinstance(exc.__cause__, ImportError):
            raise missing_optimum(exc.__cause__) from exc
        raise
    return found


def missing_optimum(exc: BaseException) -> ConfigError:
    """The start-up error for a machine without optimum-neuron or the Neuron SDK."""
    return ConfigError(
        f"The Neuron backend needs optimum-neuron {OPTIMUM_NEURON_PIN} and the Neuron SDK "
        f"(neuronx-cc, torch-neuronx, neuronx-distributed), which are not installed here ({exc}). "
        "They come with the Neuron image (requirements-neuron.txt, from AWS's pip index "
        "https://pip.repos.neuron.amazonaws.com): use that image on an inf2, trn1 or trn2 "
        "instance, or set SERVING_BACKEND=torch (--backend torch)."
    )


# --- cores -------------------------------------------------------------------------------------


def parse_visible_cores(spec: str) -> list[int]:
    """Core indices of a `NEURON_RT_VISIBLE_CORES` value in a form optimum-neuron reads too: one
    core index (`3`) or one range (`0-3`).

    The Neuron runtime also takes lists (`0,2,4-5`), but optimum-neuron 0.4.5's
    `get_available_cores` (`utils/system.py`) splits the value on `-` only: it counts `0,1` as
    one core and raises on `0,2,4-5`, so the load would fail inside optimum-neuron. Such values
    stop start-up here with the forms that work.
    """
    text = spec.strip()
    if "," in text:
        raise ConfigError(
            f"NEURON_RT_VISIBLE_CORES={spec!r} is a list, which optimum-neuron "
            f"{OPTIMUM_NEURON_PIN} does not read (it counts '0,1' as one core and fails on "
            "'0,2,4-5'): give one core index (3) or one range of contiguous cores (0-3)"
        )
    first, _, last = text.partition("-")
    try:
        start = int(first)
        end = int(last) if last else start
        if start < 0 or end < start:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"NEURON_RT_VISIBLE_CORES={spec!r} is invalid: use one core index (3) or one range "
            "of contiguous cores (0-3)"
        ) from None
    return list(range(start, end + 1))


def available_cores(
    num_cores_spec: int | str | None = None, visible_cores_spec: str | None = None
) -> int:
    """Neuron cores this process may use.

    optimum-neuron's `get_available_cores()` counts the cores of the Neuron devices; the values
    of `NEURON_RT_NUM_CORES` and `NEURON_RT_VISIBLE_CORES` (passed by the caller, which reads the
    environment) cap it the way the Neuron runtime does. `NEURON_RT_VISIBLE_CORES` is checked
    first: optimum-neuron reads it too, and raises on forms it does not know.
    """
    visible = parse_visible_cores(visible_cores_spec) if visible_cores_spec else None
    cores = int(load_optimum(AVAILABLE_CORES)())
    if num_cores_spec is not None and num_cores_spec != "":
        try:
            cap = int(num_cores_spec)
        except ValueError:
            raise ConfigError(
                f"NEURON_RT_NUM_CORES={num_cores_spec!r} is invalid: it must be a whole number"
            ) from None
        cores = min(cores, cap)
    if visible is not None:
        cores = min(cores, len(visible))
    return cores


def check_cores(
    requested: int,
    available: int,
    visible_cores_spec: str | None = None,
    *,
    compiled_model: str | None = None,
) -> None:
    """Raise `ConfigError` when `requested` cores (the tensor parallel degree) cannot run here.

    `compiled_model`: the exported model that fixes `requested`, else `requested` comes from
    `HF_NUM_CORES`. optimum-neuron 0.4.5 pads attention heads to any tensor parallel degree
    (`get_shardable_head_counts` in its GQA module), so the only limit it enforces is the number
    of available cores.
    """
    visible = (
        f"NEURON_RT_VISIBLE_CORES={visible_cores_spec}"
        if visible_cores_spec
        else "NEURON_RT_VISIBLE_CORES is not set: all cores of the instance's Neuron devices"
    )
    if available <= 0:
        raise ConfigError(
            f"No Neuron cores are available to this process ({visible}): run on an inf2, trn1 "
            "or trn2 instance with the Neuron devices passed to the container (docker run "
            "--device /dev/neuron0 ...), check NEURON_RT_VISIBLE_CORES, or set "
            "SERVING_BACKEND=torch"
        )
    if requested <= available:
        return
    where = f"{available} available to this process ({visible})"
    if compiled_model is not None:
        raise ConfigError(
            f"The exported model {compiled_model} was compiled for {requested} Neuron cores but "
            f"only {where}: run it on an instance with at least {requested} cores, widen "
            f"NEURON_RT_VISIBLE_CORES, or export the model again with HF_NUM_CORES between 1 and "
            f"{available}"
        )
    raise ConfigError(
        f"HF_NUM_CORES={requested} Neuron cores requested but only {where}: set HF_NUM_CORES "
        f"(--num-cores) between 1 and {available}, widen NEURON_RT_VISIBLE_CORES, or use a larger "
        "instance"
    )


# --- exported models ---------------------------------------------------------------------------


def _read_neuron_config(model: str | Path, revision: str | None, token: str | None) -> Any:
    """optimum-neuron's `NeuronConfig` of an exported model; `OSError` when there is none."""
    read = load_optimum(READ_NEURON_CONFIG)
    try:
        return read(str(model), token=token, revision=revision or "main")
    except ImportError as exc:
        raise missing_optimum(exc) from exc
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"{model} is an exported Neuron model that this image cannot load: {exc}. Export it "
            f"again with this image (optimum-neuron {OPTIMUM_NEURON_PIN}: python -m "
            "handler.model.neuron_export --help), or serve it with the image that exported it"
        ) from exc


def is_exported(
    model: str | Path, *, revision: str | None = None, token: str | None = None
) -> bool:
    """Whether `model` (a directory or hub id) is an exported Neuron model.

    Raises `ConfigError` when it is one, but from another optimum-neuron or compiler version.
    """
    try:
        _read_neuron_config(model, revision, token)
    except OSError:
        return False
    return True


def dtype_name(dtype: Any) -> str | None:
    """`bf16`, `fp16` or `fp32` for a torch dtype or any alias of `DTYPE_ALIASES`."""
    return DTYPE_ALIASES.get(str(dtype).strip().lower()) if dtype is not None else None


def shape_of(neuron_config: Any) -> CompiledShape:
    """The compiled shapes held by an optimum-neuron `NxDNeuronConfig`."""
    return CompiledShape(
        batch_size=int(neuron_config.batch_size),
        sequence_length=int(neuron_config.sequence_length),
        num_cores=int(neuron_config.tp_degree),
        auto_cast_type=dtype_name(neuron_config.torch_dtype),
        on_device_sampling=bool(getattr(neuron_config, "on_device_sampling", False)),
    )


def compiled_shape(
    model: str | Path, *, revision: str | None = None, token: str | None = None
) -> CompiledShape:
    """Batch size, sequence length, cores (tensor parallel degree) and dtype of an exported model.

    Raises `ConfigError` when `model` is not an exported Neuron model.
    """
    try:
        neuron_config = _read_neuron_config(model, revision, token)
    except OSError as exc:
        raise ConfigError(
            f"{model} is not an exported Neuron model (no readable neuron_config.json: {exc})"
        ) from exc
    return shape_of(neuron_config)


# --- the export cache --------------------------------------------------------------------------


def sdk_versions() -> dict[str, str]:
    """Installed optimum-neuron and neuronx-cc versions (`none` when missing): an export made
    with other versions cannot be loaded."""
    versions = {}
    for package in ("optimum-neuron", "neuronx-cc"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "none"
    return versions


def export_root(settings: Settings) -> Path:
    """Where exports are saved: `settings.export_cache` (`NEURON_EXPORT_CACHE`), else
    `neuron-exports` in the hub cache (`/data/neuron-exports` when the hub cache is the `/data`
    volume), else in `~/.cache/huggingface/hub`."""
    if settings.export_cache:
        return Path(settings.export_cache)
    hub_cache = (
        Path(settings.hub_cache)
        if settings.hub_cache
        else Path.home() / ".cache" / "huggingface" / "hub"
    )
    return hub_cache / EXPORTS_DIRNAME


def _local_fingerprint(path: Path) -> str:
    """Changes when the directory's files (names, sizes) or its config.json change."""
    digest = hashlib.sha256()
    for entry in sorted(path.iterdir()):
        if entry.is_file():
            digest.update(f"{entry.name}:{entry.stat().st_size}\n".encode())
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:12]


def sampling_mode(on_device_sampling: bool | None) -> str:
    """`device`, `host` or `auto` (what optimum-neuron picks for the architecture)."""
    if on_device_sampling is None:
        return "auto"
    return "device" if on_device_sampling else "host"


def export_key(model_id: str | Path, revision: str | None, settings: Settings, target: str) -> str:
    """Directory name of the export of `model_id` for the settings' shapes and the installed SDK.

    It holds the model (hub id and revision, or a local directory's name and fingerprint), batch
    size, sequence length, cores, dtype (`auto`: the model's own), the compilation target
    (`trn1` for inf2 and trn1, `trn2`), where tokens are sampled (`NEURON_ON_DEVICE_SAMPLING`)
    and the optimum-neuron and neuronx-cc versions. `settings.num_cores` must be resolved (not
    None). A hub revision is kept as given: a branch such as `main` keeps the commit of its
    first export.
    """
    if settings.num_cores is None:
        raise ValueError("export_key needs settings.num_cores resolved to a number of cores")
    path = Path(model_id)
    if path.is_dir():
        source = f"local--{path.resolve().name}--{_local_fingerprint(path)}"
    else:
        source = f"{str(model_id).replace('/', '--')}--{revision or 'main'}"
    versions = sdk_versions()
    key = (
        f"{source}--bs{settings.max_batch_size}-seq{settings.max_total_tokens}"
        f"-tp{settings.num_cores}-{settings.auto_cast_type or 'auto'}-{target}"
        f"-sampling-{sampling_mode(settings.on_device_sampling)}"
        f"--optimum-neuron-{versions['optimum-neuron']}-neuronx-cc-{versions['neuronx-cc']}"
    )
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def export_dir(settings: Settings, model_id: str | Path, revision: str | None, target: str) -> Path:
    """The directory the export of `model_id` for these settings is saved in and found again."""
    return export_root(settings) / export_key(model_id, revision, settings, target)


# --- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedModel:
    """An exported Neuron model ready for `load_neuron_model`."""

    model: str
    """Local directory of the exported model, or hub id of an exported model repo."""
    revision: str | None
    """Hub revision of `model` when it is a hub id."""
    shape: CompiledShape
    """Its compiled shapes: pass them to `read_settings(..., compiled=shape)`."""
    origin: Literal["exported", "reused", "compiled"]
    """Exported before (given as is), reused from the export cache, or exported at this start."""


def prepare_neuron_model(
    settings: Settings,
    model_id_or_path: str | Path,
    revision: str | None = None,
    *,
    cores_available: int,
    environ: Mapping[str, str],
    visible_cores_spec: str | None = None,
) -> PreparedModel:
    """Find or make the exported Neuron model to serve (see the module docstring).

    `cores_available`: from `available_cores`. `environ`: the process environment, which the
    export process gets with the token, hub cache and cache repo of `settings` added.
    `visible_cores_spec`: the value of `NEURON_RT_VISIBLE_CORES`, named in messages.
    Raises `ConfigError` with the fix when the model cannot be served as configured.
    """
    model = str(model_id_or_path)
    token = settings.hf_token
    if is_exported(model, revision=revision, token=token):
        shape = compiled_shape(model, revision=revision, token=token)
        check_cores(shape.num_cores or 1, cores_available, visible_cores_spec, compiled_model=model)
        logger.info(
            "%s is an exported Neuron model (batch size %d, sequence length %d, %s cores, "
            "dtype %s): serving it as is",
            model,
            shape.batch_size,
            shape.sequence_length,
            shape.num_cores,
            shape.auto_cast_type,
        )
        return PreparedModel(model, revision, shape, "exported")
    _refuse_legacy_export(model)

    num_cores = settings.num_cores or cores_available
    check_cores(num_cores, cores_available, visible_cores_spec)
    settings = dataclasses.replace(settings, num_cores=num_cores)
    target = export_dir(settings, model, revision, load_optimum(DEFAULT_TARGET)())
    if target.exists():
        if is_exported(target):
            logger.info("reusing exported model at %s", target)
            return PreparedModel(str(target), None, compiled_shape(target), "reused")
        logger.warning("Removing the incomplete export at %s", target)
        shutil.rmtree(target)

    config = text_config(
        model,
        revision=revision,
        token=token,
        auto_cast_type=settings.auto_cast_type,
        cache_dir=settings.hub_cache,
        trust_remote_code=settings.trust_remote_code,
    )
    get_neuron_config = load_optimum(GET_NEURON_CONFIG)
    try:
        neuron_config = get_neuron_config(
            model,
            config=config,
            token=token,
            revision=revision,
            instance_type=None,
            batch_size=settings.max_batch_size,
            sequence_length=settings.max_total_tokens,
            tensor_parallel_size=num_cores,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(
            f"optimum-neuron cannot export {model} for Neuron: {exc}. Check that its architecture "
            "is one optimum-neuron supports for text generation, that HF_MODEL_REVISION exists, "
            "and that HF_TOKEN is set for a gated model"
        ) from exc
    dtype = settings.auto_cast_type or dtype_name(neuron_config.torch_dtype) or "auto"
    wanted = _describe(model, revision, settings, dtype)
    entries, lookup_error = _cached_entries(model, settings, neuron_config.target, dtype)
    if entries:
        logger.info(
            "%s has no Neuron export yet; the hub cache %s has compiled artifacts for %s: "
            "exporting with them",
            model,
            settings.custom_cache_repo,
            wanted,
        )
    elif not settings.compile_on_start:
        raise ConfigError(_uncached_message(model, revision, settings, dtype, wanted, lookup_error))
    else:
        logger.warning(
            "No precompiled Neuron artifacts for %s in the hub cache %s%s: compiling at start-up "
            "because NEURON_COMPILE_ON_START is set. This can take up to an hour; the export is "
            "saved at %s and reused on the next start",
            wanted,
            settings.custom_cache_repo,
            f" (lookup failed: {lookup_error})" if lookup_error else "",
            target,
        )
    _export(model, revision, settings, dtype, target, environ)
    return PreparedModel(str(target), None, compiled_shape(target), "compiled")


def text_config(
    model: str | Path,
    *,
    revision: str | None,
    token: str | None,
    auto_cast_type: str | None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The text config of standard model `model`, with `auto_cast_type` (`HF_AUTO_CAST_TYPE`)
    applied, for `get_neuron_config(config=...)`.

    optimum-neuron takes the export's dtype from `config.dtype` (`DTYPE_MAPPER.pt(config.dtype)`
    in `get_neuron_config`) and raises on None, before any dtype we set later applies. Raises
    `ConfigError` when the config cannot be read, or names no dtype and none is configured.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(model),
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
        ).get_text_config()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Cannot read the configuration of {model} to export it for Neuron: {exc}. Check "
            "HF_MODEL_ID, HF_MODEL_REVISION and, for a gated model, HF_TOKEN"
        ) from exc
    if auto_cast_type is not None:
        import torch

        config.dtype = getattr(torch, TORCH_DTYPES[auto_cast_type])
    elif config.dtype is None:
        raise ConfigError(
            f"The config.json of {model} names no dtype (`torch_dtype`), which optimum-neuron "
            f"{OPTIMUM_NEURON_PIN} needs to export it: set HF_AUTO_CAST_TYPE (--auto-cast-type) "
            "to bf16, fp16 or fp32"
        )
    return config


def _refuse_legacy_export(model: str) -> None:
    """Models exported by optimum-neuron before 0.1 (transformers-neuronx) have a `neuron`
    section in config.json and no neuron_config.json; 0.4 cannot load nor re-export them."""
    config = Path(model) / "config.json"
    try:
        legacy = "neuron" in json.loads(config.read_text())
    except (OSError, ValueError):
        return
    if legacy:
        raise ConfigError(
            f"{model} was exported by an optimum-neuron release before 0.1 (its config.json has "
            f"a `neuron` section), which optimum-neuron {OPTIMUM_NEURON_PIN} cannot load. Serve "
            "the original model (HF_MODEL_ID=<hub id>) so that it is exported at start-up, or "
            "export it again: python -m handler.model.neuron_export --help"
        )


def _describe(model: str, revision: str | None, settings: Settings, dtype: str) -> str:
    where = "local directory" if Path(model).is_dir() else f"revision {revision or 'main'}"
    sampling = (
        ""
        if settings.on_device_sampling is None
        else f", {sampling_mode(settings.on_device_sampling)} sampling"
    )
    return (
        f"{model} ({where}) with batch size {settings.max_batch_size}, sequence length "
        f"{settings.max_total_tokens}, {settings.num_cores} cores, dtype {dtype}{sampling}"
    )


def _cached_entries(
    model: str, settings: Settings, instance_type: str | None, dtype: str
) -> tuple[list[Any], str | None]:
    """Hub cache entries compiled for exactly these shapes, and why the lookup failed if it did.

    `select_hub_cached_entries` cannot filter on where tokens are sampled: entries whose
    `on_device_sampling` contradicts `NEURON_ON_DEVICE_SAMPLING` are dropped here, since their
    compiled graphs would not serve the export.
    """
    select = load_optimum(SELECT_CACHED)
    try:
        entries = select(
            model,
            task=TASK,
            cache_repo_id=settings.custom_cache_repo,
            instance_type=instance_type,
            batch_size=settings.max_batch_size,
            sequence_length=settings.max_total_tokens,
            tensor_parallel_size=settings.num_cores,
            torch_dtype=None if dtype == "auto" else dtype,
        )
    except Exception as exc:
        # The lookup is advisory (network, a cache repo without this compiler's registry): a
        # failure counts as a miss, and the miss's message says why.
        logger.warning("Looking up %s in the hub cache failed: %s", model, exc)
        return [], f"{type(exc).__name__}: {exc}"
    wanted = settings.on_device_sampling
    return [
        entry
        for entry in entries
        if wanted is None
        or not isinstance(entry, Mapping)
        or entry.get("on_device_sampling", wanted) == wanted
    ], None


def _export_command(
    model: str, revision: str | None, settings: Settings, dtype: str, output: Path
) -> list[str]:
    """The export process's command line (never the token: it goes in the environment)."""
    command = [sys.executable, "-m", "handler.model.neuron_export", "--model-id", model]
    if revision and not Path(model).is_dir():
        command += ["--revision", revision]
    command += [
        "--batch-size",
        str(settings.max_batch_size),
        "--sequence-length",
        str(settings.max_total_tokens),
        "--num-cores",
        str(settings.num_cores),
    ]
    if dtype != "auto":
        command += ["--auto-cast-type", dtype]
    if settings.on_device_sampling is not None:
        command += ["--on-device-sampling", str(settings.on_device_sampling).lower()]
    return [*command, "--output", str(output)]


def _shown_command(model: str, revision: str | None, settings: Settings, dtype: str) -> str:
    """The export command for a user to run, writing to `DIR`."""
    command = _export_command(model, revision, settings, dtype, Path("DIR"))
    return " ".join(["python", *command[1:]])


def _export_environ(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    env["CUSTOM_CACHE_REPO"] = settings.custom_cache_repo
    if settings.hf_token:
        env["HF_TOKEN"] = settings.hf_token
    if settings.hub_cache:
        env["HF_HUB_CACHE"] = settings.hub_cache
    paths = [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _run(command: Sequence[str], env: Mapping[str, str]) -> tuple[int, list[str]]:
    """Run `command`, logging its output line by line; its exit code and last lines."""
    tail: deque[str] = deque(maxlen=EXPORT_LOG_TAIL)
    with subprocess.Popen(
        list(command),
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            export_log.info("%s", line)
        returncode = process.wait()
    return returncode, list(tail)


def _export(
    model: str,
    revision: str | None,
    settings: Settings,
    dtype: str,
    target: Path,
    environ: Mapping[str, str],
) -> None:
    """Export in a separate process into a temporary directory renamed to `target` on success.

    A separate process because the Neuron runtime does not reliably release cores in-process.
    """
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{target.name[:100]}-", dir=root))
    except OSError as exc:
        raise ConfigError(
            f"Cannot write Neuron exports to {root} ({exc}): set NEURON_EXPORT_CACHE "
            "(--export-cache) to a writable directory, such as one on the mounted /data volume"
        ) from exc
    command = _export_command(model, revision, settings, dtype, partial)
    logger.info("Exporting in a separate process: %s", " ".join(command))
    try:
        returncode, tail = _run(command, _export_environ(settings, environ))
        if returncode != 0:
            lines = "\n".join(f"    {line}" for line in tail) or "    (no output)"
            raise ConfigError(
                f"Exporting {_describe(model, revision, settings, dtype)} failed (exit code "
                f"{returncode}). Last lines of its log:\n{lines}\nFix the cause above, or export "
                "ahead of time with the same command on a Neuron machine and serve DIR "
                f"(HF_MODEL_ID=DIR): {_shown_command(model, revision, settings, dtype)}"
            )
        if not is_exported(partial):
            raise ConfigError(
                f"The export of {model} ended without writing neuron_config.json to {partial}"
            )
        try:
            partial.rename(target)
        except OSError:
            if not (target.exists() and is_exported(target)):
                raise
            logger.info("Another process saved the same export at %s first: using it", target)
        else:
            logger.info("Saved the exported model at %s", target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _uncached_message(
    model: str,
    revision: str | None,
    settings: Settings,
    dtype: str,
    wanted: str,
    lookup_error: str | None,
) -> str:
    lookup = f" (the lookup failed: {lookup_error})" if lookup_error else ""
    return (
        f"No precompiled Neuron artifacts for {wanted} in the hub cache "
        f"{settings.custom_cache_repo} (CUSTOM_CACHE_REPO){lookup}. Compiling it at start-up can "
        "take up to an hour, longer than the start-up health check allows. Either:\n"
        f"  - serve a configuration the cache has (`optimum-cli neuron cache lookup {model}` lists "
        "them): set MAX_BATCH_SIZE, MAX_TOTAL_TOKENS, HF_NUM_CORES, HF_AUTO_CAST_TYPE and "
        "NEURON_ON_DEVICE_SAMPLING to it;\n"
        f"  - export ahead of time on a Neuron machine "
        f"({_shown_command(model, revision, settings, dtype)}) and serve DIR "
        "(HF_MODEL_ID=DIR);\n"
        "  - or allow the compile: set NEURON_COMPILE_ON_START=true (--compile-on-start) and raise "
        "SageMaker's container_startup_health_check_timeout (to 3600 s for large models). The "
        f"export is saved under {export_root(settings)} (NEURON_EXPORT_CACHE) and reused by the "
        "next start."
    )


# --- loading -----------------------------------------------------------------------------------


def load_neuron_model(
    model: str | Path, *, revision: str | None = None, token: str | None = None
) -> Any:
    """Load an exported model onto the Neuron cores of this (serving) process.

    optimum-neuron fetches the weights of an export saved without them from the hub
    (`checkpoint_id` of its neuron config), with `token`.
    """
    from_pretrained = load_optimum(FROM_PRETRAINED)
    try:
        return from_pretrained(str(model), revision=revision, token=token)
    except ImportError as exc:
        raise missing_optimum(exc) from exc
    except ValueError as exc:
        raise ConfigError(f"The exported Neuron model {model} cannot run here: {exc}") from exc
