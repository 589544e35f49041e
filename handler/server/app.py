"""Flask routes: parse, submit, format. One error handler turns every error into TGI's body.

Routes know nothing of the backend. A generation route validates its body with the wire
schema of its API (`handler.api`), submits engine requests, and formats the events. Everything
between a submitted request and its events (client disconnects, metrics, the request log line)
lives in `Submission`.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from handler import __version__
from handler.api import openai, tgi
from handler.api.common import SSE_KEEPALIVE, ApiContext, dumps, parse, stream_error
from handler.errors import (
    ClientError,
    ServerError,
    ServingError,
    UnavailableError,
    ValidationError,
)
from handler.generation.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    RequestHandle,
    TokenEvent,
)
from handler.server.metrics import CONTENT_TYPE, Metrics
from handler.server.state import ServerState

logger = logging.getLogger("handler.requests")

POLL_SECONDS = 0.5
"""How often a request waiting for its first token checks that its client is still there."""
HEALTH_ROUTES = frozenset({"/ping", "/health"})
JSON_TYPES = ("application/json", "text/json", "application/x-www-form-urlencoded", "text/plain")
"""Bodies with these content types (or none) are read as JSON: curl sends form-urlencoded and
`boto3` users often leave the default."""
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpError(ClientError):
    """A protocol-level client error (unknown route, wrong method, body too large...)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def client_probe(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check that the client has closed its connection (gunicorn exposes the socket)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    return gone


class Submission:
    """One submitted request as its route sees it: events until the end, the client's
    disconnect cancelling it, and the metrics and log line when it ends."""

    def __init__(
        self,
        handle: RequestHandle,
        route: str,
        received_at: float,
        metrics: Metrics,
        client_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.handle = handle
        self.route = route
        self.received_at = received_at
        self.metrics = metrics
        self.client_gone = client_gone

    def events(self) -> Iterator[Event]:
        """Events up to the final or error event. If the consumer stops early (the client went
        away, or a write to it failed) the request is cancelled and its slot freed."""
        done = False
        try:
            while True:
                event = self.handle.poll(POLL_SECONDS)
                checkpoint = event is None or (isinstance(event, TokenEvent) and not event.last)
                if checkpoint and self.client_gone():
                    return
                if event is None:
                    continue
                if isinstance(event, FinalEvent):
                    done = True
                    self._finished(event)
                elif isinstance(event, ErrorEvent):
                    done = True
                    self._failed(event.error)
                yield event
                if done:
                    return
        finally:
            if not done:
                self.handle.cancel()
                self.metrics.failed("cancelled")
                logger.info(
                    "request %s route=%s cancelled: the client disconnected",
                    self.handle.request.request_id,
                    self.route,
                )

    def result(self) -> tuple[list[TokenEvent], FinalEvent]:
        tokens: list[TokenEvent] = []
        for event in self.events():
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, FinalEvent):
                return tokens, event
            else:
                raise event.error
        raise UnavailableError("The request was cancelled")

    def _finished(self, final: FinalEvent) -> None:
        total = time.monotonic() - self.received_at
        self.metrics.succeeded(
            total,
            final.queue_time,
            final.inference_time,
            final.prompt_tokens,
            final.generated_tokens,
        )
        logger.info(
            "request %s route=%s prompt_tokens=%d generated_tokens=%d finish_reason=%s "
            "queue_time=%.3fs inference_time=%.3fs",
            self.handle.request.request_id,
            self.route,
            final.prompt_tokens,
            final.generated_tokens,
            final.finish_reason.value,
            final.queue_time,
            final.inference_time,
        )

    def _failed(self, error: ServingError) -> None:
        self.metrics.failed(error.error_type)
        error.counted = True  # type: ignore[attr-defined]
        logger.warning(
            "request %s route=%s failed (%d %s): %s",
            self.handle.request.request_id,
            self.route,
            error.status,
            error.error_type,
            error.message,
        )


def create_app(state: ServerState, metrics: Metrics) -> Flask:
    """The WSGI application. `state` says whether the engine is ready; routes take it from
    there, so the app answers health checks while the model loads."""
    settings = state.settings
    app = Flask("handler")
    app.config["MAX_CONTENT_LENGTH"] = settings.payload_limit

    # --- plumbing ----------------------------------------------------------------------------

    def context() -> ApiContext:
        engine = state.require_engine()
        shape = engine.backend.shape
        return ApiContext(
            settings=engine.settings,  # with the compiled shapes of an exported model
            tokenizer=engine.tokenizer,
            model_id=engine.model_id,
            vocab_size=shape.vocab_size,
            on_device_sampling=getattr(shape, "on_device_sampling", False),
        )

    def body() -> Any:
        """The request body decoded as JSON (413 beyond the payload limit)."""
        raw = request.get_data(cache=True)
        content_type = (request.mimetype or "").lower()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            if content_type and content_type not in JSON_TYPES:
                raise HttpError(
                    415,
                    "unsupported_media_type",
                    f"Content-Type {content_type} is not supported: send application/json",
                ) from None
            raise HttpError(400, "bad_request", "The body is not valid JSON") from None

    def submit(route: str, requests: list[GenerationRequest]) -> list[Submission]:
        """Queue the requests (all or none: a refused one cancels those before it)."""
        engine = state.require_engine()
        gone = client_probe(request.environ)
        submissions: list[Submission] = []
        try:
            for item in requests:
                handle = engine.generator.submit(item)
                submissions.append(Submission(handle, route, g.received_at, metrics, gone))
        except ServingError:
            for submission in submissions:
                submission.handle.cancel()
            raise
        return submissions

    def headers(final: FinalEvent, prompt: str, submitted: float) -> dict[str, str]:
        """TGI's timing and token headers on non-streaming answers."""
        total = time.monotonic() - g.received_at
        per_token = final.inference_time / max(final.generated_tokens, 1)
        return {
            "x-compute-type": state.engine.device if state.engine else "unknown",
            "x-compute-time": f"{total:.6f}",
            "x-compute-characters": str(len(prompt)),
            "x-total-time": str(int(total * 1000)),
            "x-validation-time": str(int((submitted - g.received_at) * 1000)),
            "x-queue-time": str(int(final.queue_time * 1000)),
            "x-inference-time": str(int(final.inference_time * 1000)),
            "x-time-per-token": str(int(per_token * 1000)),
            "x-prompt-tokens": str(final.prompt_tokens),
            "x-generated-tokens": str(final.generated_tokens),
        }

    def event_stream(chunks: Iterator[bytes], openai_format: bool) -> Response:
        def guarded() -> Iterator[bytes]:
            # A comment line first: the request may wait for a slot, and proxies and clients
            # see the stream open at once.
            yield SSE_KEEPALIVE
            try:
                yield from chunks
            except Exception as exc:  # a bug while formatting: end the stream with an error
                logger.error("stream failed on %s", request_path, exc_info=exc)
                yield stream_error(ServerError("Internal server error"), openai=openai_format)

        request_path = request.path

        return Response(guarded(), mimetype="text/event-stream", headers=STREAM_HEADERS)

    def json_response(payload: Any, status: int = 200, **extra: str) -> Response:
        return Response(dumps(payload), status=status, mimetype="application/json", headers=extra)

    # --- generation --------------------------------------------------------------------------

    def generate(data: Any, route: str, streaming: bool, as_list: bool) -> Response:
        g.generation = True
        metrics.received()
        payload = parse(tgi.GenerateRequest, data)
        call = tgi.validate(context(), payload, streaming)
        submitted = time.monotonic()
        (submission,) = submit(route, [call.request])
        if streaming:
            return event_stream(tgi.stream(call, submission.events()), openai_format=False)
        tokens, final = submission.result()
        answer = tgi.response(call, tokens, final)
        return json_response(
            [answer] if as_list else answer, **headers(final, payload.inputs, submitted)
        )

    def openai_call(data: Any, route: str, chat: bool) -> Response:
        g.generation = True
        metrics.received()
        ctx = context()
        if chat:
            payload: Any = parse(openai.ChatCompletionRequest, data)
            call = openai.validate_chat(ctx, payload)
        else:
            payload = parse(openai.CompletionRequest, data)
            call = openai.validate_completion(ctx, payload)
        submitted = time.monotonic()
        submissions = submit(route, call.requests)
        fingerprint = f"{__version__}-{state.engine.device if state.engine else ''}"
        if payload.stream:
            streams = [s.events() for s in submissions]
            return event_stream(openai.stream(call, streams, fingerprint), openai_format=True)
        results = [s.result() for s in submissions]
        finals = [final for _, final in results]
        prompt = "" if chat else str(payload.prompt)
        extra = headers(finals[0], prompt, submitted)
        extra["x-prompt-tokens"] = str(sum(f.prompt_tokens for f in finals))
        extra["x-generated-tokens"] = str(sum(f.generated_tokens for f in finals))
        return json_response(openai.response(call, results, fingerprint), **extra)

    @app.post("/generate")
    def generate_route() -> Response:
        return generate(body(), "/generate", streaming=False, as_list=False)

    @app.post("/generate_stream")
    def generate_stream_route() -> Response:
        return generate(body(), "/generate_stream", streaming=True, as_list=False)

    @app.post("/")
    def compat_generate_route() -> Response:
        data = body()
        streaming = isinstance(data, dict) and data.get("stream") is True
        return generate(data, "/", streaming=streaming, as_list=True)

    @app.post("/v1/chat/completions")
    def chat_route() -> Response:
        return openai_call(body(), "/v1/chat/completions", chat=True)

    @app.post("/v1/completions")
    def completions_route() -> Response:
        return openai_call(body(), "/v1/completions", chat=False)

    @app.post("/invocations")
    def invocations_route() -> Response:
        """SageMaker: the body's shape says which API it speaks."""
        data = body()
        accept = (request.headers.get("Accept") or "").split(";")[0].strip().lower()
        if accept not in ("", "*/*", "application/json", "text/event-stream"):
            raise HttpError(
                406,
                "not_acceptable",
                f"Accept {accept} is not supported: use application/json or text/event-stream",
            )
        if isinstance(data, dict) and accept == "text/event-stream" and "stream" not in data:
            data = {**data, "stream": True}
        if isinstance(data, dict) and "inputs" in data:
            streaming = data.get("stream") is True
            return generate(data, "/invocations", streaming=streaming, as_list=True)
        if isinstance(data, dict) and "messages" in data:
            return openai_call(data, "/invocations", chat=True)
        if isinstance(data, dict) and "prompt" in data:
            return openai_call(data, "/invocations", chat=False)
        raise ValidationError(
            "the body must have `inputs` (generate), `messages` (chat) or `prompt` (completions)"
        )

    # --- tokenization ------------------------------------------------------------------------

    @app.post("/tokenize")
    def tokenize_route() -> Response:
        ctx = context()
        payload = parse(tgi.GenerateRequest, body())
        if not payload.inputs:
            raise ValidationError("`inputs` cannot be empty")
        return json_response(tokenize(ctx, payload.inputs, add_special_tokens=True))

    @app.post("/chat_tokenize")
    def chat_tokenize_route() -> Response:
        ctx = context()
        payload = parse(openai.ChatCompletionRequest, body())
        text = openai.render_chat(ctx, payload)
        return json_response(
            {
                "tokenize_response": tokenize(ctx, text, add_special_tokens=False),
                "templated_text": text,
            }
        )

    # --- information and health --------------------------------------------------------------

    @app.get("/info")
    def info_route() -> Response:
        engine = state.engine
        settings = engine.settings if engine else state.settings
        shape = engine.backend.shape if engine else None
        return json_response(
            {
                "model_id": engine.model_id if engine else settings.model_id,
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": settings.max_concurrent_requests,
                "max_best_of": settings.max_best_of,
                "max_stop_sequences": settings.max_stop_sequences,
                "max_input_tokens": settings.max_input_tokens,
                "max_total_tokens": settings.max_total_tokens,
                "validation_workers": 1,
                "max_client_batch_size": settings.max_client_batch_size,
                "router": "hf-neuron-serving",
                "version": __version__,
                "sha": None,
                "docker_label": None,
                "max_batch_size": settings.max_batch_size,
                "max_batch_prefill_tokens": settings.max_batch_prefill_tokens,
                "backend": engine.backend_name if engine else None,
                "device": engine.device if engine else None,
                "dtype": engine.dtype if engine else None,
                "on_device_sampling": getattr(shape, "on_device_sampling", False),
                "status": state.stage.value,
            }
        )

    @app.get("/v1/models")
    def models_route() -> Response:
        return json_response(openai.models(context(), int(state.started_at)))

    @app.get("/metrics")
    def metrics_route() -> Response:
        return Response(metrics.render(), mimetype=CONTENT_TYPE.split(";")[0])

    @app.get("/ping")
    @app.get("/health")
    @app.get("/")
    def health_route() -> Response:
        status, payload = state.status()
        return json_response(payload, status=status)

    # --- cross-cutting -----------------------------------------------------------------------

    @app.before_request
    def before() -> None:
        g.received_at = time.monotonic()
        g.generation = False
        if settings.api_key and request.path not in HEALTH_ROUTES and not _is_root_get():
            supplied = request.headers.get("Authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                raise HttpError(
                    401, "unauthorized", "Missing or wrong API key: send Authorization: Bearer"
                )

    @app.errorhandler(ServingError)
    def serving_error(error: ServingError) -> Response:
        if g.get("generation") and not getattr(error, "counted", False):
            metrics.failed(error.error_type)
        if error.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.path, error.status, error)
        return json_response(
            {"error": error.message, "error_type": error.error_type}, status=error.status
        )

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            404: f"Not found: {request.path}",
            405: f"Method {request.method} is not allowed on {request.path}",
            413: f"The body is larger than the payload limit ({settings.payload_limit} bytes)",
        }
        message = messages.get(status, error.description or error.name)
        error_type = error.name.lower().replace(" ", "_")
        response = json_response({"error": message, "error_type": error_type}, status=status)
        if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.path, exc_info=error)
        if g.get("generation"):
            metrics.failed("server_error")
        return json_response(
            {"error": "Internal server error", "error_type": "server_error"}, status=500
        )

    return app


def _is_root_get() -> bool:
    return request.path == "/" and request.method == "GET"


def tokenize(ctx: ApiContext, text: str, add_special_tokens: bool) -> list[dict[str, Any]]:
    """TGI's `/tokenize` answer: ids with their text and UTF-8 byte offsets in `text`."""
    encoding = ctx.tokenizer(
        text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
    )
    tokens = []
    for token_id, (start, stop) in zip(encoding.input_ids, encoding.offset_mapping):
        byte_start = len(text[:start].encode())
        piece = text[start:stop]
        tokens.append(
            {
                "id": token_id,
                "text": piece,
                "start": byte_start,
                "stop": byte_start + len(piece.encode()),
            }
        )
    return tokens
