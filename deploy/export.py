"""Export a model for Neuron ahead of time, then upload it for SageMaker (S3) or the hub.

Compiling at start-up can take an hour, longer than a health check waits. This runs the
server's own exporter (`python -m handler.model.neuron_export`, in a subprocess as the server
does) with the shapes the endpoint will serve, on a machine with the Neuron SDK (the Neuron
image), then uploads the result::

    python -m deploy.export --model-id meta-llama/Llama-3.2-1B-Instruct \\
        --instance-type ml.inf2.xlarge --num-cores 2 --auto-cast-type bf16 \\
        --max-batch-size 4 --max-input-tokens 3686 --max-total-tokens 4096 \\
        --output exports/llama-inf2 --s3-uri s3://my-bucket/llama-inf2
    python -m deploy.export ... --output exports/llama-inf2 --hub-repo my-org/llama-inf2-neuron

`--s3-uri` uploads `model.tar.gz` (the export's files at the archive root, as SageMaker extracts
the archive into `/opt/ml/model`) and prints the `ModelDataUrl` for `python -m deploy.sagemaker
deploy --model-data-url`; the bucket must be in the endpoint's region. `--hub-repo` creates the
repository if needed and uploads the folder, for `python -m deploy.hf_endpoint --serve-from
mount`. Both print the deploy command with the matching settings: an exported model is served
only with the batch size, sequence length, cores and dtype it was compiled for.

A hub model's export does not hold its weights: the server fetches them from the hub when it
loads the export (gated models: deploy with `--with-hf-token`). A local model's export does.
The token of a gated model is read from `HF_TOKEN` by the exporter, never from the command line.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from deploy.instances import DeployError, ServingConfig, get_instance
from handler.config import DEFAULT_BATCH_SIZE, DEFAULT_TOTAL_TOKENS, positive_int_argument

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The exporter runs from here, so that `python -m handler...` finds the package."""
ARCHIVE_NAME = "model.tar.gz"
NEURON_CONFIG = "neuron_config.json"
FAMILIES = ("inf2", "trn1", "trn1n", "trn2")
"""Instance families `handler.model.neuron_export --instance-type` compiles for."""

Log = Callable[[str], None]


def export_command(
    model_id: str,
    output: Path,
    *,
    num_cores: int,
    batch_size: int,
    sequence_length: int,
    auto_cast_type: str | None = None,
    revision: str | None = None,
    instance_family: str | None = None,
    on_device_sampling: bool | None = None,
) -> list[str]:
    """The exporter's command line, in the server's own form (`neuron_cache.export_command`).
    `on_device_sampling` None keeps optimum-neuron's choice for the architecture."""
    command = [sys.executable, "-m", "handler.model.neuron_export", "--model-id", model_id]
    if revision:
        command += ["--revision", revision]
    command += [
        "--batch-size",
        str(batch_size),
        "--sequence-length",
        str(sequence_length),
        "--num-cores",
        str(num_cores),
    ]
    if auto_cast_type:
        command += ["--auto-cast-type", auto_cast_type]
    if instance_family:
        command += ["--instance-type", instance_family]
    if on_device_sampling is not None:
        command += ["--on-device-sampling", str(on_device_sampling).lower()]
    return [*command, "--output", str(output)]


def run_export(
    command: Sequence[str],
    output: Path,
    *,
    run: Callable[..., subprocess.CompletedProcess[Any]] | None = None,
) -> Path:
    """Run the exporter (its log goes to this terminal) and check it wrote an export.

    `run`: `subprocess.run` unless given.
    """
    run = run or subprocess.run
    if (output / NEURON_CONFIG).is_file():
        raise DeployError(
            f"{output} already holds an export: upload it with --skip-export, or delete it to "
            "export again"
        )
    if output.exists() and any(output.iterdir()):
        raise DeployError(f"--output {output} is not empty: choose a new directory")
    result = run(list(command), cwd=PROJECT_ROOT, check=False)
    if result.returncode != 0:
        raise DeployError(
            f"The export failed (exit code {result.returncode}); its log is above. It needs "
            "optimum-neuron and the Neuron SDK: run it in the Neuron image (requirements-"
            "neuron.txt), on an inf2 / trn1 instance or a machine with neuronx-cc"
        )
    if not (output / NEURON_CONFIG).is_file():
        raise DeployError(f"The exporter ended without writing {output / NEURON_CONFIG}")
    return output


