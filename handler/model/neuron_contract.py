"""The optimum-neuron boundary: every optimum-neuron name the server uses, declared once, and
the reads of an exported model's `neuron_config.json` through it.

optimum-neuron (pinned in `requirements-neuron.txt`) exists in the Neuron image alone: it is
imported inside the functions only (`load_optimum`), so importing this module stays cheap and a
machine without it gets a `ConfigError` saying what to do. Every name used here, in
`neuron_cores`, `neuron_loader` and `neuron_export` is a `ContractEntry` of `CONTRACT`, which
`tests/test_optimum_neuron_contract.py` checks against the pinned wheel's source.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.config import DTYPE_ALIASES, CompiledShape
from handler.errors import ConfigError

OPTIMUM_NEURON_PIN = "0.4.5"
"""The optimum-neuron version `requirements-neuron.txt` pins (named in messages)."""


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
"""Everything the server uses of optimum-neuron."""


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


def auto_cast_type_of(dtype: Any) -> str | None:
    """The `HF_AUTO_CAST_TYPE` value (`bf16`, `fp16` or `fp32`) of a torch dtype or of any alias
    in `DTYPE_ALIASES`; None for None or an unknown dtype."""
    return DTYPE_ALIASES.get(str(dtype).strip().lower()) if dtype is not None else None


def shape_of(neuron_config: Any) -> CompiledShape:
    """The compiled shapes held by an optimum-neuron `NxDNeuronConfig`."""
    return CompiledShape(
        batch_size=int(neuron_config.batch_size),
        sequence_length=int(neuron_config.sequence_length),
        num_cores=int(neuron_config.tp_degree),
        auto_cast_type=auto_cast_type_of(neuron_config.torch_dtype),
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
