"""Run the Flask app under gunicorn: one worker process that owns the model, many threads.

- One worker: a second would load a second model and, on Neuron, grab the same cores.
- Threads (`gthread`): one per stream up to `MAX_CONCURRENT_REQUESTS`, plus spares so that
  health checks and 429 answers never wait behind generations. A thread gets a request only once
  it has been read whole: the worker's event loop reads requests, with deadlines, and caps open
  connections (`handler.server.front`), so slow or idle clients hold no thread.
- The master binds the port before the worker starts; the worker loads the model in a
  background thread, so `/ping` answers 503 with the loading stage at once. gunicorn's worker
  timeout (`WORKER_TIMEOUT`, 120 s) does not apply while the model loads: a native call holding
  the GIL that long (weights read, graphs loaded onto the Neuron cores) stops the worker's main
  loop and its heartbeat too, and the master would kill the worker and start the load over
  (`LoadingHeartbeat`). Once loaded, the timeout applies again. If loading fails the worker
  exits with gunicorn's boot-error code and the server stops with the reason logged.
- SIGTERM: the worker stops admitting (new requests get 503), lets running generations finish
  within `SHUTDOWN_GRACE_SECONDS` (default 20, under SageMaker's 30 s before SIGKILL), then
  closes; the master exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.workertmp import WorkerTmp

from handler.config import Settings
from handler.server.app import SEND_TIMEOUT_SECONDS, create_app
from handler.server.front import FrontThreadWorker, error_response
from handler.server.metrics import Metrics
from handler.server.state import ServerState

logger = logging.getLogger(__name__)

SPARE_THREADS = 8
WORKER_TIMEOUT = 120
"""gunicorn's `timeout` (s): the master restarts a worker whose main loop has not checked in for
this long, except while the model loads (`LoadingHeartbeat`)."""
_state: ServerState | None = None
"""The worker's state, for its SIGTERM handler (set in the worker process by `load`)."""
_heartbeat: LoadingHeartbeat | None = None
"""The worker's heartbeat (set in the worker process before `load`)."""


class LoadingHeartbeat:
    """A worker's heartbeat file (gunicorn's `WorkerTmp`) that reads as current while the worker
    loads the model.

    The master kills a worker whose heartbeat is older than the timeout. Within `loading()`,
    `last_update` is +inf; after it, the later of the file's time and the end of the load, so
    that a load ending in a long GIL-holding call does not get the worker killed either. The
    mark is in memory shared with the master, allocated there before the fork; both read the
    system-wide monotonic clock, as gunicorn's own heartbeat does.
    """

    def __init__(self, tmp: WorkerTmp) -> None:
        self.tmp = tmp
        self.mark = multiprocessing.RawValue(ctypes.c_double, 0.0)

    def notify(self) -> None:
        self.tmp.notify()

    def last_update(self) -> float:
        return max(self.tmp.last_update(), self.mark.value)

    def fileno(self) -> int:
        return self.tmp.fileno()

    def close(self) -> None:
        self.tmp.close()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """While the body runs, the worker counts as alive however long its main loop stalls."""
        self.mark.value = math.inf
        try:
            yield
        finally:
            self.mark.value = time.monotonic()


class DrainingWorker(FrontThreadWorker):
    """A gthread worker (with the connection front) whose SIGTERM drains the generator before it
    stops listening, and whose heartbeat reads as current while the model loads."""

    tmp: LoadingHeartbeat
    """gunicorn's heartbeat file (`WorkerTmp`), wrapped once the base class has made it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # in the master, before the fork
        self.tmp = LoadingHeartbeat(self.tmp)

    def init_process(self) -> None:
        global _heartbeat
        _heartbeat = self.tmp
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = _state
        if state is None or state.engine is None or getattr(self, "_draining", False):
            super().handle_exit(sig, frame)  # nothing to drain (still loading): stop now
            return
        self._draining = True

        def drain() -> None:
            state.drain(state.settings.shutdown_grace)
            FrontThreadWorker.handle_exit(self, sig, frame)

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
    gunicorn_util.write_nonblock(sock, error_response(status, reason, message))


class ServingApplication(BaseApplication):
    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        worker_timeout: int = WORKER_TIMEOUT,
    ) -> None:
        """`settings`: the process's, read once. `environ`: the process environment, which a
        Neuron export process inherits."""
        self.settings = settings
        self.environ = dict(environ)
        self.worker_timeout = worker_timeout
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        threads = settings.max_concurrent_requests + SPARE_THREADS
        DrainingWorker.configure(
            header_timeout=settings.request_header_timeout,
            body_timeout=settings.request_body_timeout,
            body_min_rate=settings.request_body_min_rate,
            max_connections=settings.max_connections,
            max_body=settings.payload_limit,
        )
        config = {
            "bind": f"{settings.hostname}:{settings.port}",
            "workers": 1,
            "worker_class": DrainingWorker,
            "threads": threads,
            # Unused by the front, which caps connections itself; set above the threads so that
            # gunicorn does not warn that no connection can be kept alive.
            "worker_connections": max(1000, 2 * threads),
            "timeout": self.worker_timeout,
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

        heartbeat = _heartbeat

        def loader(state: ServerState) -> Any:
            with heartbeat.loading() if heartbeat else contextlib.nullcontext():
                from handler.engine import load_engine  # torch loads here, not before binding

                engine = load_engine(
                    settings,
                    state.report,
                    on_step=metrics.step,
                    environ=self.environ,
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


def serve(settings: Settings, environ: Mapping[str, str]) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    ServingApplication(settings, environ).run()
    return 0