def package(export_dir: Path, archive: Path) -> Path:
    """Write `archive` (gzip tar) with the files of `export_dir` at its root.

    SageMaker extracts `ModelDataUrl` into `/opt/ml/model`, so `neuron_config.json` must be a
    top-level member, not under a directory. Level 1 compression: weights and compiled graphs
    barely compress, and level 9 would take many times longer on tens of GB.
    """
    if not (export_dir / NEURON_CONFIG).is_file():
        raise DeployError(
            f"{export_dir} is not a Neuron export (no {NEURON_CONFIG}): export it first"
        )
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for entry in sorted(export_dir.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Bucket and key of `s3://bucket/prefix` (key `prefix/model.tar.gz`) or of a full
    `s3://bucket/key.tar.gz`."""
    if not uri.startswith("s3://"):
        raise DeployError(f"--s3-uri {uri!r} must look like s3://bucket/prefix")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise DeployError(f"--s3-uri {uri!r} names no bucket: use s3://bucket/prefix")
    if not key.endswith(".tar.gz"):
        key = f"{key.strip('/')}/{ARCHIVE_NAME}".lstrip("/")
    return bucket, key


def upload_to_s3(s3: BaseClient, export_dir: Path, s3_uri: str, *, log: Log = print) -> str:
    """Archive `export_dir` as `model.tar.gz`, upload it, and return its `ModelDataUrl`."""
    bucket, key = parse_s3_uri(s3_uri)
    with tempfile.TemporaryDirectory(dir=export_dir.parent, prefix=".archive-") as scratch:
        archive = package(export_dir, Path(scratch) / ARCHIVE_NAME)
        size_gb = archive.stat().st_size / 1e9
        log(f"Uploading {ARCHIVE_NAME} ({size_gb:.2f} GB) to s3://{bucket}/{key}")
        s3.upload_file(str(archive), bucket, key)
    return f"s3://{bucket}/{key}"


def upload_to_hub(
    export_dir: Path,
    repo_id: str,
    *,
    api: HfApi | None = None,
    private: bool = True,
    commit_message: str = "Neuron export",
    log: Log = print,
) -> str:
    """Create `repo_id` if needed and upload the export's files to its root; returns its URL."""
    api = api or HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    log(f"Uploading {export_dir} to {url}")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(export_dir),
        repo_type="model",
        commit_message=commit_message,
    )
    return str(url)


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-id", required=True, help="hub id or local model directory")
    parser.add_argument("--revision", help="hub revision")
    parser.add_argument(
        "--instance-type",
        required=True,
        help="where it will serve: a SageMaker type (ml.inf2.xlarge...; checks --num-cores) or "
        f"a family ({', '.join(FAMILIES)}; then --num-cores is required)",
    )
    parser.add_argument(
        "--num-cores", type=positive_int_argument, help="HF_NUM_CORES (default: all the instance's)"
    )
    parser.add_argument("--auto-cast-type", help="HF_AUTO_CAST_TYPE: bf16, fp16 or fp32")
    parser.add_argument(
        "--max-batch-size",
        type=positive_int_argument,
        default=DEFAULT_BATCH_SIZE,
        help=f"MAX_BATCH_SIZE, the compiled batch size (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-input-tokens",
        type=positive_int_argument,
        help="MAX_INPUT_TOKENS to deploy with (not compiled; checked against the total)",
    )
    parser.add_argument(
        "--max-total-tokens",
        type=positive_int_argument,
        default=DEFAULT_TOTAL_TOKENS,
        help=f"MAX_TOTAL_TOKENS, the compiled sequence length (default {DEFAULT_TOTAL_TOKENS})",
    )
    parser.add_argument(
        "--on-device-sampling",
        choices=("true", "false"),
        help="true: tokens are chosen on the device (temperature, top_k and top_p only); false: "
        "on the host, so that seeds, penalties, typical_p and log-probabilities work, at the "
        "cost of moving [batch, vocab] logits off the device each step. Default: optimum-"
        "neuron's choice for the architecture (Llama: true)",
    )
    parser.add_argument("--output", required=True, type=Path, help="export directory (new)")
    parser.add_argument(
        "--skip-export", action="store_true", help="upload an existing export in --output"
    )
    parser.add_argument("--s3-uri", help="s3://bucket/prefix: upload model.tar.gz there")
    parser.add_argument("--hub-repo", help="hub repository to upload the export to")
    parser.add_argument(
        "--public", action="store_true", help="create --hub-repo public (default private)"
    )
    parser.add_argument("--region", help="AWS region of the bucket (default: the configured one)")
    return parser


