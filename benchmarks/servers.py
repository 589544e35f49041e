"""Servers under test, each started in its own process group and stopped with all its children.

Our server is `python -m handler serve` (gunicorn master and one worker). The peer (see
`benchmarks.peer`) is a Python launcher, a Java front end and Python workers; some of them outlive
their parent, so a server is stopped by signalling its whole process group, never by name.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests


def free_port(below: int | None = None) -> int:
    """A port free on 127.0.0.1 now; with `below`, one under that number (the kernel's own
    picks are in the ephemeral range, above 32767 here)."""
    candidates = [0] if below is None else random.sample(range(20_000, below), 200)
    for candidate in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free port below {below}")


@dataclass
class ServerProcess:
    """A server started with `start_new_session=True`: its pid is its process group id."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        port: int,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> ServerProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(command),
                env=dict(env),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, f"http://127.0.0.1:{port}", process, log_path)

    @property
    def pgid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, path: str, timeout_s: float, ready: Any = None) -> None:
        """Poll GET `path` until it answers 200 (and `ready(response)` holds, when given)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                response = requests.get(f"{self.url}{path}", timeout=5)
                if response.status_code == 200 and (ready is None or ready(response)):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"{self.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `grace_s`."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._group_alive():
            time.sleep(0.2)
            self.process.poll()
        if self._group_alive():
            self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        # Our own child lingers as a zombie until reaped: reap it, then ask again.
        if self.process.poll() is not None:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return False
        return True

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


COMPILE_CACHE_ENV: Mapping[str, str] = {
    "TORCH_COMPILE_CACHE": "compiled-steps",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
}
"""The environment variables that point our server's compile caches at a directory (each to its
own folder in it): our compiled-step packages and inductor's own cache. A fresh directory gives
the first start (compiling), the same one again the restart. Change it here if the server's
settings change."""

EAGER_ENV: Mapping[str, str] = {"TORCH_COMPILE": "0"}
"""The environment that turns our server's compiled model step off: its eager start, which the
restart's ready time is compared with. Change it here if the server's settings change."""


def compile_cache_env(directory: Path) -> dict[str, str]:
    return {name: str(directory / folder) for name, folder in COMPILE_CACHE_ENV.items()}


def start_ours(
    model_dir: str,
    batch_size: int,
    max_total_tokens: int,
    log_dir: Path,
    dtype: str | None = None,
    timeout_s: float = 1800.0,
    extra_env: Mapping[str, str] | None = None,
    log_name: str | None = None,
) -> ServerProcess:
    """`python -m handler serve` with `batch_size` slots of `max_total_tokens`, ready to serve
    (`/health` answers 200: warm-up, compiling included, is done)."""
    port = free_port()
    env = {
        **os.environ,
        "MAX_BATCH_SIZE": str(batch_size),
        "MAX_TOTAL_TOKENS": str(max_total_tokens),
        "SHUTDOWN_GRACE_SECONDS": "5",
        **(extra_env or {}),
    }
    if dtype:
        env["HF_AUTO_CAST_TYPE"] = dtype
    command = [sys.executable, "-m", "handler", "serve", "--model-id", model_dir]
    command += ["--hostname", "127.0.0.1", "--port", str(port)]
    server = ServerProcess.start(
        f"our server (batch {batch_size})",
        command,
        port,
        env,
        log_dir / f"{log_name or f'ours-b{batch_size}'}.log",
    )
    server.wait_ready("/health", timeout_s)
    return server
