"""Create a Hugging Face Inference Endpoint running this container on AWS Inferentia2.

The endpoint runs our image as a custom container (`huggingface_hub.create_inference_endpoint`
with `custom_image`): Inference Endpoints mounts the model repository at `/repository`, probes
`GET /health` on port 8080 (503 while loading, 200 when ready) and passes request paths through::

    python -m deploy.hf_endpoint --name llama-inf2 --repository meta-llama/Llama-3.2-1B-Instruct \\
        --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/hf-neuron-serving:latest \\
        --instance-size x1 --num-cores 2 --auto-cast-type bf16 --max-batch-size 4 \\
        --max-input-tokens 3686 --max-total-tokens 4096 --with-hf-token

The hub token of this shell (`HF_TOKEN` or `huggingface-cli login`) creates the endpoint;
`--with-hf-token` also hands it to the container as an endpoint secret, for gated models.

`--serve-from hub` (default) sets `HF_MODEL_ID` to the repository, so the server fetches the
model by its id and can use the precompiled graphs of the hub's Neuron cache; `--serve-from
mount` serves `/repository` as mounted, the better choice for a repository that already holds
an export (`python -m deploy.export --hub-repo ...`), which is not downloaded twice. Inference
Endpoints has no start-up window to raise: do not compile at start-up there, export first.
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
from typing import Any, Literal

from huggingface_hub import HfApi, InferenceEndpoint
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from deploy.instances import (
    DeployError,
    ServingConfig,
    add_serving_arguments,
    redacted,
    serving_config,
)

PORT = 8080
HEALTH_ROUTE = "/health"
ACCELERATOR = "neuron"
CORES_PER_CHIP = 2
"""Inferentia2: `instance_size` `xN` is N chips, 2 Neuron cores each."""
_SIZE = re.compile(r"^x(\d+)$")
_FAILED = ("failed", "updateFailed")

Log = Callable[[str], None]


def neuron_cores(instance_type: str, instance_size: str) -> int | None:
    """Neuron cores of an Inference Endpoints instance (`inf2`, `x1` -> 2); None if unknown."""
    match = _SIZE.match(instance_size)
    if instance_type != "inf2" or match is None:
        return None
    return CORES_PER_CHIP * int(match.group(1))


def plan_endpoint(
    name: str,
    *,
    repository: str,
    image: str,
    serving: ServingConfig,
    serve_from: Literal["hub", "mount"] = "hub",
    revision: str | None = None,
    instance_type: str = "inf2",
    instance_size: str = "x1",
    region: str = "us-east-1",
    vendor: str = "aws",
    endpoint_type: str = "protected",
    namespace: str | None = None,
    min_replica: int = 1,
    max_replica: int = 1,
    scale_to_zero_timeout: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `create_inference_endpoint`, checked; `DeployError` if refused.

    `serving.model_id` is replaced according to `serve_from`; its token becomes the endpoint
    secret `HF_TOKEN`, never a plain variable. The environment goes both in `custom_image` (where
    the API's documented examples put a custom container's variables) and in `env`.
    """
    if serve_from not in ("hub", "mount"):
        raise DeployError(f"--serve-from must be hub or mount, not {serve_from!r}")
    cores = neuron_cores(instance_type, instance_size)
    if cores is not None and serving.num_cores is not None and serving.num_cores > cores:
        raise DeployError(
            f"HF_NUM_CORES={serving.num_cores} but an {instance_type} {instance_size} endpoint "
            f"has {cores} Neuron cores: set HF_NUM_CORES (--num-cores) between 1 and {cores}, or "
            f"choose --instance-size x{-(-serving.num_cores // CORES_PER_CHIP)} or larger"
        )
    if not 0 <= min_replica <= max_replica or max_replica < 1:
        raise DeployError(
            f"Replicas need 0 <= min ({min_replica}) <= max ({max_replica}) and max >= 1"
        )
    if min_replica == 0 and scale_to_zero_timeout is None:
        raise DeployError("--min-replica 0 needs --scale-to-zero-timeout (minutes idle)")
    serving = dataclasses.replace(
        serving,
        model_id=repository if serve_from == "hub" else None,
        revision=revision if serve_from == "hub" else None,
    )
    serving.check()
    env = serving.environment(include_token=False)
    request: dict[str, Any] = {
        "name": name,
        "repository": repository,
        "revision": revision,
        "framework": "pytorch",
        "task": "text-generation",
        "accelerator": ACCELERATOR,
        "vendor": vendor,
        "region": region,
        "type": endpoint_type,
        "instance_size": instance_size,
        "instance_type": instance_type,
        "min_replica": min_replica,
        "max_replica": max_replica,
        "scale_to_zero_timeout": scale_to_zero_timeout,
        "custom_image": {"url": image, "health_route": HEALTH_ROUTE, "port": PORT, "env": env},
        "env": env,
        "namespace": namespace,
    }
    if serving.hf_token:
        request["secrets"] = {"HF_TOKEN": serving.hf_token}
    return request


