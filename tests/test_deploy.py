"""Deploy scripts, offline: the exact AWS calls (botocore `Stubber`), the Inference Endpoints
request (huggingface_hub over a fake HTTP adapter) and the export hand-off (a fake exporter
process, a stubbed S3 upload).
"""

from __future__ import annotations

import datetime
import io
import json
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.client import BaseClient
from botocore.stub import ANY, Stubber
from huggingface_hub import configure_http_backend

from deploy import export as export_cli
from deploy import hf_endpoint
from deploy import sagemaker as sm
from deploy.instances import INSTANCES, DeployError, ServingConfig, get_instance
from handler.model import neuron_export

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/hf-neuron-serving:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"
MODEL = "meta-llama/Llama-3.2-1B-Instruct"
NAME = "llama-inf2"
TOKEN = "hf_SECRETtokenVALUE"
NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)

SNIPPET_ENV = {
    "HF_MODEL_ID": MODEL,
    "HF_NUM_CORES": "2",
    "HF_AUTO_CAST_TYPE": "bf16",
    "MAX_BATCH_SIZE": "4",
    "MAX_INPUT_TOKENS": "3686",
    "MAX_TOTAL_TOKENS": "4096",
}
"""What the hub's "Deploy > SageMaker" snippet sets for an inf2.xlarge."""
CACHES_ON_VOLUME = {
    "HF_HOME": "/tmp/huggingface",
    "HUGGINGFACE_HUB_CACHE": "/tmp/huggingface/hub",
    "NEURON_COMPILE_CACHE_URL": "/tmp/neuron-compile-cache",
}
"""SageMaker mounts the ML storage volume at /opt/ml and /tmp, so the caches go to /tmp."""


