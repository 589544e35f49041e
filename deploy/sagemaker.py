"""Deploy the container to a SageMaker real-time endpoint with boto3, and delete it again.

`plan_endpoint` checks everything it can offline (instance type, `HF_NUM_CORES` against the
instance's Neuron cores, the settings the server would refuse) and returns the exact
`create_model` / `create_endpoint_config` / `create_endpoint` requests; `deploy` sends them,
waits for `InService` printing a status line per poll, and can add target-tracking autoscaling;
`delete` removes the scaling target, endpoint, endpoint config and model. Clients are
parameters, so tests pass stubbed ones::

    python -m deploy.sagemaker deploy --endpoint-name llama-inf2 \\
        --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/hf-neuron-serving:latest \\
        --role arn:aws:iam::123456789012:role/SageMakerExecutionRole \\
        --instance-type ml.inf2.xlarge --model-id meta-llama/Llama-3.2-1B-Instruct \\
        --num-cores 2 --auto-cast-type bf16 --max-batch-size 4 \\
        --max-input-tokens 3686 --max-total-tokens 4096 --with-hf-token
    python -m deploy.sagemaker delete --endpoint-name llama-inf2

The model, endpoint config and endpoint all take the endpoint's name. `HF_TOKEN` (only with
`--with-hf-token`) ends up in the model's container environment, which `DescribeModel` shows to
anyone allowed to call it: use a token scoped to reading the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

from deploy.instances import (
    DeployError,
    NeuronInstance,
    ServingConfig,
    add_serving_arguments,
    get_instance,
    redacted,
    serving_config,
)

VARIANT = "AllTraffic"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
"""Where SageMaker extracts `ModelDataUrl`; the server serves it when `HF_MODEL_ID` names it."""
COMPILE_STARTUP_TIMEOUT_S = 3600
"""Health-check window when the model may compile at start-up: SageMaker's maximum."""
MODEL_DATA_DOWNLOAD_TIMEOUT_S = 3600
"""Download and extraction window for `ModelDataUrl` (SageMaker allows 60-3600 s)."""
SAGEMAKER_CACHE_ENV = {
    "HF_HOME": "/tmp/huggingface",
    "HUGGINGFACE_HUB_CACHE": "/tmp/huggingface/hub",
    "NEURON_COMPILE_CACHE_URL": "/tmp/neuron-compile-cache",
}
"""Caches on the ML storage volume: SageMaker mounts it at /opt/ml and /tmp of the container,
not at the image's /data, so `VolumeSizeInGB` sizes the model cache only with these (the Neuron
exports go under the hub cache). `--env` overrides them."""
PROVISIONING_ALLOWANCE_S = 1800
"""What `deploy` waits beyond the health-check window: instance start and image pull."""
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_FAILED = ("Failed", "UpdateRollbackFailed")

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_METRICS = {
    "concurrency": "SageMakerVariantConcurrentRequestsPerModelHighResolution",
    "invocations": "SageMakerVariantInvocationsPerInstance",
}
"""`--autoscale-metric` -> Application Auto Scaling's `PredefinedMetricType`. Concurrency counts
a streamed request until its last token, so it tracks busy KV cache slots; invocations per
instance count requests per minute, whatever their length."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class EndpointPlan:
    """The three requests that create an endpoint, checked and ready to send."""

    endpoint_name: str
    instance: NeuronInstance
    create_model: dict[str, Any]
    create_endpoint_config: dict[str, Any]
    create_endpoint: dict[str, Any]

    @property
    def startup_timeout_s(self) -> int:
        variant = self.create_endpoint_config["ProductionVariants"][0]
        return int(variant["ContainerStartupHealthCheckTimeoutInSeconds"])

    @property
    def environment(self) -> dict[str, str]:
        return self.create_model["PrimaryContainer"]["Environment"]

    def printable(self) -> dict[str, Any]:
        """The requests with the token redacted (`--dry-run`)."""
        model = json.loads(json.dumps(self.create_model))
        model["PrimaryContainer"]["Environment"] = redacted(self.environment)
        return {
            "create_model": model,
            "create_endpoint_config": self.create_endpoint_config,
            "create_endpoint": self.create_endpoint,
        }


@dataclass(frozen=True)
class AutoScaling:
    """Target tracking on the endpoint's instance count (Application Auto Scaling)."""

    min_capacity: int
    max_capacity: int
    target_value: float
    """Concurrent requests per model (`concurrency`) or invocations per instance per minute
    (`invocations`) to keep each instance at."""
    metric: str = "concurrency"
    scale_out_cooldown_s: int = 300
    """Seconds after a scale-out before the next one."""
    scale_in_cooldown_s: int = 900
    """Seconds after a scale-in before the next one: long, because a Neuron instance takes
    10-20 minutes to come back (provisioning, weights download, loading onto the cores)."""

    def check(self, instance_count: int) -> None:
        if self.metric not in SCALING_METRICS:
            raise DeployError(
                f"Unknown autoscaling metric {self.metric!r}: use {' or '.join(SCALING_METRICS)}"
            )
        if not 1 <= self.min_capacity <= self.max_capacity:
            raise DeployError(
                f"Autoscaling needs 1 <= min ({self.min_capacity}) <= max ({self.max_capacity}): "
                "an endpoint variant cannot scale to zero instances"
            )
        if not self.min_capacity <= instance_count <= self.max_capacity:
            raise DeployError(
                f"--instance-count {instance_count} is outside the autoscaling range "
                f"{self.min_capacity}-{self.max_capacity}: set it within the range"
            )
        if self.target_value <= 0:
            raise DeployError(f"The autoscaling target must be positive, not {self.target_value}")


