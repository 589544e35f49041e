"""Neuron instances, and the serving settings a deployment passes to the container.

`INSTANCES` is the table every deploy script checks a deployment against: how many Neuron cores
(the most `HF_NUM_CORES` can be) and how much accelerator memory each SageMaker instance type
has, and whether SageMaker gives it an EBS volume. `ServingConfig` holds the environment
variables the hub's "Deploy > SageMaker" snippet sets (`HF_MODEL_ID`, `HF_NUM_CORES`,
`HF_AUTO_CAST_TYPE`, `MAX_BATCH_SIZE`, `MAX_INPUT_TOKENS`, `MAX_TOTAL_TOKENS`, `HF_TOKEN`) and
checks them with the server's own `read_settings` before anything is created, so a mistake the
container would refuse at start-up is reported in seconds rather than after a deployment.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from handler.config import DTYPE_ALIASES, positive_int_argument, read_settings
from handler.errors import ConfigError

SAGEMAKER_PREFIX = "ml."


class DeployError(Exception):
    """A deployment cannot go ahead as asked; the message says what to change."""


@dataclass(frozen=True)
class NeuronInstance:
    """One instance type the container serves on."""

    name: str
    """SageMaker name, with the `ml.` prefix (`ml.inf2.xlarge`)."""
    neuron_cores: int
    """Neuron cores of its devices (2 per Inferentia2 / Trainium1 chip): the most `HF_NUM_CORES`
    can be."""
    accelerator_memory_gb: int
    """Accelerator memory, 16 GB per core: the weights of the largest model it can serve."""
    ebs_volume: bool = True
    """SageMaker attaches an EBS volume whose size `VolumeSizeInGB` sets. False for trn1, which
    comes with local NVMe storage: SageMaker mounts that instead and refuses `VolumeSizeInGB`."""

    @property
    def family(self) -> str:
        """`inf2` or `trn1`: what `python -m handler.model.neuron_export --instance-type` takes."""
        return self.name.split(".")[1]

    @property
    def volume_size_gb(self) -> int | None:
        """Default `VolumeSizeInGB`: twice the accelerator memory, within 64-512 GB (SageMaker
        allows 1-512); None where SageMaker sizes the storage itself (trn1).

        The volume holds the model cache: the weights (at most the accelerator memory) fetched from
        the hub, and a second copy of that size for the S3 model data SageMaker downloads and
        extracts or the weights a local export saves, plus the compiled graphs (a few GB).
        """
        if not self.ebs_volume:
            return None
        return min(512, max(64, 2 * self.accelerator_memory_gb))

    @property
    def startup_timeout_s(self) -> int:
        """Default `ContainerStartupHealthCheckTimeoutInSeconds` when the model does not compile
        at start-up: downloading the weights, fetching precompiled graphs from the hub cache and
        loading them take minutes; 15 for the 2-core instances, 30 for the larger ones, which
        serve models up to ten times larger."""
        return 900 if self.neuron_cores <= 2 else 1800


INSTANCES: dict[str, NeuronInstance] = {
    instance.name: instance
    for instance in (
        NeuronInstance("ml.inf2.xlarge", 2, 32),
        NeuronInstance("ml.inf2.8xlarge", 2, 32),
        NeuronInstance("ml.inf2.24xlarge", 12, 192),
        NeuronInstance("ml.inf2.48xlarge", 24, 384),
        NeuronInstance("ml.trn1.2xlarge", 2, 32, ebs_volume=False),
        NeuronInstance("ml.trn1.32xlarge", 32, 512, ebs_volume=False),
    )
}


def _listed(instances: list[NeuronInstance]) -> str:
    return ", ".join(f"{i.name} ({i.neuron_cores} cores)" for i in instances)


def get_instance(name: str) -> NeuronInstance:
    """The instance called `name`, with or without the `ml.` prefix; `DeployError` if unknown."""
    key = name.strip().lower()
    if not key.startswith(SAGEMAKER_PREFIX):
        key = SAGEMAKER_PREFIX + key
    if key not in INSTANCES:
        raise DeployError(
            f"Unknown instance type {name!r}: this container serves on AWS Neuron instances, one "
            f"of {_listed(list(INSTANCES.values()))}"
        )
    return INSTANCES[key]


def instances_with(cores: int) -> list[NeuronInstance]:
    """Instance types with at least `cores` Neuron cores, fewest cores first."""
    fitting = [i for i in INSTANCES.values() if i.neuron_cores >= cores]
    return sorted(fitting, key=lambda i: (i.neuron_cores, i.name))


def check_cores(num_cores: int, instance: NeuronInstance) -> None:
    """Refuse `HF_NUM_CORES=num_cores` on an instance with fewer Neuron cores.

    The container would refuse it at start-up too, but only once the endpoint is provisioned.
    """
    if num_cores < 1:
        raise DeployError(f"HF_NUM_CORES={num_cores} is invalid: it must be at least 1")
    if num_cores <= instance.neuron_cores:
        return
    fitting = instances_with(num_cores)
    larger = (
        f"use an instance type with at least {num_cores} cores: {_listed(fitting)}"
        if fitting
        else f"no instance type here has {num_cores} cores (the largest has "
        f"{max(i.neuron_cores for i in INSTANCES.values())})"
    )
    raise DeployError(
        f"HF_NUM_CORES={num_cores} but {instance.name} has {instance.neuron_cores} Neuron cores: "
        f"set HF_NUM_CORES (--num-cores) between 1 and {instance.neuron_cores}, or {larger}"
    )


# --- what the container is told ----------------------------------------------------------------


@dataclass(frozen=True)
class ServingConfig:
    """The container's environment for one deployment, as the hub's deploy snippets set it.

    Unset fields are left out of the environment, so the server's own defaults apply (for an
    exported model: the shapes it was compiled with).
    """

    model_id: str | None
    """`HF_MODEL_ID`: a hub id, or a directory in the container (`/opt/ml/model`); None: the
    server looks in `/opt/ml/model`, then `/repository`."""
    num_cores: int | None = None
    """`HF_NUM_CORES`: Neuron cores = tensor parallel degree."""
    auto_cast_type: str | None = None
    """`HF_AUTO_CAST_TYPE`: `bf16`, `fp16` or `fp32` (aliases such as `bfloat16` are normalised)."""
    max_batch_size: int | None = None
    """`MAX_BATCH_SIZE`: static batch size (KV cache slots) the model is compiled for."""
    max_input_tokens: int | None = None
    """`MAX_INPUT_TOKENS`: longest prompt."""
    max_total_tokens: int | None = None
    """`MAX_TOTAL_TOKENS`: compiled sequence length (prompt + generated)."""
    revision: str | None = None
    """`HF_MODEL_REVISION`."""
    compile_on_start: bool = False
    """`NEURON_COMPILE_ON_START=true`: allow an hour-long compile when the hub cache has no
    precompiled graphs for these shapes."""
    hf_token: str | None = field(default=None, repr=False)
    """`HF_TOKEN` for gated models. Never printed."""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    """Any other variables (`MESSAGES_API_ENABLED`, `MAX_CONCURRENT_REQUESTS`...)."""

    def environment(self, *, include_token: bool = True) -> dict[str, str]:
        """The environment variables, in the order the hub snippet lists them."""
        auto_cast = self.auto_cast_type
        if auto_cast is not None:
            auto_cast = DTYPE_ALIASES.get(auto_cast.strip().lower(), auto_cast)
        env = {
            "HF_MODEL_ID": self.model_id,
            "HF_MODEL_REVISION": self.revision,
            "HF_NUM_CORES": self.num_cores,
            "HF_AUTO_CAST_TYPE": auto_cast,
            "MAX_BATCH_SIZE": self.max_batch_size,
            "MAX_INPUT_TOKENS": self.max_input_tokens,
            "MAX_TOTAL_TOKENS": self.max_total_tokens,
            "NEURON_COMPILE_ON_START": "true" if self.compile_on_start else None,
        }
        out = {name: str(value) for name, value in env.items() if value is not None}
        out.update(self.extra_env)
        if include_token and self.hf_token:
            out["HF_TOKEN"] = self.hf_token
        return out

    def check(self, instance: NeuronInstance | None = None) -> None:
        """Refuse what the server would refuse at start-up, and cores `instance` lacks."""
        if self.auto_cast_type and self.auto_cast_type.strip().lower() not in DTYPE_ALIASES:
            raise DeployError(
                f"HF_AUTO_CAST_TYPE={self.auto_cast_type!r} is invalid: use bf16, fp16 or fp32"
            )
        if instance is not None and self.num_cores is not None:
            check_cores(self.num_cores, instance)
        reserved = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & set(self.extra_env)
        if reserved:
            raise DeployError(
                f"Pass {', '.join(sorted(reserved))} as the token (--with-hf-token), not as an "
                "extra variable: it must never be printed"
            )
        try:
            read_settings([], self.environment(include_token=False))
        except ConfigError as exc:
            raise DeployError(f"The container would refuse this configuration. {exc}") from None


def redacted(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the token replaced, for printing."""
    secret = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY"}
    return {name: "<redacted>" if name in secret else value for name, value in env.items()}


