"""Prepare and load a Neuron model with optimum-neuron (pinned in `requirements-neuron.txt`).

`prepare_neuron_model` decides, before anything is loaded on the device:

1. the model is already exported (it has a `neuron_config.json`): it is served as is, and its
   compiled shapes (`PreparedModel.shape`) go into `Settings.with_compiled(shape)` so that
   contradicting settings stop start-up;
2. an export for the same key (`neuron_cache.export_key`) was saved under the export cache by an
   earlier start: it is reused;
3. otherwise the model is exported in a separate process (`python -m
   handler.model.neuron_export`), with the compiled artifacts of the hub cache
   (`CUSTOM_CACHE_REPO`) when it has this configuration. Without them the compile can take up
   to an hour, so it only happens when `compile_on_start` allows it.

What optimum-neuron offers is reached through `neuron_contract`, the cores through
`neuron_cores`, the export cache and the export process through `neuron_cache`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from handler.config import CompiledShape, Settings
from handler.errors import ConfigError
from handler.model.neuron_cache import (
    describe_export,
    export_dir,
    export_root,
    save_export,
    shown_command,
)
from handler.model.neuron_contract import (
    DEFAULT_TARGET,
    FROM_PRETRAINED,
    GET_NEURON_CONFIG,
    OPTIMUM_NEURON_PIN,
    SELECT_CACHED,
    auto_cast_type_of,
    compiled_shape,
    is_exported,
    load_optimum,
    missing_optimum,
)
from handler.model.neuron_cores import check_available_cores

__all__ = [
    "PreparedModel",
    "load_neuron_model",
    "prepare_neuron_model",
    "text_config",
]

logger = logging.getLogger(__name__)

TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""`HF_AUTO_CAST_TYPE` values -> names of `torch` dtypes (`getattr(torch, name)`)."""
TASK = "text-generation"


# --- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedModel:
    """An exported Neuron model ready for `load_neuron_model`."""

    model: str
    """Local directory of the exported model, or hub id of an exported model repo."""
    revision: str | None
    """Hub revision of `model` when it is a hub id."""
    shape: CompiledShape
    """Its compiled shapes: pass them to `Settings.with_compiled`."""
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
        check_available_cores(
            shape.num_cores or 1, cores_available, visible_cores_spec, compiled_model=model
        )
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
    check_available_cores(num_cores, cores_available, visible_cores_spec)
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
    dtype = settings.auto_cast_type or auto_cast_type_of(neuron_config.torch_dtype) or "auto"
    wanted = describe_export(model, revision, settings, dtype)
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
    save_export(model, revision, settings, dtype, target, environ)
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

        config.dtype = getattr(torch, TORCH_DTYPE_NAMES[auto_cast_type])
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
        f"({shown_command(model, revision, settings, dtype)}) and serve DIR "
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
