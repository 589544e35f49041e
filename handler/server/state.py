"""The server's life: starting, loading in the background, ready, draining, failed.

The worker binds its port before the model is loaded, so health checks get an answer at once:
503 with the stage while loading, 200 once warmed up, 503 again while draining or when the
scheduler thread has died (SageMaker then replaces the instance).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from handler.config import Settings
from handler.errors import UnavailableError

if TYPE_CHECKING:
    from handler.engine import Engine

logger = logging.getLogger(__name__)


class Stage(StrEnum):
    STARTING = "starting"
    DOWNLOADING = "downloading"
    COMPILING = "compiling"
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ServerState:
    """Shared by the request threads, the loading thread and the signal handler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stage = Stage.STARTING
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.error: Exception | None = None
        """What made loading fail, if it did."""
        self.loaded = threading.Event()
        """Set once loading has ended, whether it succeeded or failed."""
        self.started_at = time.time()

    def report(self, stage: str) -> None:
        self.stage = Stage(stage)
        logger.info("start-up stage: %s", self.stage.value)

    def load(self, loader: Callable[[ServerState], Engine], on_failure: Callable[[], None]) -> None:
        """Load in a background thread; `on_failure` runs if loading fails (the HTTP server's
        exits; `loaded` is set before it runs)."""

        def run() -> None:
            try:
                engine = loader(self)
            except Exception as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                self.error = exc
                self.stage = Stage.FAILED
                logger.error("loading the model failed: %s", self.failure, exc_info=exc)
                self.loaded.set()
                on_failure()
                return
            self.engine = engine
            if self.stage is not Stage.DRAINING:
                self.stage = Stage.READY
                logger.info("ready to serve %s", engine.model_id)
            self.loaded.set()

        threading.Thread(target=run, name="loader", daemon=True).start()

    @property
    def ready(self) -> bool:
        return (
            self.stage is Stage.READY and self.engine is not None and self.engine.generator.healthy
        )

    def status(self) -> tuple[int, dict[str, str]]:
        """The health check answer: status code and JSON body."""
        if self.ready:
            return 200, {"status": "ready"}
        if self.engine is not None and self.engine.generator.failure:
            reason = self.engine.generator.failure
            stage = "failed"
        elif self.stage is Stage.DRAINING:
            reason, stage = "The server is shutting down", self.stage.value
        elif self.stage is Stage.FAILED:
            reason, stage = f"Loading the model failed: {self.failure}", self.stage.value
        else:
            reason, stage = f"The model is not ready yet ({self.stage.value})", self.stage.value
        return 503, {"error": reason, "error_type": "healthcheck", "status": stage}

    def require_engine(self) -> Engine:
        """The engine for a generation request, or 503 while loading or draining."""
        if not self.ready:
            raise UnavailableError(self.status()[1]["error"])
        assert self.engine is not None
        return self.engine

    def drain(self, grace: float) -> None:
        """Refuse new requests, give running ones `grace` seconds, stop the scheduler."""
        self.stage = Stage.DRAINING
        if self.engine is not None:
            in_flight = self.engine.generator.in_flight
            logger.info("draining: %d requests in flight, %.0f s grace", in_flight, grace)
            self.engine.generator.stop(grace)
            logger.info("drained: %d requests left", self.engine.generator.in_flight)
