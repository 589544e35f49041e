"""Run the Flask app under gunicorn: one worker process that owns the model, many threads.

- One worker: a second would load a second model and, on Neuron, grab the same cores.
- Threads (`gthread`): one per stream up to `MAX_CONCURRENT_REQUESTS`, plus spares so that
  health checks and 429 answers never wait behind generations.
- The master binds the port before the worker starts; the worker loads the model in a
  background thread, so `/ping` answers 503 with the loading stage at once and the worker's
  heartbeat keeps running (no worker timeout however long loading takes). If loading fails the
  worker exits with gunicorn's boot-error code and the server stops with the reason logged.
- SIGTERM: the worker stops admitting (new requests get 503), lets running generations finish
  within `SHUTDOWN_GRACE_SECONDS` (default 20, under SageMaker's 30 s before SIGKILL), then
  closes; the master exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.gthread import ThreadWorker

from handler.config import Settings
from handler.server.app import SEND_TIMEOUT_SECONDS, create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState

logger = logging.getLogger(__name__)

SPARE_THREADS = 8
_state: ServerState | None = None
"""The worker's state, for its SIGTERM handler (set in the worker process by `load`)."""


class DrainingWorker(ThreadWorker):
    """A gthread worker whose SIGTERM drains the generator before it stops listening."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = _state
        if state is None or state.engine is None or getattr(self, "_draining", False):
            super().handle_exit(sig, frame)  # nothing to drain (still loading): stop now
            return
        self._draining = True

        def drain() -> None:
            state.drain(state.settings.shutdown_grace)
            ThreadWorker.handle_exit(self, sig, frame)

        threading.Thread(target=drain, name="drain", daemon=True).start()


class StalledClientFilter(logging.Filter):
    """gunicorn logs a write that timed out (`SEND_TIMEOUT_SECONDS`) as a socket error with a
    traceback; it is a client that stopped reading, which the request log line already names."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, TimeoutError):
            record.msg = "a write to a client blocked for %g s: connection closed"
            record.args = (SEND_TIMEOUT_SECONDS,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def write_json_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it cannot parse (a bad request line or header, before the
    app sees it) with TGI's error body instead of an HTML page."""
    error_type = reason.lower().replace(" ", "_")
    body = json.dumps(
        {"error": f"{reason}: {message}" if message else reason, "error_type": error_type}
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn_util.write_nonblock(sock, (head + body).encode("latin-1"))


class ServingApplication(BaseApplication):
    def __init__(self, settings: Settings, argv: Sequence[str], environ: Mapping[str, str]) -> None:
        """`argv` and `environ` are kept to read the settings again with the compiled shapes of
        an exported Neuron model."""
        self.settings = settings
        self.argv = list(argv)
        self.environ = dict(environ)
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        threads = settings.max_concurrent_requests + SPARE_THREADS
        config = {
            "bind": f"{settings.hostname}:{settings.port}",
            "workers": 1,
            "worker_class": DrainingWorker,
            "threads": threads,
            "worker_connections": max(1000, 2 * threads),
            "timeout": 120,
            "graceful_timeout": int(settings.shutdown_grace) + 5,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
        }
        for key, value in config.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Runs in the worker process: start loading, return the app at once."""
        global _state
        settings = self.settings
        state = ServerState(settings)
        metrics = Metrics()
        _state = state
        logging.getLogger("gunicorn.error").addFilter(StalledClientFilter())
        # gunicorn has no hook for the body of the errors it answers itself.
        gunicorn_util.write_error = write_json_error

        def loader(state: ServerState) -> Any:
            from handler.engine import load_engine  # torch loads here, not before binding

            engine = load_engine(
                settings, state.report, on_step=metrics.step, argv=self.argv, environ=self.environ
            )
            metrics.track(
                lambda: engine.generator.queue_size, lambda: engine.generator.active_slots
            )
            return engine

        def give_up() -> None:
            logging.shutdown()
            os._exit(Arbiter.WORKER_BOOT_ERROR)

        state.load(loader, on_failure=give_up)
        return create_app(state, metrics)


def serve(settings: Settings, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    ServingApplication(settings, argv, environ).run()
    return 0
