"""The SageMaker inference toolkit's script contract, on the same engine as the HTTP server.

The toolkit's `Transformer` calls `model_fn(model_dir)` once per worker, then for each request
`input_fn(body, content_type)`, `predict_fn(data, model)` and `output_fn(prediction, accept)`.
Here the model is the engine `load_engine` builds from `read_settings([], environ)`, a request
is a TGI generate body (`{"inputs", "parameters"}`) validated by `tgi.validate` as POST
`/invocations` validates it, and the answer is what that route answers: a list holding one
generate response.

A bad request raises `RequestError`, a `BaseInferenceToolkitError` carrying the status the HTTP
server would answer (400, 406, 415, 422, 429...): the toolkit answers other exceptions with 500.
Use it with the stock toolkit as `SAGEMAKER_PROGRAM=handler.mms.inference` (or a
`code/inference.py` that imports these four functions); `handler.mms.handler_service` uses it
through `ServingTransformer`, which also answers errors with the server's JSON error body.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from sagemaker_inference import transformer, utils
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler
from sagemaker_inference.errors import BaseInferenceToolkitError

from handler.api import tgi
from handler.api.body import decode_json, media_type
from handler.api.common import ApiContext, dumps, parse
from handler.api.submission import RequestMetrics, Submission
from handler.config import Settings, read_settings
from handler.engine import Engine, load_engine
from handler.errors import ServingError, ValidationError
from handler.generation.request import FinalEvent, TokenEvent
from handler.server.metrics import Metrics
from handler.server.state import ServerState

logger = logging.getLogger(__name__)

JSON = "application/json"
ROUTE = "/invocations"
"""How requests are named in the request log (MMS serves them on that route)."""
JSON_ACCEPTS = frozenset({JSON, "application/*", "*/*"})
HTTP_SERVER = "the HTTP server (the default SERVING_STACK=gunicorn)"
REPLY_MARGIN = 5.0
"""Seconds kept between a reply that waited for the load and MMS's response timeout."""


class RequestError(BaseInferenceToolkitError):
    """A request the toolkit answers with `status_code` (a 4xx, or 424 when the model failed)
    instead of a 500; `error_type` is TGI's, as in the HTTP server's error body."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(status, message, HTTPStatus(status).phrase)
        self.error_type = error_type

    @classmethod
    def of(cls, error: ServingError) -> RequestError:
        return cls(error.status, error.error_type, error.message)

    def body(self) -> str:
        """The HTTP server's error body: `{"error": message, "error_type": type}`."""
        return dumps({"error": self.message, "error_type": self.error_type})


@contextmanager
def _toolkit_errors() -> Iterator[None]:
    """Raise the server's `ServingError`s as `RequestError`s with the same status."""
    try:
        yield
    except ServingError as exc:
        raise RequestError.of(exc) from exc


@dataclass
class LoadedModel:
    """What `model_fn` returns: the engine, loaded or loading in the background, and what
    requests need from it."""

    state: ServerState
    metrics: Metrics
    wait: float
    """Seconds a reply may wait for the load (`load_wait`)."""
    _context: ApiContext | None = None

    @property
    def engine(self) -> Engine:
        """The running engine; `UnavailableError` (503) while loading or after a failed load."""
        return self.state.require_engine()

    @property
    def context(self) -> ApiContext:
        """What validation needs of the loaded engine."""
        if self._context is None:
            self._context = ApiContext.of(self.engine)
        return self._context

    def ready_engine(self) -> Engine:
        """The engine, once loaded: waits for the load up to `wait` seconds, then 503."""
        self.state.loaded.wait(self.wait)
        return self.engine

    def close(self) -> None:
        """Stop the scheduler thread (MMS never calls it: its worker process just ends)."""
        if self.state.engine is not None:
            self.state.engine.generator.stop()


@dataclass(frozen=True)
class Prediction:
    """A finished generation and how to format it."""

    call: tgi.Generate
    tokens: list[TokenEvent]
    final: FinalEvent


def load_wait(settings: Settings) -> float:
    """Seconds a reply of the MMS worker may wait for the model to load: MMS's response timeout
    (`Settings.mms_response_timeout`) less `REPLY_MARGIN` (at most half of it)."""
    timeout = settings.mms_response_timeout()
    return timeout - min(REPLY_MARGIN, timeout / 2)


def load_model(model_dir: str, environ: Mapping[str, str]) -> LoadedModel:
    """Load, warm up and start the engine with the settings `environ` gives, as the server does.
    The model is the one they name (`HF_MODEL_ID`...), else `model_dir`.

    MMS restarts a worker whose reply, the load's included, takes longer than its response
    timeout, and the restarted worker loads from the start again. So the load runs in a
    background thread, waited for up to `load_wait`: a longer load goes on after this returns,
    and requests meanwhile wait for it up to the same bound, then get a 503. Raises what made
    the load fail when it failed within the wait.
    """
    environ = dict(environ)
    settings = read_settings([], environ)
    if settings.model_id is None and model_dir:
        environ["HF_MODEL_ID"] = model_dir
        settings = read_settings([], environ)
    metrics = Metrics()
    state = ServerState(settings)

    def loader(state: ServerState) -> Engine:
        return load_engine(settings, state.report, on_step=metrics.step, environ=environ)

    # A failure after the wait is logged by `state` and answered to each request with a 503.
    state.load(loader, on_failure=lambda: None)
    model = LoadedModel(state, metrics, load_wait(settings))
    if state.loaded.wait(model.wait) and state.error is not None:
        raise state.error
    if state.engine is None:
        logger.warning(
            "the model is still loading (%s) after %.0f s, near Multi Model Server's response "
            "timeout of %.0f s (SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS, or "
            "SAGEMAKER_MODEL_SERVER_TIMEOUT minutes): the load goes on in the background and "
            "requests get 503 until it ends",
            state.stage.value,
            model.wait,
            settings.mms_response_timeout(),
        )
    return model


