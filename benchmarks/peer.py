"""The peer: the SageMaker Hugging Face inference toolkit, the stack of the classic HF containers.

`sagemaker-huggingface-inference-toolkit` 2.6.0 with its `mms` extra (Multi Model Server: a Java
front end, needs `java` on PATH, Debian's `openjdk-17-jre-headless`) serves a `transformers`
`pipeline` one request at a time per worker. It lives in its own virtual environment outside the
repository (its pins clash with ours), created once:

    python -m benchmarks.peer --setup

Started as the container does (`serve`), with `HF_TASK=text-generation`, one worker, and the
model directory where the toolkit reads it: `$SAGEMAKER_BASE_DIR/model` (`/opt/ml/model` by
default), here a symlink to the SmolLM2 directory in a scratch base directory. MMS keeps its pid
file and worker sockets in the temp dir (a scratch one here, so another MMS on the machine does
not clash), but the toolkit writes its MMS configuration to the fixed path
`/etc/sagemaker-mms.properties`, read by Java at start: start one peer at a time on a machine.

    python -m benchmarks.peer --smoke     # start it, answer one request, stop it
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from benchmarks.servers import ServerProcess, free_port

TOOLKIT = "sagemaker-huggingface-inference-toolkit[mms]==2.6.0"
INSTALL_STEPS: tuple[tuple[str, ...], ...] = (
    # torch first and alone: the pinned CPU build comes from the machine's local wheel.
    ("torch==2.13.0",),
    ("transformers==4.57.6",),
    # setuptools<81 still ships pkg_resources, which sagemaker-inference imports.
    (TOOLKIT, "setuptools<81", "protobuf", "sentencepiece"),
)
STAMP = ".hf-neuron-serving-peer-" + hashlib.sha1(repr(INSTALL_STEPS).encode()).hexdigest()[:12]
START_TIMEOUT_S = 600.0


def default_venv() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hf-neuron-serving" / "peer-venv"


def ensure_venv(venv: Path) -> Path:
    """Create the peer's virtual environment unless it is complete; return it.

    A stamp named after the install steps marks it complete, so changing a pin re-installs.
    """
    if (venv / STAMP).is_file():
        return venv
    if shutil.which("java") is None:
        raise SystemExit(
            "the peer's Multi Model Server needs Java: apt-get install openjdk-17-jre-headless"
        )
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for step in INSTALL_STEPS:
        command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *step]
        print(f"[peer] {' '.join(command)}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    (venv / STAMP).touch()
    return venv


def start_peer(model_dir: str, venv: Path, work_dir: Path) -> ServerProcess:
    """Start the toolkit's `serve` on a free port with one worker; return it once it answers.

    The workers are spawned by the Java front end with the `python` of PATH, so the venv's `bin`
    goes first on PATH (or the workers would import the toolkit from the wrong environment).
    """
    base = work_dir / "opt-ml"
    base.mkdir(parents=True, exist_ok=True)
    link = base / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    tmp = work_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    # MMS refuses ports above 32767 ("Invalid port number").
    port = free_port(below=32_767)
    bin_dir = venv / "bin"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "SAGEMAKER_BASE_DIR": str(base),
        "HF_TASK": "text-generation",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        "SAGEMAKER_BIND_TO_PORT": str(port),
        # Seconds a worker may take for one answer; queued requests wait in the front end.
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "900",
        "HF_HUB_OFFLINE": "1",
        # MMS keeps its pid file (one server per temp dir) and worker sockets in the temp dir.
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
    }
    server = ServerProcess.start(
        "peer (SageMaker HF inference toolkit)",
        [str(bin_dir / "serve")],
        port,
        env,
        work_dir / "peer.log",
        cwd=work_dir,
    )
    try:
        server.wait_ready("/ping", START_TIMEOUT_S, ready=_healthy)
        # /ping is healthy once the worker connects; its model loads on the first request.
        warm = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "do_sample": False}}
        response = requests.post(f"{server.url}/invocations", json=warm, timeout=START_TIMEOUT_S)
        response.raise_for_status()
    except BaseException:
        server.stop()
        raise
    return server


def _healthy(response: requests.Response) -> bool:
    try:
        return response.json().get("status") == "Healthy"
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> None:
    from handler.testing.smollm2 import ensure_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__)
    parser.add_argument("--venv", type=Path, default=default_venv())
    parser.add_argument("--setup", action="store_true", help="create the virtual environment")
    parser.add_argument("--smoke", action="store_true", help="start, send one request, stop")
    args = parser.parse_args(argv)
    venv = ensure_venv(args.venv)
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="peer-"))
        with start_peer(str(ensure_model()), venv, work) as server:
            body = {
                "inputs": "The history of the Roman Empire began",
                "parameters": {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False},
            }
            start = time.perf_counter()
            answer = requests.post(f"{server.url}/invocations", json=body, timeout=120)
            print(f"{answer.status_code} in {time.perf_counter() - start:.2f} s: {answer.text}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
