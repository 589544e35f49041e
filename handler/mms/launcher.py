"""`SERVING_STACK=mms python -m handler serve`: Multi Model Server started by the SageMaker
inference toolkit (`start_model_server`), with `handler.mms.handler_service` in one worker.

- MMS's Java frontend answers `/ping` and `/invocations` on the settings' port (the toolkit
  binds 0.0.0.0); its one Python worker loads the model once (`model_fn`) with the settings the
  HTTP server would use. One worker: each is a process that would load its own copy of the
  model and, on Neuron, claim its own cores.
- The worker reads only its environment, so flags reach it as environment variables
  (`flags_as_environ`); the port and the worker count reach the toolkit as
  `SAGEMAKER_BIND_TO_PORT` and `SAGEMAKER_MODEL_SERVER_WORKERS`.
- The toolkit writes MMS's configuration to `/etc/sagemaker-mms.properties`; it goes to a
  temporary directory instead, with MMS's logs, sockets and pid file (unless `LOG_LOCATION` or
  `TEMP` say otherwise), so the image's unprivileged user can start it. The model directory is
  the toolkit's (`$SAGEMAKER_BASE_DIR/model`, default `/opt/ml/model`).
- What MMS cannot honour stops start-up (exit status 2): a port from 32767 up, an API key.
- SIGTERM reaches MMS through the toolkit; `serve` returns when the Java frontend exits, after
  ending what MMS leaves behind: its worker's listening process outlives the frontend, so this
  process adopts orphaned descendants (Linux child subreaper) and ends them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from handler.config import ConfigError, Settings, flags_as_environ

logger = logging.getLogger(__name__)

HANDLER_SERVICE = "handler.mms.handler_service"
CODE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the `handler` package, which the worker must import."""
MB = 1024 * 1024
MAX_PORT = 32766
"""MMS refuses ports from 32767 up (`Connector.parse`)."""
PR_SET_CHILD_SUBREAPER = 36
"""`prctl` option (linux/prctl.h): orphaned descendants are re-parented to the caller."""


def mms_environ(
    settings: Settings, argv: Sequence[str], environ: Mapping[str, str]
) -> dict[str, str]:
    """The environment of MMS and its worker: the flags as variables, one worker on the
    settings' port, the payload limit in MMS's unit (MB, rounded up), this interpreter's
    `multi-model-server` and this code first on the paths. Raises `ConfigError` for settings
    MMS cannot honour."""
    problems = []
    if settings.port > MAX_PORT:
        problems.append(
            f"Multi Model Server takes ports up to {MAX_PORT}, not {settings.port}: choose "
            "another port (--port, SAGEMAKER_BIND_TO_PORT or PORT)"
        )
    if settings.api_key:
        problems.append(
            "API_KEY / --api-key is set, but Multi Model Server has no authentication and "
            "would serve without it: unset it"
        )
    if problems:
        raise ConfigError(
            "SERVING_STACK=mms cannot start:\n"
            + "".join(f"  - {problem}\n" for problem in problems)
            + "  (or serve with the default SERVING_STACK=gunicorn)"
        )
    out = flags_as_environ(argv, environ)
    out["SAGEMAKER_BIND_TO_PORT"] = str(settings.port)
    out["SAGEMAKER_MODEL_SERVER_WORKERS"] = "1"
    out.setdefault("SAGEMAKER_MAX_PAYLOAD_IN_MB", str(math.ceil(settings.payload_limit / MB)))
    out["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), out.get("PATH", os.defpath)])
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), out.get("PYTHONPATH")]))
    return out


def find_java(environ: Mapping[str, str]) -> str | None:
    """The `java` MMS will run: `$JAVA_HOME/bin/java`, else the first on `PATH`."""
    java_home = environ.get("JAVA_HOME")
    if java_home:
        java = Path(java_home, "bin", "java")
        return str(java) if java.is_file() else None
    return shutil.which("java", path=environ.get("PATH"))


def serve(settings: Settings, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Start MMS and wait for it. Returns the exit status: 0 when it stopped on SIGTERM, 1 when it
    ended by itself, 2 when it could not be started."""
    try:
        child = mms_environ(settings, argv, environ)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if find_java(child) is None:
        sys.stderr.write(
            "SERVING_STACK=mms needs Java 11 or later for Multi Model Server's frontend: install "
            "it (Debian: openjdk-17-jre-headless) or set JAVA_HOME, or serve with the default "
            "SERVING_STACK=gunicorn\n"
        )
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="mms-"))
    for name in ("LOG_LOCATION", "METRICS_LOCATION", "TEMP"):  # MMS's logs, sockets, pid file
        child.setdefault(name, str(run_dir))
    # The toolkit and MMS read their settings from this process's environment.
    os.environ.clear()
    os.environ.update(child)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        from sagemaker_inference import environment, model_server

    problem = prepare_model_dir(Path(environment.model_dir), named=settings.model_id is not None)
    if problem:
        sys.stderr.write(f"{problem}\n")
        return 2
    model_server.MMS_CONFIG_FILE = str(run_dir / "mms.properties")
    logger.info(
        "starting Multi Model Server on port %d with one worker; model directory %s, "
        "configuration and logs in %s",
        settings.port,
        environment.model_dir,
        child["LOG_LOCATION"],
    )
    adopt_orphans()
    stop_requested = watch_stop_signals()
    try:
        model_server.start_model_server(handler_service=HANDLER_SERVICE)
    finally:
        end_descendants()
    if stop_requested():
        return 0
    logger.error("Multi Model Server exited without being asked to: its log above says why")
    return 1


def prepare_model_dir(model_dir: Path, named: bool) -> str | None:
    """MMS registers its model from the toolkit's model directory, so it must exist, even empty
    when the settings name the model (`named`). Returns what is wrong, if anything."""
    if model_dir.is_dir():
        return None
    if not named:
        return (
            f"No model to serve: {model_dir} (SageMaker model data, $SAGEMAKER_BASE_DIR/model) "
            "does not exist and HF_MODEL_ID / --model-id is not set"
        )
    try:
        model_dir.mkdir(parents=True)
    except OSError as exc:
        return (
            f"MMS needs the model directory {model_dir}, which cannot be created ({exc}): set "
            "SAGEMAKER_BASE_DIR to a writable directory"
        )
    return None


def watch_stop_signals() -> Callable[[], bool]:
    """A check that SIGTERM or SIGINT has reached this process since the call. The toolkit
    installs its own SIGTERM handler (it forwards the signal to MMS), so this reads the signal
    wakeup pipe, which sees every signal a Python handler receives, whoever installed it."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    received: set[int] = set()

    def requested() -> bool:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 4096):
                received.update(chunk)
        return bool(received & {signal.SIGTERM, signal.SIGINT})

    return requested


def adopt_orphans() -> None:
    """Become the parent of orphaned descendants (Linux), so that `end_descendants` finds
    MMS's worker after its Java parent has gone. Elsewhere, a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("cannot adopt MMS's orphaned processes: errno %d", ctypes.get_errno())


def end_descendants(grace: float = 5.0) -> None:
    """Terminate this process's descendants, then kill those still there after `grace` s (the
    MMS worker ignores SIGTERM)."""
    # The toolkit's SIGCHLD handler would reap them first and log an error when none is left.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=grace)
    for process in alive:
        logger.warning("killing MMS process %d, still running after SIGTERM", process.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