class EndpointFailedError(DeployError):
    """The endpoint ended in a failed state; the message has SageMaker's reason and a fix."""

    def __init__(self, endpoint_name: str, status: str, reason: str | None) -> None:
        self.endpoint_name = endpoint_name
        self.status = status
        self.reason = reason
        hint = ""
        if reason and "health check" in reason.lower():
            hint = (
                " The container did not answer GET /ping in time: if it was compiling the model "
                "(NEURON_COMPILE_ON_START), export it ahead of time (python -m deploy.export "
                "--help) and deploy the export with --model-data-url; otherwise raise "
                f"--startup-timeout (at most {COMPILE_STARTUP_TIMEOUT_S})."
            )
        super().__init__(
            f"Endpoint {endpoint_name} is {status}: {reason or 'SageMaker gave no reason'}."
            f"{hint} The container's log is in CloudWatch, log group "
            f"/aws/sagemaker/Endpoints/{endpoint_name}. The endpoint still exists: remove it with "
            f"python -m deploy.sagemaker delete --endpoint-name {endpoint_name}"
        )


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise DeployError(
            f"Endpoint name {name!r} is invalid: SageMaker takes 1-63 letters, digits and "
            "hyphens, starting and ending with a letter or digit"
        )


def plan_endpoint(
    endpoint_name: str,
    *,
    image_uri: str,
    role_arn: str,
    instance_type: str,
    serving: ServingConfig,
    model_data_url: str | None = None,
    instance_count: int = 1,
    startup_timeout_s: int | None = None,
    volume_size_gb: int | None = None,
) -> EndpointPlan:
    """Check a deployment offline and build its requests; `DeployError` says what to change.

    `model_data_url`: an S3 `model.tar.gz` (from `python -m deploy.export`) that SageMaker
    extracts into `/opt/ml/model`; `HF_MODEL_ID` then names that directory.

    Timeouts and volume, unless given:

    - `ContainerStartupHealthCheckTimeoutInSeconds`: 3600 s (SageMaker's maximum) when
      `serving.compile_on_start` is set, since compiling a model the hub cache lacks takes up to
      an hour and /ping answers 503 until the model is loaded; otherwise 900 s on the 2-core
      instances and 1800 s on the larger ones, enough to download the weights, fetch the
      precompiled graphs and load them, and short enough that a broken deployment fails fast.
    - `VolumeSizeInGB`: twice the instance's accelerator memory, within 64-512 GB (64 on
      inf2.xlarge / 8xlarge, 384 on inf2.24xlarge, 512 on inf2.48xlarge). The volume holds the
      model cache (`SAGEMAKER_CACHE_ENV` puts it there): weights from the hub (at most the
      accelerator memory), a second copy for the model data archive or an export, and the
      compiled graphs. trn1 instances get none: SageMaker mounts their NVMe instance storage
      and refuses `VolumeSizeInGB` there.
    - `ModelDataDownloadTimeoutInSeconds`: 3600 s, only with `model_data_url`.
    """
    _check_name(endpoint_name)
    instance = get_instance(instance_type)
    if instance_count < 1:
        raise DeployError(f"--instance-count must be at least 1, not {instance_count}")
    if model_data_url is not None:
        if not model_data_url.startswith("s3://"):
            raise DeployError(
                f"--model-data-url {model_data_url!r} must be an s3:// URL of a model.tar.gz "
                "(python -m deploy.export --s3-uri ... prints it)"
            )
        if serving.model_id not in (None, SAGEMAKER_MODEL_DIR):
            raise DeployError(
                f"Both --model-data-url and --model-id {serving.model_id} name the model: the "
                f"server would serve HF_MODEL_ID and ignore {SAGEMAKER_MODEL_DIR}. Drop --model-id"
            )
        serving = dataclasses.replace(serving, model_id=SAGEMAKER_MODEL_DIR)
    elif not serving.model_id:
        raise DeployError("Name the model: --model-id (a hub id) or --model-data-url (s3://)")
    serving.check(instance)

    if startup_timeout_s is None:
        startup_timeout_s = (
            COMPILE_STARTUP_TIMEOUT_S if serving.compile_on_start else instance.startup_timeout_s
        )
    if not 60 <= startup_timeout_s <= COMPILE_STARTUP_TIMEOUT_S:
        raise DeployError(
            f"--startup-timeout {startup_timeout_s} is outside SageMaker's range 60-3600 s: a "
            "model that needs longer must be exported ahead of time (python -m deploy.export)"
        )
    if volume_size_gb is None:
        volume_size_gb = instance.volume_size_gb
    elif not instance.ebs_volume:
        raise DeployError(
            f"{instance.name} has local NVMe storage and SageMaker refuses VolumeSizeInGB for "
            "it: drop --volume-size"
        )
    elif not 1 <= volume_size_gb <= 512:
        raise DeployError(f"--volume-size {volume_size_gb} is outside SageMaker's 1-512 GB")

    environment = serving.environment()
    for name, value in SAGEMAKER_CACHE_ENV.items():
        environment.setdefault(name, value)
    container: dict[str, Any] = {"Image": image_uri, "Environment": environment}
    variant: dict[str, Any] = {
        "VariantName": VARIANT,
        "ModelName": endpoint_name,
        "InstanceType": instance.name,
        "InitialInstanceCount": instance_count,
        "ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout_s,
    }
    if volume_size_gb is not None:
        variant["VolumeSizeInGB"] = volume_size_gb
    if model_data_url is not None:
        container["ModelDataUrl"] = model_data_url
        variant["ModelDataDownloadTimeoutInSeconds"] = MODEL_DATA_DOWNLOAD_TIMEOUT_S
    return EndpointPlan(
        endpoint_name=endpoint_name,
        instance=instance,
        create_model={
            "ModelName": endpoint_name,
            "PrimaryContainer": container,
            "ExecutionRoleArn": role_arn,
        },
        create_endpoint_config={
            "EndpointConfigName": endpoint_name,
            "ProductionVariants": [variant],
        },
        create_endpoint={"EndpointName": endpoint_name, "EndpointConfigName": endpoint_name},
    )