def printable(request: dict[str, Any]) -> dict[str, Any]:
    """`request` with the secrets redacted."""
    shown = dict(request)
    if "secrets" in shown:
        shown["secrets"] = redacted(shown["secrets"])
    return shown


def create_endpoint(
    request: dict[str, Any], *, api: HfApi | None = None, token: str | None = None
) -> InferenceEndpoint:
    """Send `request` (from `plan_endpoint`); `token` (default: this machine's) authorises it."""
    api = api or HfApi()
    try:
        return api.create_inference_endpoint(**request, token=token)
    except LocalTokenNotFoundError as exc:
        raise DeployError(
            "No hub token to create the endpoint with: export HF_TOKEN=hf_... or run "
            "huggingface-cli login"
        ) from exc
    except HfHubHTTPError as exc:
        raise DeployError(f"Inference Endpoints refused {request['name']}: {exc}") from exc


def wait_running(
    endpoint: InferenceEndpoint,
    *,
    timeout_s: float = 3600.0,
    poll_seconds: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Log = print,
) -> InferenceEndpoint:
    """Poll the endpoint until it is `running`, printing `NAME: STATUS (elapsed)` each time."""
    start = clock()
    while True:
        elapsed = int(clock() - start)
        log(f"{endpoint.name}: {endpoint.status} ({elapsed // 60}m{elapsed % 60:02d}s)")
        if endpoint.status == "running" and endpoint.url:
            return endpoint
        logs = f"https://endpoints.huggingface.co/{endpoint.namespace}/endpoints/{endpoint.name}"
        if endpoint.status in _FAILED:
            raise DeployError(
                f"Inference Endpoint {endpoint.name} is {endpoint.status}: its container log is "
                f"at {logs} (the server names the setting to change when it refuses to start)"
            )
        if elapsed >= timeout_s:
            raise DeployError(
                f"Inference Endpoint {endpoint.name} is still {endpoint.status} after "
                f"{elapsed} s; follow it at {logs}"
            )
        sleep(poll_seconds)
        endpoint.fetch()


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.hf_endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="endpoint name")
    parser.add_argument(
        "--repository",
        required=True,
        help="model repository on the hub (a model, or an export from deploy.export --hub-repo)",
    )
    parser.add_argument("--image", required=True, help="container image URL of this server")
    parser.add_argument(
        "--serve-from",
        choices=("hub", "mount"),
        default="hub",
        help="hub: HF_MODEL_ID=REPOSITORY (hub cache of compiled graphs usable); mount: serve "
        "/repository as mounted (exported repositories)",
    )
    parser.add_argument("--instance-type", default="inf2", help="instance type (default inf2)")
    parser.add_argument(
        "--instance-size", default="x1", help="x1 = one Inferentia2 chip, 2 Neuron cores"
    )
    parser.add_argument("--region", default="us-east-1", help="region (default us-east-1)")
    parser.add_argument("--vendor", default="aws", help="cloud vendor (default aws)")
    parser.add_argument(
        "--type", default="protected", choices=("protected", "public", "private"), dest="kind"
    )
    parser.add_argument("--namespace", help="user or organisation (default: the token's user)")
    parser.add_argument("--min-replica", type=int, default=1)
    parser.add_argument("--max-replica", type=int, default=1)
    parser.add_argument(
        "--scale-to-zero-timeout", type=int, help="minutes idle before scaling to 0"
    )
    add_serving_arguments(parser, model="none")
    parser.add_argument("--no-wait", action="store_true", help="return once the endpoint exists")
    parser.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds (3600)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the request (secrets redacted), send nothing"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (1 with a message on stderr when refused)."""
    args = _parser().parse_args(argv)
    try:
        serving = serving_config(
            args,
            model_id=args.repository,
            hf_token=os.environ.get("HF_TOKEN"),
            num_cores=neuron_cores(args.instance_type, args.instance_size),
        )
        request = plan_endpoint(
            args.name,
            repository=args.repository,
            image=args.image,
            serving=serving,
            serve_from=args.serve_from,
            revision=args.revision,
            instance_type=args.instance_type,
            instance_size=args.instance_size,
            region=args.region,
            vendor=args.vendor,
            endpoint_type=args.kind,
            namespace=args.namespace,
            min_replica=args.min_replica,
            max_replica=args.max_replica,
            scale_to_zero_timeout=args.scale_to_zero_timeout,
        )
        if args.dry_run:
            print(json.dumps(printable(request), indent=2))
            return 0
        endpoint = create_endpoint(request)
        print(f"Created Inference Endpoint {endpoint.namespace}/{endpoint.name}")
        if not args.no_wait:
            wait_running(endpoint, timeout_s=args.wait_timeout)
            print(f"{endpoint.name} is running at {endpoint.url}")
    except (DeployError, HfHubHTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