def _deploy_flags(serving: ServingConfig) -> str:
    """The serving flags the export must be deployed with."""
    flags = ["--num-cores", str(serving.num_cores)]
    if serving.auto_cast_type:
        flags += ["--auto-cast-type", serving.auto_cast_type]
    flags += ["--max-batch-size", str(serving.max_batch_size)]
    if serving.max_input_tokens:
        flags += ["--max-input-tokens", str(serving.max_input_tokens)]
    flags += ["--max-total-tokens", str(serving.max_total_tokens)]
    return " ".join(flags)


def main(argv: Sequence[str] | None = None, *, log: Log = print) -> int:
    """Command line; returns the exit status (1 with a message on stderr when refused)."""
    args = _parser().parse_args(argv)
    try:
        family, instance = args.instance_type, None
        if family not in FAMILIES:
            instance = get_instance(args.instance_type)
            family = instance.family
        num_cores = args.num_cores or (instance.neuron_cores if instance else None)
        if num_cores is None:
            raise DeployError(f"--instance-type {family} needs --num-cores")
        serving = ServingConfig(
            model_id=args.model_id,
            revision=args.revision,
            num_cores=num_cores,
            auto_cast_type=args.auto_cast_type,
            max_batch_size=args.max_batch_size,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
        )
        serving.check(instance)
        serving_env = serving.environment()
        output = args.output.resolve()
        if args.skip_export:
            if not (output / NEURON_CONFIG).is_file():
                raise DeployError(f"--skip-export but {output} holds no {NEURON_CONFIG}")
        else:
            command = export_command(
                args.model_id,
                output,
                num_cores=num_cores,
                batch_size=args.max_batch_size,
                sequence_length=args.max_total_tokens,
                auto_cast_type=serving_env.get("HF_AUTO_CAST_TYPE"),
                revision=args.revision,
                instance_family=family,
                on_device_sampling=(
                    None if args.on_device_sampling is None else args.on_device_sampling == "true"
                ),
            )
            log(f"Exporting: {shlex.join(command)}")
            run_export(command, output)
        log(f"Exported model: {output}")
        flags = _deploy_flags(serving)
        if args.s3_uri:
            url = upload_to_s3(boto3.client("s3", region_name=args.region), output, args.s3_uri)
            log(f"ModelDataUrl: {url}")
            log(
                "Deploy it: python -m deploy.sagemaker deploy --endpoint-name NAME --image IMAGE "
                f"--role ROLE --instance-type {instance.name if instance else 'TYPE'} "
                f"--model-data-url {url} {flags}"
            )
        if args.hub_repo:
            repo_url = upload_to_hub(
                output,
                args.hub_repo,
                private=not args.public,
                commit_message=(
                    f"Neuron export of {args.model_id}: batch size {args.max_batch_size}, "
                    f"sequence length {args.max_total_tokens}, {num_cores} cores"
                ),
            )
            log(f"Hub repository: {repo_url}")
            log(
                "Deploy it: python -m deploy.hf_endpoint --name NAME --image IMAGE "
                f"--repository {args.hub_repo} --serve-from mount "
                f"--instance-size x{-(-num_cores // 2)} {flags}"
            )
        if (args.s3_uri or args.hub_repo) and not Path(args.model_id).is_dir():
            log(
                f"The export holds no weights: the server fetches those of {args.model_id} from "
                "the hub when it loads. For a gated model, deploy with --with-hf-token"
            )
    except (DeployError, ClientError, BotoCoreError, HfHubHTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