# --- command lines -----------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=VALUE")
    return name, value


def add_serving_arguments(
    parser: argparse.ArgumentParser, *, model: Literal["required", "optional", "none"]
) -> None:
    """The flags that become the container's environment, named like the server's flags."""
    group = parser.add_argument_group("serving settings (the container's environment)")
    if model != "none":
        group.add_argument(
            "--model-id",
            required=model == "required",
            help="HF_MODEL_ID: hub id (or local directory) of the model",
        )
    group.add_argument("--revision", help="HF_MODEL_REVISION: hub revision")
    group.add_argument(
        "--num-cores",
        type=positive_int_argument,
        help="HF_NUM_CORES: Neuron cores = tensor parallel degree (default: all the instance's)",
    )
    group.add_argument(
        "--auto-cast-type", help="HF_AUTO_CAST_TYPE: bf16, fp16 or fp32 (default: the model's)"
    )
    group.add_argument(
        "--max-batch-size", type=positive_int_argument, help="MAX_BATCH_SIZE (server: 4)"
    )
    group.add_argument(
        "--max-input-tokens",
        type=positive_int_argument,
        help="MAX_INPUT_TOKENS (server: half the total)",
    )
    group.add_argument(
        "--max-total-tokens", type=positive_int_argument, help="MAX_TOTAL_TOKENS (server: 4096)"
    )
    group.add_argument(
        "--env",
        type=_key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another container variable (repeatable), e.g. MESSAGES_API_ENABLED=true",
    )
    group.add_argument(
        "--with-hf-token",
        action="store_true",
        help="pass $HF_TOKEN of this shell to the container (gated models); never printed",
    )


def serving_config(
    args: argparse.Namespace,
    *,
    model_id: str | None,
    hf_token: str | None,
    num_cores: int | None = None,
    compile_on_start: bool = False,
) -> ServingConfig:
    """The `ServingConfig` of parsed `add_serving_arguments` flags."""
    if args.with_hf_token and not hf_token:
        raise DeployError("--with-hf-token is set but HF_TOKEN is not: export HF_TOKEN=hf_...")
    return ServingConfig(
        model_id=model_id,
        revision=args.revision,
        num_cores=args.num_cores if args.num_cores is not None else num_cores,
        auto_cast_type=args.auto_cast_type,
        max_batch_size=args.max_batch_size,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        compile_on_start=compile_on_start,
        hf_token=hf_token if args.with_hf_token else None,
        extra_env=dict(args.env),
    )