def deploy(
    sagemaker: BaseClient,
    plan: EndpointPlan,
    *,
    wait: bool = True,
    autoscaling: AutoScaling | None = None,
    autoscaling_client: BaseClient | None = None,
    poll_seconds: float = 30.0,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Log = print,
) -> dict[str, Any]:
    """Create the model, endpoint config and endpoint of `plan`; with `wait`, poll until
    `InService` (a status line per poll) and add `autoscaling`.

    Returns the last `describe_endpoint` answer (with `wait`) or the `create_endpoint` answer.
    Raises `EndpointFailedError` when the endpoint fails, `DeployError` on a timeout.
    `timeout_s` defaults to the health-check window plus `PROVISIONING_ALLOWANCE_S`.
    """
    variant = plan.create_endpoint_config["ProductionVariants"][0]
    if autoscaling is not None:
        autoscaling.check(variant["InitialInstanceCount"])
        if autoscaling_client is None:
            raise DeployError("Autoscaling needs an application-autoscaling client")
        if not wait:
            raise DeployError(
                "Autoscaling can only be registered once the endpoint is InService: drop --no-wait"
            )
    name = plan.endpoint_name
    log(
        f"Creating SageMaker model {name}: image {plan.create_model['PrimaryContainer']['Image']}, "
        f"environment {json.dumps(redacted(plan.environment))}"
    )
    sagemaker.create_model(**plan.create_model)
    volume = variant.get("VolumeSizeInGB")
    log(
        f"Creating endpoint config {name}: {variant['InitialInstanceCount']} x "
        f"{variant['InstanceType']}, health-check window "
        f"{variant['ContainerStartupHealthCheckTimeoutInSeconds']} s, "
        + (f"{volume} GB volume" if volume else "instance storage")
    )
    try:
        sagemaker.create_endpoint_config(**plan.create_endpoint_config)
        log(f"Creating endpoint {name}")
        created = sagemaker.create_endpoint(**plan.create_endpoint)
    except ClientError as exc:
        raise DeployError(
            f"{exc}. What was created so far is removed by "
            f"python -m deploy.sagemaker delete --endpoint-name {name}"
        ) from exc
    if not wait:
        log(f"Not waiting: python -m deploy.sagemaker status --endpoint-name {name}")
        return created
    if timeout_s is None:
        timeout_s = plan.startup_timeout_s + PROVISIONING_ALLOWANCE_S
        timeout_s += variant.get("ModelDataDownloadTimeoutInSeconds", 0)
    described = wait_for_endpoint(
        sagemaker,
        name,
        poll_seconds=poll_seconds,
        timeout_s=timeout_s,
        sleep=sleep,
        clock=clock,
        log=log,
    )
    if autoscaling is not None:
        assert autoscaling_client is not None
        enable_autoscaling(autoscaling_client, name, autoscaling, log=log)
    return described


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def wait_for_endpoint(
    sagemaker: BaseClient,
    endpoint_name: str,
    *,
    poll_seconds: float = 30.0,
    timeout_s: float = 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Log = print,
) -> dict[str, Any]:
    """Poll `describe_endpoint` until `InService`, printing `NAME: STATUS (elapsed)` each time.

    Raises `EndpointFailedError` (with SageMaker's `FailureReason`) on a failed state and
    `DeployError` after `timeout_s`.
    """
    start = clock()
    while True:
        described = sagemaker.describe_endpoint(EndpointName=endpoint_name)
        status = described["EndpointStatus"]
        elapsed = clock() - start
        log(f"{endpoint_name}: {status} ({_elapsed(elapsed)})")
        if status == "InService":
            return described
        if status in _FAILED:
            raise EndpointFailedError(endpoint_name, status, described.get("FailureReason"))
        if elapsed >= timeout_s:
            raise DeployError(
                f"Endpoint {endpoint_name} is still {status} after {_elapsed(elapsed)}. SageMaker "
                "goes on creating it: follow it with python -m deploy.sagemaker status "
                f"--endpoint-name {endpoint_name}, and its log in CloudWatch (log group "
                f"/aws/sagemaker/Endpoints/{endpoint_name})"
            )
        sleep(poll_seconds)


