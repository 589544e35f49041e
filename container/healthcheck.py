#!/usr/bin/env python3
"""Docker HEALTHCHECK: exit 0 when the server's GET /ping answers 200, else 1 (/ping: both
serving stacks have it, Multi Model Server has no /health).

Usage: `healthcheck [PID]`. The port is found as the server finds it: a `--port` flag of the
server process (PID, default 1: in the container the entrypoint execs the server, so it is PID 1),
else `SAGEMAKER_BIND_TO_PORT`, else `PORT`, else 8080.

Standard library only, so it runs in every image (the slim one has no curl). SageMaker and
Inference Endpoints probe /ping and /health themselves; this serves `docker run` and compose.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_PORT = 8080
TIMEOUT_SECONDS = 4.0


def server_argv(cmdline: Path = Path("/proc/1/cmdline")) -> list[str]:
    """The arguments of the `python -m handler serve` process, or [] when PID 1 is another one."""
    try:
        argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    return argv if "handler" in argv and "serve" in argv else []


def health_port(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`--port` in `argv` (last one wins, as argparse does), else the environment, else 8080."""
    port: str | None = None
    for index, arg in enumerate(argv):
        if arg == "--port" and index + 1 < len(argv):
            port = argv[index + 1]
        elif arg.startswith("--port="):
            port = arg.removeprefix("--port=")
    for name in ("SAGEMAKER_BIND_TO_PORT", "PORT"):
        if port is None and environ.get(name, "").strip():
            port = environ[name]
    return int(port.strip()) if port else DEFAULT_PORT


def healthy(port: int) -> bool:
    """True when GET /ping on this machine answers 200 (503 while loading or draining)."""
    url = f"http://127.0.0.1:{port}/ping"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status (503 while loading)
        return False


def main(argv: Sequence[str]) -> int:
    pid = argv[0] if argv else "1"
    try:
        port = health_port(server_argv(Path(f"/proc/{int(pid)}/cmdline")), os.environ)
    except ValueError as exc:
        sys.stderr.write(f"healthcheck: no usable port: {exc}\n")
        return 1
    return 0 if healthy(port) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