def aws_client(service: str) -> BaseClient:
    return boto3.client(
        service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


@pytest.fixture
def sagemaker() -> Iterator[tuple[BaseClient, Stubber]]:
    client = aws_client("sagemaker")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


@pytest.fixture
def autoscaling() -> Iterator[tuple[BaseClient, Stubber]]:
    client = aws_client("application-autoscaling")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


class FakeTime:
    """`clock` and `sleep` for the wait loops: sleeping advances the clock, instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def snippet_serving(**changes: Any) -> ServingConfig:
    values: dict[str, Any] = {
        "model_id": MODEL,
        "num_cores": 2,
        "auto_cast_type": "bf16",
        "max_batch_size": 4,
        "max_input_tokens": 3686,
        "max_total_tokens": 4096,
        **changes,
    }
    return ServingConfig(**values)


def snippet_plan(**changes: Any) -> sm.EndpointPlan:
    return sm.plan_endpoint(
        NAME,
        image_uri=IMAGE,
        role_arn=ROLE,
        instance_type="ml.inf2.xlarge",
        serving=snippet_serving(**changes),
    )


def describe_answer(status: str, reason: str | None = None) -> dict[str, Any]:
    answer = {
        "EndpointName": NAME,
        "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{NAME}",
        "EndpointConfigName": NAME,
        "EndpointStatus": status,
        "CreationTime": NOW,
        "LastModifiedTime": NOW,
    }
    if reason:
        answer["FailureReason"] = reason
    return answer


def expect_creation(stubber: Stubber, environment: dict[str, str]) -> None:
    """The three create calls of the hub-snippet configuration on one ml.inf2.xlarge."""
    stubber.add_response(
        "create_model",
        {"ModelArn": f"arn:aws:sagemaker:us-east-1:123456789012:model/{NAME}"},
        {
            "ModelName": NAME,
            "PrimaryContainer": {"Image": IMAGE, "Environment": environment},
            "ExecutionRoleArn": ROLE,
        },
    )
    stubber.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{NAME}"},
        {
            "EndpointConfigName": NAME,
            "ProductionVariants": [
                {
                    "VariantName": "AllTraffic",
                    "ModelName": NAME,
                    "InstanceType": "ml.inf2.xlarge",
                    "InitialInstanceCount": 1,
                    "ContainerStartupHealthCheckTimeoutInSeconds": 900,
                    "VolumeSizeInGB": 64,
                }
            ],
        },
    )
    stubber.add_response(
        "create_endpoint",
        {"EndpointArn": describe_answer("Creating")["EndpointArn"]},
        {"EndpointName": NAME, "EndpointConfigName": NAME},
    )


# --- SageMaker ---------------------------------------------------------------------------------


def test_deploy_sends_the_hub_snippet_configuration_and_waits(sagemaker) -> None:
    client, stubber = sagemaker
    expect_creation(stubber, {**SNIPPET_ENV, "HF_TOKEN": TOKEN, **CACHES_ON_VOLUME})
    stubber.add_response("describe_endpoint", describe_answer("Creating"), {"EndpointName": NAME})
    stubber.add_response("describe_endpoint", describe_answer("Creating"), {"EndpointName": NAME})
    stubber.add_response("describe_endpoint", describe_answer("InService"), {"EndpointName": NAME})
    fake, lines = FakeTime(), []

    described = sm.deploy(
        client,
        snippet_plan(hf_token=TOKEN),
        poll_seconds=30,
        sleep=fake.sleep,
        clock=fake.clock,
        log=lines.append,
    )

    assert described["EndpointStatus"] == "InService"
    assert fake.sleeps == [30, 30]
    assert lines[-3:] == [
        f"{NAME}: Creating (0m00s)",
        f"{NAME}: Creating (0m30s)",
        f"{NAME}: InService (1m00s)",
    ]
    assert TOKEN not in "\n".join(lines)
    assert '"HF_TOKEN": "<redacted>"' in lines[0]


def test_deploy_adds_target_tracking_autoscaling(sagemaker, autoscaling) -> None:
    client, stubber = sagemaker
    scaling_client, scaling_stubber = autoscaling
    expect_creation(stubber, {**SNIPPET_ENV, **CACHES_ON_VOLUME})
    stubber.add_response("describe_endpoint", describe_answer("InService"), {"EndpointName": NAME})
    target = {
        "ServiceNamespace": "sagemaker",
        "ResourceId": f"endpoint/{NAME}/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
    }
    scaling_stubber.add_response(
        "register_scalable_target", {}, {**target, "MinCapacity": 1, "MaxCapacity": 4}
    )
    scaling_stubber.add_response(
        "put_scaling_policy",
        {"PolicyARN": "arn:aws:autoscaling:us-east-1:123456789012:scalingPolicy:x"},
        {
            "PolicyName": f"{NAME}-concurrency",
            **target,
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": 4.0,
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": (
                        "SageMakerVariantConcurrentRequestsPerModelHighResolution"
                    )
                },
                "ScaleOutCooldown": 300,
                "ScaleInCooldown": 900,
            },
        },
    )
    fake = FakeTime()

    sm.deploy(
        client,
        snippet_plan(),
        autoscaling=sm.AutoScaling(min_capacity=1, max_capacity=4, target_value=4),
        autoscaling_client=scaling_client,
        sleep=fake.sleep,
        clock=fake.clock,
        log=lambda line: None,
    )


def test_invocations_metric_name_is_botocores() -> None:
    """Both metric names exist in the installed Application Auto Scaling service model."""
    model = aws_client("application-autoscaling").meta.service_model
    assert set(sm.SCALING_METRICS.values()) <= set(model.shape_for("MetricType").enum)


def test_delete_removes_scaling_endpoint_config_and_model(sagemaker, autoscaling) -> None:
    client, stubber = sagemaker
    scaling_client, scaling_stubber = autoscaling
    stubber.add_response("describe_endpoint", describe_answer("InService"), {"EndpointName": NAME})
    stubber.add_response(
        "describe_endpoint_config",
        {
            "EndpointConfigName": NAME,
            "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/x",
            "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": NAME}],
            "CreationTime": NOW,
        },
        {"EndpointConfigName": NAME},
    )
    scaling_stubber.add_response(
        "deregister_scalable_target",
        {},
        {
            "ServiceNamespace": "sagemaker",
            "ResourceId": f"endpoint/{NAME}/variant/AllTraffic",
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        },
    )
    stubber.add_response("delete_endpoint", {}, {"EndpointName": NAME})
    stubber.add_response("delete_endpoint_config", {}, {"EndpointConfigName": NAME})
    stubber.add_response("delete_model", {}, {"ModelName": NAME})

    sm.delete(client, NAME, autoscaling_client=scaling_client, log=lambda line: None)


def test_delete_cleans_up_a_half_created_deployment(sagemaker, autoscaling) -> None:
    """No endpoint (its creation failed): the config and model named like it still go; an
    endpoint without autoscaling is not an error."""
    client, stubber = sagemaker
    scaling_client, _ = autoscaling
    stubber.add_client_error(
        "describe_endpoint",
        "ValidationException",
        f'Could not find endpoint "{NAME}".',
        expected_params={"EndpointName": NAME},
    )
    stubber.add_response(
        "describe_endpoint_config",
        {
            "EndpointConfigName": NAME,
            "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/x",
            "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": NAME}],
            "CreationTime": NOW,
        },
        {"EndpointConfigName": NAME},
    )
    stubber.add_response("delete_endpoint_config", {}, {"EndpointConfigName": NAME})
    stubber.add_client_error(
        "delete_model",
        "ValidationException",
        f"Could not find model {NAME}.",
        expected_params={"ModelName": NAME},
    )

    sm.delete(client, NAME, autoscaling_client=scaling_client, log=lambda line: None)


def test_refuses_more_cores_than_the_instance_has_before_any_call(
    sagemaker, monkeypatch, capsys
) -> None:
    client, stubber = sagemaker
    monkeypatch.setattr(sm, "_client", lambda *a: pytest.fail("no client when refused"))
    with pytest.raises(DeployError) as refused:
        plan = snippet_plan(num_cores=4)
        sm.deploy(client, plan)
    message = str(refused.value)
    assert message == (
        "HF_NUM_CORES=4 but ml.inf2.xlarge has 2 Neuron cores: set HF_NUM_CORES (--num-cores) "
        "between 1 and 2, or use an instance type with at least 4 cores: ml.inf2.24xlarge "
        "(12 cores), ml.inf2.48xlarge (24 cores), ml.trn1.32xlarge (32 cores)"
    )
    stubber.assert_no_pending_responses()

    status = sm.main(
        [
            "deploy",
            *("--endpoint-name", NAME, "--image", IMAGE, "--role", ROLE),
            *("--instance-type", "inf2.xlarge", "--model-id", MODEL, "--num-cores", "4"),
        ]
    )
    assert status == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_failed_endpoint_raises_with_the_reason_and_the_fix(sagemaker) -> None:
    client, stubber = sagemaker
    expect_creation(stubber, {**SNIPPET_ENV, **CACHES_ON_VOLUME})
    reason = (
        "The primary container for production variant AllTraffic did not pass the ping health "
        "check. Please check CloudWatch logs for this endpoint."
    )
    stubber.add_response("describe_endpoint", describe_answer("Creating"), {"EndpointName": NAME})
    stubber.add_response(
        "describe_endpoint", describe_answer("Failed", reason), {"EndpointName": NAME}
    )
    fake = FakeTime()

    with pytest.raises(sm.EndpointFailedError) as failed:
        sm.deploy(client, snippet_plan(), sleep=fake.sleep, clock=fake.clock, log=lambda _: None)

    message = str(failed.value)
    assert failed.value.reason == reason
    assert message.startswith(f"Endpoint {NAME} is Failed: {reason}")
    assert "python -m deploy.export" in message
    assert f"/aws/sagemaker/Endpoints/{NAME}" in message
    assert f"python -m deploy.sagemaker delete --endpoint-name {NAME}" in message


def test_wait_gives_up_after_the_timeout(sagemaker) -> None:
    client, stubber = sagemaker
    for _ in range(3):
        stubber.add_response(
            "describe_endpoint", describe_answer("Creating"), {"EndpointName": NAME}
        )
    fake = FakeTime()
    with pytest.raises(DeployError, match="still Creating after 1m00s"):
        sm.wait_for_endpoint(
            client,
            NAME,
            poll_seconds=30,
            timeout_s=60,
            sleep=fake.sleep,
            clock=fake.clock,
            log=lambda _: None,
        )


def test_timeouts_and_volumes() -> None:
    """Short health-check window without compilation, SageMaker's maximum with it; EBS volume
    sized by instance, none on trn1 (instance storage)."""
    variant = snippet_plan().create_endpoint_config["ProductionVariants"][0]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900
    compiling = snippet_plan(compile_on_start=True)
    assert compiling.startup_timeout_s == 3600
    assert compiling.environment["NEURON_COMPILE_ON_START"] == "true"
    sizes = {name: instance.volume_size_gb for name, instance in INSTANCES.items()}
    assert sizes == {
        "ml.inf2.xlarge": 64,
        "ml.inf2.8xlarge": 64,
        "ml.inf2.24xlarge": 384,
        "ml.inf2.48xlarge": 512,
        "ml.trn1.2xlarge": None,
        "ml.trn1.32xlarge": None,
    }
    trn1 = sm.plan_endpoint(
        NAME,
        image_uri=IMAGE,
        role_arn=ROLE,
        instance_type="trn1.32xlarge",
        serving=snippet_serving(num_cores=32),
    )
    variant = trn1.create_endpoint_config["ProductionVariants"][0]
    assert "VolumeSizeInGB" not in variant
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1800
    with pytest.raises(DeployError, match="refuses VolumeSizeInGB"):
        sm.plan_endpoint(
            NAME,
            image_uri=IMAGE,
            role_arn=ROLE,
            instance_type="ml.trn1.2xlarge",
            serving=snippet_serving(),
            volume_size_gb=100,
        )


def test_instance_names_with_or_without_prefix() -> None:
    assert get_instance("inf2.xlarge") is get_instance("ml.inf2.xlarge")
    assert get_instance("ML.TRN1.32xlarge").neuron_cores == 32
    with pytest.raises(DeployError, match=r"Unknown instance type 'ml.g5.xlarge'.*inf2.48xlarge"):
        get_instance("ml.g5.xlarge")


def test_model_data_is_served_from_opt_ml_model() -> None:
    url = "s3://my-bucket/llama-inf2/model.tar.gz"
    plan = sm.plan_endpoint(
        NAME,
        image_uri=IMAGE,
        role_arn=ROLE,
        instance_type="ml.inf2.xlarge",
        serving=snippet_serving(model_id=None),
        model_data_url=url,
    )
    assert plan.create_model["PrimaryContainer"]["ModelDataUrl"] == url
    assert plan.environment["HF_MODEL_ID"] == "/opt/ml/model"
    variant = plan.create_endpoint_config["ProductionVariants"][0]
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 3600
    with pytest.raises(DeployError, match="Drop --model-id"):
        sm.plan_endpoint(
            NAME,
            image_uri=IMAGE,
            role_arn=ROLE,
            instance_type="ml.inf2.xlarge",
            serving=snippet_serving(),
            model_data_url=url,
        )


def test_settings_the_server_would_refuse_are_refused_here() -> None:
    with pytest.raises(DeployError, match="MAX_INPUT_TOKENS=4096 must be smaller"):
        snippet_plan(max_input_tokens=4096)
    with pytest.raises(DeployError, match="HF_AUTO_CAST_TYPE='bf17'"):
        snippet_plan(auto_cast_type="bf17")
    assert snippet_plan(auto_cast_type="bfloat16").environment["HF_AUTO_CAST_TYPE"] == "bf16"


def test_cli_dry_run_prints_the_requests_without_the_token(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(sm, "_client", lambda *a: pytest.fail("no client on a dry run"))
    status = sm.main(
        [
            "deploy",
            "--dry-run",
            *("--endpoint-name", NAME, "--image", IMAGE, "--role", ROLE),
            *("--instance-type", "inf2.xlarge", "--model-id", MODEL, "--with-hf-token"),
            *("--auto-cast-type", "bf16", "--max-batch-size", "4"),
            *("--max-input-tokens", "3686", "--max-total-tokens", "4096"),
            *("--autoscale-max", "2"),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert TOKEN not in out
    shown = json.loads(out)
    environment = shown["create_model"]["PrimaryContainer"]["Environment"]
    assert environment == {**SNIPPET_ENV, "HF_TOKEN": "<redacted>", **CACHES_ON_VOLUME}
    assert shown["put_scaling_policy"]["TargetTrackingScalingPolicyConfiguration"][
        "TargetValue"
    ] == pytest.approx(4.0)


# --- Inference Endpoints -----------------------------------------------------------------------


class FakeHubAPI(requests.adapters.BaseAdapter):
    """Answers huggingface_hub's HTTP requests from a script and records them."""

    def __init__(self, answers: list[tuple[str, str, dict[str, Any]]]) -> None:
        super().__init__()
        self.answers = answers
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.requests.append(request)
        assert self.answers, f"unexpected request {request.method} {request.url}"
        method, url, body = self.answers.pop(0)
        assert (request.method, request.url) == (method, url)
        response = requests.Response()
        response.status_code = 200
        response._content = json.dumps(body).encode()
        response.headers["Content-Type"] = "application/json"
        response.url = url
        response.request = request
        return response

    def close(self) -> None:
        pass


@pytest.fixture
def hub_api() -> Iterator[FakeHubAPI]:
    fake = FakeHubAPI([])

    def session() -> requests.Session:
        s = requests.Session()
        s.mount("https://", fake)
        s.mount("http://", fake)
        return s

    configure_http_backend(backend_factory=session)
    yield fake
    configure_http_backend()
    assert not fake.answers, "scripted answers left"


ENDPOINTS_API = "https://api.endpoints.huggingface.cloud/v2/endpoint/my-org"


def endpoint_answer(state: str, url: str | None = None) -> dict[str, Any]:
    return {
        "name": NAME,
        "type": "protected",
        "healthRoute": "/health",
        "model": {
            "repository": MODEL,
            "framework": "pytorch",
            "revision": None,
            "task": "text-generation",
        },
        "status": {
            "state": state,
            "url": url,
            "createdAt": "2025-01-01T00:00:00.000Z",
            "updatedAt": "2025-01-01T00:00:00.000Z",
        },
    }


def test_inference_endpoint_request_runs_our_image(hub_api) -> None:
    hub_api.answers += [
        ("POST", ENDPOINTS_API, endpoint_answer("pending")),
        ("GET", f"{ENDPOINTS_API}/{NAME}", endpoint_answer("initializing")),
        ("GET", f"{ENDPOINTS_API}/{NAME}", endpoint_answer("running", "https://x.cloud")),
    ]
    request = hf_endpoint.plan_endpoint(
        NAME,
        repository=MODEL,
        image=IMAGE,
        serving=snippet_serving(hf_token=TOKEN),
        namespace="my-org",
    )
    endpoint = hf_endpoint.create_endpoint(request, token="hf_user_token")
    fake, lines = FakeTime(), []
    hf_endpoint.wait_running(endpoint, sleep=fake.sleep, clock=fake.clock, log=lines.append)

    post = hub_api.requests[0]
    assert post.headers["authorization"] == "Bearer hf_user_token"
    sent = json.loads(post.body)
    env = dict(SNIPPET_ENV)
    assert sent["model"]["image"] == {
        "custom": {"url": IMAGE, "health_route": "/health", "port": 8080, "env": env}
    }
    assert sent["model"]["env"] == env
    assert sent["model"]["secrets"] == {"HF_TOKEN": TOKEN}
    assert TOKEN not in json.dumps(sent["model"]["env"])
    assert sent["model"]["repository"] == MODEL
    assert sent["model"]["task"] == "text-generation"
    assert sent["compute"]["accelerator"] == "neuron"
    assert sent["compute"]["instanceType"] == "inf2"
    assert sent["compute"]["instanceSize"] == "x1"
    assert sent["provider"] == {"region": "us-east-1", "vendor": "aws"}
    assert sent["type"] == "protected"
    assert lines == [
        f"{NAME}: pending (0m00s)",
        f"{NAME}: initializing (0m15s)",
        f"{NAME}: running (0m30s)",
    ]


def test_inference_endpoint_serving_the_mounted_repository(hub_api) -> None:
    request = hf_endpoint.plan_endpoint(
        NAME,
        repository="my-org/llama-neuron",
        image=IMAGE,
        serving=snippet_serving(),
        serve_from="mount",
    )
    assert "HF_MODEL_ID" not in request["env"]
    assert "secrets" not in request
    with pytest.raises(DeployError, match=r"choose --instance-size x2 or larger"):
        hf_endpoint.plan_endpoint(
            NAME, repository=MODEL, image=IMAGE, serving=snippet_serving(num_cores=4)
        )


def test_inference_endpoint_failure_points_at_the_logs(hub_api) -> None:
    hub_api.answers += [("POST", ENDPOINTS_API, endpoint_answer("failed"))]
    request = hf_endpoint.plan_endpoint(
        NAME, repository=MODEL, image=IMAGE, serving=snippet_serving(), namespace="my-org"
    )
    endpoint = hf_endpoint.create_endpoint(request, token="hf_user_token")
    with pytest.raises(DeployError, match=f"endpoints.huggingface.co/my-org/endpoints/{NAME}"):
        hf_endpoint.wait_running(endpoint, log=lambda _: None)


def test_inference_endpoint_dry_run_redacts_the_secret(hub_api, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    status = hf_endpoint.main(
        ["--dry-run", "--name", NAME, "--repository", MODEL, "--image", IMAGE, "--with-hf-token"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert TOKEN not in out
    assert json.loads(out)["env"]["HF_NUM_CORES"] == "2"
    assert not hub_api.requests


# --- export ------------------------------------------------------------------------------------


def fake_exporter(calls: list[dict[str, Any]]) -> Any:
    """Stands in for `python -m handler.model.neuron_export`: writes what an export holds."""

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append({"command": command, **kwargs})
        output = Path(command[command.index("--output") + 1])
        (output / "checkpoint").mkdir(parents=True)
        for name in ("neuron_config.json", "config.json", "tokenizer.json", "model.pt"):
            (output / name).write_text("{}")
        (output / "checkpoint" / "tp0.safetensors").write_bytes(b"\0" * 64)
        return subprocess.CompletedProcess(command, 0)

    return run


def test_export_then_upload_model_tar_gz_to_s3(tmp_path, monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(export_cli.subprocess, "run", fake_exporter(calls))
    s3 = aws_client("s3")
    uploaded: dict[str, bytes] = {}

    def keep_body(params: dict[str, Any], **kwargs: Any) -> None:
        uploaded[params["Key"]] = params["Body"].read()

    s3.meta.events.register("provide-client-params.s3.PutObject", keep_body)
    monkeypatch.setattr(export_cli.boto3, "client", lambda service, region_name=None: s3)
    lines: list[str] = []
    output = tmp_path / "exports" / "llama"

    with Stubber(s3) as stubber:
        stubber.add_response(
            "put_object",
            {},
            {
                "Bucket": "my-bucket",
                "Key": "llama-inf2/model.tar.gz",
                "Body": ANY,
                "ChecksumAlgorithm": ANY,
            },
        )
        status = export_cli.main(
            [
                *("--model-id", MODEL, "--instance-type", "ml.inf2.xlarge"),
                *("--auto-cast-type", "bf16", "--max-batch-size", "4"),
                *("--max-input-tokens", "3686", "--max-total-tokens", "4096"),
                *("--output", str(output), "--s3-uri", "s3://my-bucket/llama-inf2"),
            ],
            log=lines.append,
        )
        stubber.assert_no_pending_responses()

    assert status == 0
    (call,) = calls
    assert call["command"] == [
        sys.executable,
        *("-m", "handler.model.neuron_export", "--model-id", MODEL),
        *("--batch-size", "4", "--sequence-length", "4096", "--num-cores", "2"),
        *("--auto-cast-type", "bf16", "--instance-type", "inf2", "--output", str(output)),
    ]
    assert call["cwd"] == ROOT
    # The server's exporter accepts exactly these arguments.
    parsed = neuron_export.build_parser().parse_args(call["command"][3:])
    assert (parsed.batch_size, parsed.sequence_length, parsed.num_cores) == (4, 4096, 2)
    assert (parsed.auto_cast_type, parsed.instance_type) == ("bf16", "inf2")

    with tarfile.open(fileobj=io.BytesIO(uploaded["llama-inf2/model.tar.gz"])) as tar:
        names = sorted(tar.getnames())
    assert names == [
        "checkpoint",
        "checkpoint/tp0.safetensors",
        "config.json",
        "model.pt",
        "neuron_config.json",
        "tokenizer.json",
    ]
    assert "ModelDataUrl: s3://my-bucket/llama-inf2/model.tar.gz" in lines
    assert not list(output.parent.glob(".archive-*")), "the archive is removed after upload"

    # The printed deploy command deploys the export with its compiled settings.
    (hint,) = [line for line in lines if line.startswith("Deploy it: ")]
    words = shlex.split(hint.removeprefix("Deploy it: python -m deploy.sagemaker "))
    words = [{"NAME": NAME, "IMAGE": IMAGE, "ROLE": ROLE}.get(word, word) for word in words]
    plan_status = sm.main([*words, "--dry-run"])
    assert plan_status == 0


@pytest.mark.parametrize("value", ["false", "true"])
def test_export_passes_the_on_device_sampling_switch(tmp_path, monkeypatch, value: str) -> None:
    """`--on-device-sampling false` exports with host sampling (seeds, penalties, log-
    probabilities); the server's exporter takes the switch as given."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(export_cli.subprocess, "run", fake_exporter(calls))
    base = ["--model-id", MODEL, "--instance-type", "ml.inf2.xlarge", "--output"]

    status = export_cli.main([*base, str(tmp_path / "out"), "--on-device-sampling", value])

    assert status == 0
    (call,) = calls
    command = call["command"]
    assert command[command.index("--on-device-sampling") + 1] == value
    parsed = neuron_export.build_parser().parse_args(command[3:])
    assert parsed.on_device_sampling is (value == "true")
    calls.clear()
    assert export_cli.main([*base, str(tmp_path / "default")]) == 0
    assert "--on-device-sampling" not in calls[0]["command"]  # optimum-neuron's choice


def test_deploy_command_printed_by_export_matches_the_export(tmp_path, monkeypatch, capsys):
    """The hand-off above, checked on the printed plan: the compiled shapes, /opt/ml/model."""
    monkeypatch.setattr(export_cli.subprocess, "run", fake_exporter([]))
    monkeypatch.setattr(export_cli, "upload_to_s3", lambda s3, out, uri: uri + "/model.tar.gz")
    monkeypatch.setattr(export_cli.boto3, "client", lambda *a, **k: None)
    lines: list[str] = []
    export_cli.main(
        [
            *("--model-id", MODEL, "--instance-type", "inf2.24xlarge", "--num-cores", "8"),
            *("--output", str(tmp_path / "out"), "--s3-uri", "s3://b/p"),
        ],
        log=lines.append,
    )
    (hint,) = [line for line in lines if line.startswith("Deploy it: ")]
    words = shlex.split(hint.removeprefix("Deploy it: python -m deploy.sagemaker "))
    words = [{"NAME": NAME, "IMAGE": IMAGE, "ROLE": ROLE}.get(word, word) for word in words]
    assert sm.main([*words, "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["create_model"]["PrimaryContainer"]["Environment"] == {
        "HF_MODEL_ID": "/opt/ml/model",
        "HF_NUM_CORES": "8",
        "MAX_BATCH_SIZE": "4",
        "MAX_TOTAL_TOKENS": "4096",
        **CACHES_ON_VOLUME,
    }
    assert shown["create_model"]["PrimaryContainer"]["ModelDataUrl"] == "s3://b/p/model.tar.gz"


def test_export_uploads_to_the_hub(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export_cli.subprocess, "run", fake_exporter([]))
    calls: list[tuple[str, dict[str, Any]]] = []

    class RecordingApi:
        def create_repo(self, repo_id: str, **kwargs: Any) -> str:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs: Any) -> None:
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(export_cli, "HfApi", RecordingApi)
    output = tmp_path / "out"
    status = export_cli.main(
        [
            *("--model-id", MODEL, "--instance-type", "inf2", "--num-cores", "2"),
            *("--output", str(output), "--hub-repo", "my-org/llama-neuron"),
        ],
        log=lambda _: None,
    )
    assert status == 0
    assert calls[0] == (
        "create_repo",
        {"repo_id": "my-org/llama-neuron", "repo_type": "model", "private": True, "exist_ok": True},
    )
    name, upload = calls[1]
    assert name == "upload_folder"
    assert upload["repo_id"] == "my-org/llama-neuron"
    assert upload["folder_path"] == str(output)


def test_export_refusals(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(export_cli.subprocess, "run", lambda *a, **k: pytest.fail("ran"))
    base = ["--model-id", MODEL, "--output", str(tmp_path / "out")]
    assert export_cli.main([*base, "--instance-type", "inf2.xlarge", "--num-cores", "4"]) == 1
    assert "HF_NUM_CORES=4 but ml.inf2.xlarge has 2" in capsys.readouterr().err
    assert export_cli.main([*base, "--instance-type", "trn1"]) == 1
    assert "--instance-type trn1 needs --num-cores" in capsys.readouterr().err

    monkeypatch.setattr(
        export_cli.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1)
    )
    assert export_cli.main([*base, "--instance-type", "inf2.xlarge"]) == 1
    assert "The export failed (exit code 1)" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["deploy.sagemaker", "deploy.hf_endpoint", "deploy.export"])
def test_help(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"python -m {module}" in result.stdout
