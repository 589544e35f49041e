"""The Inference Endpoints custom-handler convention, on the same generator as the server.

The stock Inference Endpoints toolkit imports `EndpointHandler` from a repository's `handler.py`,
builds it once with the model directory and calls it with each request's JSON. Ours answers
`{"inputs", "parameters"}` exactly like TGI's POST `/`: a list holding one generate response.
It is non-streaming; errors are raised as `ServingError`s (their `status` and `error_type` are
TGI's), which the toolkit turns into error responses.
"""

from __future__ import annotations

import os
from typing import Any

from handler.api import tgi
from handler.api.common import ApiContext, parse
from handler.api.submission import RequestMetrics, Submission
from handler.config import read_settings
from handler.engine import Engine, load_engine
from handler.server.metrics import Metrics


class EndpointHandler:
    """`EndpointHandler(path)(data)`: `data` holds `inputs` and optional `parameters`."""

    def __init__(self, path: str = "", environ: dict[str, str] | None = None) -> None:
        """Load the model at `path` (the toolkit passes the repository directory; empty: the
        model the settings name). Settings come from the environment, as for the server."""
        environ = dict(os.environ if environ is None else environ)
        if path:
            environ["HF_MODEL_ID"] = path
        settings = read_settings([], environ)
        self.metrics = Metrics()
        self.engine: Engine = load_engine(
            settings, lambda stage: None, on_step=self.metrics.step, environ=environ
        )

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        with RequestMetrics(self.metrics) as counted:
            body = parse(tgi.GenerateRequest, data)
            call = tgi.validate(ApiContext.of(self.engine), body, streaming=False, full_text=True)
            handle = self.engine.generator.submit(call.request)
            tokens, final = Submission(handle, "EndpointHandler", counted).result()
        return [tgi.response(call, tokens, final)]

    def close(self) -> None:
        """Stop the scheduler thread (the toolkit never calls it; tests do)."""
        self.engine.generator.stop()
