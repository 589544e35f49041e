"""The export cache: where an exported Neuron model is saved under a key of everything that
shapes it, found again by the next start, and the separate process that makes one.

An export is written by `python -m handler.model.neuron_export` into a temporary directory next
to its key's and renamed into place once complete, so that an interrupted export is never
mistaken for a saved one (`save_export`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from handler.config import Settings
from handler.errors import ConfigError
from handler.model.neuron_contract import is_exported

logger = logging.getLogger(__name__)
export_log = logging.getLogger("handler.model.neuron_export")

EXPORTS_DIRNAME = "neuron-exports"
EXPORT_LOG_TAIL = 30
"""Lines of the export process's log quoted when it fails."""
PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


# --- the export process ---------------------------------------------------------------------


def describe_export(model: str, revision: str | None, settings: Settings, dtype: str) -> str:
    """The model, its revision or directory, and the shapes of an export, for messages."""
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


def export_command(
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


def shown_command(model: str, revision: str | None, settings: Settings, dtype: str) -> str:
    """The export command for a user to run, writing to `DIR`."""
    command = export_command(model, revision, settings, dtype, Path("DIR"))
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


def save_export(
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
    command = export_command(model, revision, settings, dtype, partial)
    logger.info("Exporting in a separate process: %s", " ".join(command))
    try:
        returncode, tail = _run(command, _export_environ(settings, environ))
        if returncode != 0:
            lines = "\n".join(f"    {line}" for line in tail) or "    (no output)"
            raise ConfigError(
                f"Exporting {describe_export(model, revision, settings, dtype)} failed (exit code "
                f"{returncode}). Last lines of its log:\n{lines}\nFix the cause above, or export "
                "ahead of time with the same command on a Neuron machine and serve DIR "
                f"(HF_MODEL_ID=DIR): {shown_command(model, revision, settings, dtype)}"
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