def model_fn(model_dir: str) -> LoadedModel:
    """The toolkit's loader (once per worker): settings from this process's environment."""
    return load_model(model_dir, os.environ)


def input_fn(
    input_data: str | bytes | bytearray | None, content_type: str | None
) -> tgi.GenerateRequest:
    """Decode a TGI generate body as the HTTP server decodes one (`decode_json`): a body that
    is JSON is read whatever its content type; one that is not is a 415 under a non-JSON
    content type, else a 400."""
    if input_data is None:  # MMS decodes form bodies (curl's default type) into fields
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type(content_type) or 'none'} is not supported by Multi Model "
            "Server, which reads such bodies as form fields: send application/json",
        )
    with _toolkit_errors():
        return _generate_request(decode_json(input_data, content_type))


def _generate_request(data: Any) -> tgi.GenerateRequest:
    if isinstance(data, dict) and "inputs" not in data and ("messages" in data or "prompt" in data):
        raise ValidationError(
            f"`messages` (chat) and `prompt` (completions) are served by {HTTP_SERVER}: "
            "send `inputs` and `parameters` here"
        )
    body = parse(tgi.GenerateRequest, data)
    if body.stream:
        raise ValidationError(
            f"`stream` is not available: Multi Model Server answers in one piece; {HTTP_SERVER} "
            "streams"
        )
    return body


def predict_fn(data: tgi.GenerateRequest, model: LoadedModel) -> Prediction:
    """Validate against the model's limits (TGI's rules), generate and wait for the end."""
    with _toolkit_errors(), RequestMetrics(model.metrics) as counted:
        engine = model.ready_engine()
        call = tgi.validate(model.context, data, streaming=False, full_text=True)
        submission = Submission(engine.generator.submit(call.request), ROUTE, counted)
        tokens, final = submission.result()
    return Prediction(call, tokens, final)


def output_fn(prediction: Prediction, accept: str | None) -> tuple[str, str]:
    """POST `/invocations`'s answer, `[{"generated_text": ...}]`, and its content type. `accept`
    must allow JSON (the toolkit passes `application/json` for none or `*/*`)."""
    if not _accepts_json(accept):
        raise RequestError(
            406,
            "not_acceptable",
            f"Accept {accept} is not supported: use application/json; streams need {HTTP_SERVER}",
        )
    answer = [tgi.response(prediction.call, prediction.tokens, prediction.final)]
    return dumps(answer), JSON


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    media_types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(media_types & JSON_ACCEPTS)


class InferenceHandler(DefaultInferenceHandler):
    """The toolkit's default functions replaced by this module's. A `code/inference.py` in the
    model directory (`SAGEMAKER_PROGRAM`) still overrides them, as the toolkit documents."""

    def default_model_fn(self, model_dir: str, context: Any = None) -> LoadedModel:
        return model_fn(model_dir)

    def default_input_fn(
        self, input_data: str | bytes | bytearray, content_type: str | None, context: Any = None
    ) -> tgi.GenerateRequest:
        return input_fn(input_data, content_type)

    def default_predict_fn(
        self, data: tgi.GenerateRequest, model: LoadedModel, context: Any = None
    ) -> Prediction:
        return predict_fn(data, model)

    def default_output_fn(
        self, prediction: Prediction, accept: str | None, context: Any = None
    ) -> tuple[str, str]:
        return output_fn(prediction, accept)


class ServingTransformer(transformer.Transformer):
    """The toolkit's transformer over `InferenceHandler`. Errors are answered with the HTTP
    server's JSON body; the stock one puts a traceback in the body, this one logs it."""

    def __init__(self) -> None:
        super().__init__(default_inference_handler=InferenceHandler())

    @property
    def model(self) -> LoadedModel | None:
        """The loaded model, once `model_fn` has run."""
        return self._model

    @staticmethod
    def handle_error(
        context: Any, inference_exception: BaseInferenceToolkitError, trace: str
    ) -> list[str]:
        request_ids = getattr(context, "request_ids", None) or {}
        request_id = request_ids.get(0, "-")
        status = inference_exception.status_code
        phrase = inference_exception.phrase
        if isinstance(inference_exception, RequestError):
            body = inference_exception.body()
            if status >= 500:
                logger.warning("request %s -> %d: %s", request_id, status, body)
        elif status < 500:  # raised by a user's script
            body = dumps({"error": inference_exception.message, "error_type": "bad_request"})
        else:  # anything else, which the toolkit wraps as a 500 with its message as phrase
            logger.error("request %s failed (%d):\n%s", request_id, status, trace)
            body = dumps({"error": "Internal server error", "error_type": "server_error"})
            phrase = HTTPStatus.INTERNAL_SERVER_ERROR.phrase
        context.set_response_status(code=status, phrase=utils.remove_crlf(phrase))
        context.set_response_content_type(0, JSON)
        return [body]