def _resource_id(endpoint_name: str, variant: str = VARIANT) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant}"


def autoscaling_requests(
    endpoint_name: str, scaling: AutoScaling, variant: str = VARIANT
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `register_scalable_target` and `put_scaling_policy` requests for `scaling`."""
    target = {
        "ServiceNamespace": "sagemaker",
        "ResourceId": _resource_id(endpoint_name, variant),
        "ScalableDimension": SCALABLE_DIMENSION,
    }
    register = {**target, "MinCapacity": scaling.min_capacity, "MaxCapacity": scaling.max_capacity}
    policy = {
        "PolicyName": f"{endpoint_name}-{scaling.metric}",
        **target,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(scaling.target_value),
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": SCALING_METRICS[scaling.metric]
            },
            "ScaleOutCooldown": scaling.scale_out_cooldown_s,
            "ScaleInCooldown": scaling.scale_in_cooldown_s,
        },
    }
    return register, policy


def enable_autoscaling(
    client: BaseClient,
    endpoint_name: str,
    scaling: AutoScaling,
    *,
    variant: str = VARIANT,
    log: Log = print,
) -> str:
    """Register the variant's instance count with Application Auto Scaling and add a
    target-tracking policy on `scaling.metric`; returns the policy ARN. The endpoint must be
    `InService`."""
    register, policy = autoscaling_requests(endpoint_name, scaling, variant)
    client.register_scalable_target(**register)
    answer = client.put_scaling_policy(**policy)
    log(
        f"Autoscaling {endpoint_name}: {scaling.min_capacity}-{scaling.max_capacity} instances, "
        f"{SCALING_METRICS[scaling.metric]} target {scaling.target_value:g}"
    )
    return answer["PolicyARN"]


def _not_found(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    return code in ("ObjectNotFoundException", "ResourceNotFound") or (
        code == "ValidationException" and "could not find" in message.lower()
    )


def delete(
    sagemaker: BaseClient,
    endpoint_name: str,
    *,
    autoscaling_client: BaseClient | None = None,
    log: Log = print,
) -> None:
    """Remove the endpoint and what it uses: its scaling target (and with it the policies),
    the endpoint, its endpoint config and models.

    The config and models are found from the endpoint; when the endpoint is gone (a deployment
    that failed half way), those named like it are removed. Missing pieces are skipped.
    """
    config_name: str | None = endpoint_name
    models, variants = [endpoint_name], [VARIANT]
    endpoint_exists = True
    try:
        config_name = sagemaker.describe_endpoint(EndpointName=endpoint_name)["EndpointConfigName"]
    except ClientError as exc:
        if not _not_found(exc):
            raise
        endpoint_exists = False
        log(f"Endpoint {endpoint_name} does not exist; removing its config and model if left")
    try:
        config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
        variants = [v["VariantName"] for v in config["ProductionVariants"]]
        models = [v["ModelName"] for v in config["ProductionVariants"] if v.get("ModelName")]
    except ClientError as exc:
        if not _not_found(exc):
            raise
        config_name = None
    if autoscaling_client is not None and endpoint_exists:
        for variant in variants:
            try:
                autoscaling_client.deregister_scalable_target(
                    ServiceNamespace="sagemaker",
                    ResourceId=_resource_id(endpoint_name, variant),
                    ScalableDimension=SCALABLE_DIMENSION,
                )
                log(f"Removed the autoscaling of {endpoint_name}/{variant}")
            except ClientError as exc:
                if not _not_found(exc):
                    raise
    steps: list[tuple[str, Callable[..., Any], dict[str, str]]] = []
    if endpoint_exists:
        steps.append(("endpoint", sagemaker.delete_endpoint, {"EndpointName": endpoint_name}))
    if config_name is not None:
        steps.append(
            (
                "endpoint config",
                sagemaker.delete_endpoint_config,
                {"EndpointConfigName": config_name},
            )
        )
    steps += [("model", sagemaker.delete_model, {"ModelName": model}) for model in models]
    for what, call, params in steps:
        try:
            call(**params)
            log(f"Deleted {what} {next(iter(params.values()))}")
        except ClientError as exc:
            if not _not_found(exc):
                raise


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.sagemaker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "deploy",
        help="create the model, endpoint config and endpoint, and wait for it",
        description="Create a SageMaker endpoint serving this container on a Neuron instance.",
    )
    up.add_argument("--endpoint-name", required=True, help="name of the endpoint (and its model)")
    up.add_argument("--image", required=True, help="ECR image URI of this container")
    up.add_argument("--role", required=True, help="SageMaker execution role ARN")
    up.add_argument(
        "--instance-type",
        required=True,
        help="ml.inf2.xlarge, ml.inf2.8xlarge, ml.inf2.24xlarge, ml.inf2.48xlarge, "
        "ml.trn1.2xlarge or ml.trn1.32xlarge (the ml. prefix is optional)",
    )
    up.add_argument(
        "--model-data-url",
        help="s3:// model.tar.gz of an exported model (python -m deploy.export), served from "
        f"{SAGEMAKER_MODEL_DIR} instead of --model-id",
    )
    add_serving_arguments(up, model="optional")
    up.add_argument(
        "--compile-on-start",
        action="store_true",
        help="NEURON_COMPILE_ON_START=true: allow compiling at start-up (up to an hour) when the "
        "hub cache lacks these shapes; the health-check window becomes 3600 s",
    )
    up.add_argument("--instance-count", type=int, default=1, help="initial instances (default 1)")
    up.add_argument(
        "--startup-timeout",
        type=int,
        help="ContainerStartupHealthCheckTimeoutInSeconds, 60-3600 (default: 3600 with "
        "--compile-on-start, else 900 on 2-core instances and 1800 on larger ones)",
    )
    up.add_argument(
        "--volume-size",
        type=int,
        help="VolumeSizeInGB, 1-512 (default: 64 on inf2.xlarge/8xlarge, 384 on inf2.24xlarge, "
        "512 on inf2.48xlarge; not allowed on trn1, which has instance storage)",
    )
    up.add_argument("--no-wait", action="store_true", help="return once the endpoint is created")
    up.add_argument("--poll-seconds", type=float, default=30.0, help="status poll interval")
    up.add_argument(
        "--dry-run", action="store_true", help="print the requests (token redacted), send nothing"
    )
    scaling = up.add_argument_group("autoscaling (Application Auto Scaling, target tracking)")
    scaling.add_argument(
        "--autoscale-max", type=int, help="most instances; setting it turns autoscaling on"
    )
    scaling.add_argument("--autoscale-min", type=int, default=1, help="fewest instances (1)")
    scaling.add_argument(
        "--autoscale-metric",
        choices=sorted(SCALING_METRICS),
        default="concurrency",
        help="concurrency: concurrent requests per model (streams count until their last "
        "token); invocations: invocations per instance per minute",
    )
    scaling.add_argument(
        "--autoscale-target",
        type=float,
        help="value to hold the metric at (default for concurrency: MAX_BATCH_SIZE, the "
        "requests one instance runs at once; required for invocations)",
    )

    for name, text in (
        ("delete", "delete the endpoint, its config, model and autoscaling"),
        ("status", "print the endpoint's status"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--endpoint-name", required=True)
    for command in commands.choices.values():
        command.add_argument("--region", help="AWS region (default: the configured one)")
    return parser


def _autoscaling(args: argparse.Namespace, serving: ServingConfig) -> AutoScaling | None:
    if args.autoscale_max is None:
        return None
    target = args.autoscale_target
    if target is None:
        if args.autoscale_metric != "concurrency":
            raise DeployError(
                "--autoscale-metric invocations needs --autoscale-target: the invocations per "
                "instance per minute one instance sustains (measure it with a load test)"
            )
        target = float(serving.max_batch_size or 4)
    return AutoScaling(args.autoscale_min, args.autoscale_max, target, args.autoscale_metric)


def _client(service: str, region: str | None) -> BaseClient:
    return boto3.client(service, region_name=region)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (1 with a message on stderr when refused)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "deploy":
            instance = get_instance(args.instance_type)
            serving = serving_config(
                args,
                model_id=args.model_id,
                hf_token=os.environ.get("HF_TOKEN"),
                # An export fixes its cores: leave HF_NUM_CORES to it unless given.
                num_cores=None if args.model_data_url else instance.neuron_cores,
                compile_on_start=args.compile_on_start,
            )
            plan = plan_endpoint(
                args.endpoint_name,
                image_uri=args.image,
                role_arn=args.role,
                instance_type=args.instance_type,
                serving=serving,
                model_data_url=args.model_data_url,
                instance_count=args.instance_count,
                startup_timeout_s=args.startup_timeout,
                volume_size_gb=args.volume_size,
            )
            scaling = _autoscaling(args, serving)
            if scaling is not None:
                scaling.check(args.instance_count)
            if args.dry_run:
                shown = plan.printable()
                if scaling is not None:
                    register, policy = autoscaling_requests(args.endpoint_name, scaling)
                    shown["register_scalable_target"] = register
                    shown["put_scaling_policy"] = policy
                print(json.dumps(shown, indent=2))
                return 0
            deploy(
                _client("sagemaker", args.region),
                plan,
                wait=not args.no_wait,
                autoscaling=scaling,
                autoscaling_client=(
                    _client("application-autoscaling", args.region) if scaling else None
                ),
                poll_seconds=args.poll_seconds,
            )
            print(
                f"Endpoint {args.endpoint_name} is ready: python -m deploy.invoke --endpoint "
                f'{args.endpoint_name} \'{{"inputs": "What is Deep Learning?"}}\''
            )
        elif args.command == "delete":
            delete(
                _client("sagemaker", args.region),
                args.endpoint_name,
                autoscaling_client=_client("application-autoscaling", args.region),
            )
        else:
            described = _client("sagemaker", args.region).describe_endpoint(
                EndpointName=args.endpoint_name
            )
            reason = described.get("FailureReason")
            status = f"{args.endpoint_name}: {described['EndpointStatus']}"
            print(f"{status}: {reason}" if reason else status)
    except NoRegionError:
        print("error: no AWS region configured: pass --region (e.g. us-east-1)", file=sys.stderr)
        return 1
    except (DeployError, ClientError, BotoCoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
