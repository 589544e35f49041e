"""Flask routes: parse, submit, format. One error handler turns every error into TGI's body.

Routes know nothing of the backend. A generation route decodes its body (`handler.api.body`),
validates it with the wire schema of its API (`handler.api`), submits engine requests, and
formats the events. Everything between a submitted request and its events (client
disconnects, metrics, the request log line) lives in `handler.api.submission`; what is Flask's
or gunicorn's (the client's socket, the error bodies) lives here.
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from handler import __version__
from handler.api import openai, openapi, tgi
from handler.api.body import decode_json
from handler.api.common import SSE_KEEPALIVE, ApiContext, dumps, parse, stream_error
from handler.api.submission import RequestMetrics, Submission
from handler.errors import ClientError, ServerError, ServingError, ValidationError
from handler.generation.request import FinalEvent, GenerationRequest
from handler.server import docs
from handler.server.metrics import CONTENT_TYPE, Metrics
from handler.server.state import ServerState

logger = logging.getLogger("handler.requests")

SEND_TIMEOUT_SECONDS = 30.0
"""A write to a client that blocks this long ends the request: a client that stopped reading
its stream (or a large answer) has its request cancelled, its slot freed and its thread back,
while the other streams keep their pace (the scheduler never waits for a client)."""
STREAM_SEND_BUFFER_BYTES = 32 * 1024
"""The kernel send buffer of a stream's connection (Linux doubles it): what a client that
stopped reading can leave queued before a write blocks and `SEND_TIMEOUT_SECONDS` starts.
Token events arrive far slower than any buffer drains, so a reading client never fills it."""
HEALTH_ROUTES = frozenset({"/ping", "/health"})
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpError(ClientError):
    """A protocol-level client error (unknown route, wrong method, body too large...)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def client_probe(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check that the client has closed its connection (gunicorn exposes the socket).

    It polls before peeking: on a socket with a timeout (`bound_writes`) Python's `recv` first
    waits up to that timeout for data, even with `MSG_DONTWAIT`."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def gone() -> bool:
        try:
            if not poller.poll(0):
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    return gone


def bound_writes(environ: dict[str, Any], streaming: bool) -> None:
    """Make a write to this client fail after `SEND_TIMEOUT_SECONDS` instead of blocking its
    thread (and, for a stream, its slot) for as long as the client does not read. gunicorn
    sets the socket blocking again before the connection's next request."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return
    sock.settimeout(SEND_TIMEOUT_SECONDS)
    if streaming:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER_BYTES)


def create_app(state: ServerState, metrics: Metrics) -> Flask:
    """The WSGI application. `state` says whether the engine is ready; routes take it from
    there, so the app answers health checks while the model loads."""
    settings = state.settings
    # No static route: no request may name a file for the server to read.
    app = Flask("handler", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.payload_limit

    # --- plumbing ----------------------------------------------------------------------------

    def context() -> ApiContext:
        return ApiContext.of(state.require_engine())

    def body() -> Any:
        """The request body decoded as JSON (413 beyond the payload limit)."""
        return decode_json(request.get_data(cache=True), request.mimetype)

    def submit(
        route: str, requests: list[GenerationRequest], streaming: bool, counted: RequestMetrics
    ) -> list[Submission]:
        """Queue the requests (all or none: a refused one cancels those before it)."""
        engine = state.require_engine()
        bound_writes(request.environ, streaming)
        gone = client_probe(request.environ)
        submissions: list[Submission] = []
        try:
            for item in requests:
                handle = engine.generator.submit(item)
                submission = Submission(handle, route, counted, gone, SEND_TIMEOUT_SECONDS)
                submissions.append(submission)
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

    def event_stream(
        chunks: Iterator[bytes], openai_format: bool, submissions: list[Submission]
    ) -> Response:
        def guarded() -> Iterator[bytes]:
            # A comment line first: the request may wait for a slot, and proxies and clients
            # see the stream open at once.
            yield SSE_KEEPALIVE
            try:
                yield from chunks
            except Exception as exc:  # a bug while formatting: end the stream with an error
                logger.error("stream failed on %s", request_path, exc_info=exc)
                for submission in submissions:
                    submission.abandon("the stream failed (a server error, logged above)")
                yield stream_error(ServerError("Internal server error"), openai=openai_format)
            finally:
                # Prompts of a completions stream not reached yet when the client went away.
                for submission in submissions:
                    submission.abandon()

        request_path = request.path

        return Response(guarded(), mimetype="text/event-stream", headers=STREAM_HEADERS)

    def json_response(
        payload: Any, status: int = 200, extra: dict[str, str] | None = None
    ) -> Response:
        return Response(dumps(payload), status=status, mimetype="application/json", headers=extra)

    # --- generation --------------------------------------------------------------------------

    def generate(data: Any, route: str, streaming: bool, as_list: bool) -> Response:
        """`as_list`: TGI's compat routes (POST `/`, `/invocations`), which answer a list and
        return the full text by default."""
        with RequestMetrics(metrics, g.received_at) as counted:
            payload = parse(tgi.GenerateRequest, data)
            call = tgi.validate(context(), payload, streaming, full_text=as_list)
            submitted = time.monotonic()
            (submission,) = submit(route, [call.request], streaming, counted)
            if streaming:
                chunks = tgi.stream(call, submission.events())
                return event_stream(chunks, openai_format=False, submissions=[submission])
            tokens, final = submission.result()
            answer = tgi.response(call, tokens, final)
            extra = headers(final, payload.inputs, submitted)
            return json_response([answer] if as_list else answer, extra=extra)

    def openai_call(data: Any, route: str, chat: bool) -> Response:
        with RequestMetrics(metrics, g.received_at) as counted:
            ctx = context()
            if chat:
                payload: Any = parse(openai.ChatCompletionRequest, data)
                call = openai.validate_chat(ctx, payload)
            else:
                payload = parse(openai.CompletionRequest, data)
                call = openai.validate_completion(ctx, payload)
            submitted = time.monotonic()
            submissions = submit(route, call.requests, payload.stream, counted)
            fingerprint = f"{__version__}-{state.engine.device if state.engine else ''}"
            if payload.stream:
                chunks = openai.stream(call, [s.events() for s in submissions], fingerprint)
                return event_stream(chunks, openai_format=True, submissions=submissions)
            try:
                results = [s.result() for s in submissions]
            except ServingError:
                for submission in submissions:
                    submission.abandon("another prompt of the request failed")
                raise
            finals = [final for _, final in results]
            prompt = "" if chat else str(payload.prompt)
            extra = headers(finals[0], prompt, submitted)
            extra["x-prompt-tokens"] = str(sum(f.prompt_tokens for f in finals))
            extra["x-generated-tokens"] = str(sum(f.generated_tokens for f in finals))
            return json_response(openai.response(call, results, fingerprint), extra=extra)

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
        if settings.messages_api_enabled:
            if isinstance(data, dict) and "messages" not in data:
                raise ValidationError(
                    "MESSAGES_API_ENABLED is true: /invocations takes chat completion bodies "
                    "(`messages`), as TGI's does; send generate bodies to /generate, or unset it"
                )
            return openai_call(data, "/invocations", chat=True)
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
        truncate = payload.parameters.truncate if payload.parameters else None
        tokens = tokenize(ctx, payload.inputs, add_special_tokens=True)
        if truncate is not None:
            limit = ctx.settings.max_input_tokens
            if not 0 < truncate <= limit:
                raise ValidationError(
                    f"`truncate` must be strictly positive and less than {limit}. Given: {truncate}"
                )
            tokens = tokens[-truncate:]
        return json_response(tokens)

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
        info = tgi.Info(
            model_id=engine.model_id if engine else settings.model_id,
            model_sha=engine.model_sha if engine else None,
            model_pipeline_tag="text-generation",
            max_concurrent_requests=settings.max_concurrent_requests,
            max_best_of=settings.max_best_of,
            max_stop_sequences=settings.max_stop_sequences,
            max_input_tokens=settings.max_input_tokens,
            max_total_tokens=settings.max_total_tokens,
            validation_workers=1,
            max_client_batch_size=settings.max_client_batch_size,
            router="hf-neuron-serving",
            version=__version__,
            sha=None,
            docker_label=None,
            max_batch_size=settings.max_batch_size,
            max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
            backend=engine.backend_name if engine else None,
            device=engine.device if engine else None,
            dtype=engine.dtype if engine else None,
            kv_cache_dtype=(getattr(shape, "kv_cache_dtype", None) or engine.dtype)
            if engine
            else None,
            on_device_sampling=getattr(shape, "on_device_sampling", False),
            compiled_step=getattr(shape, "compiled_step", None),
            eager_reason=getattr(shape, "eager_reason", None),
            status=state.stage.value,
        )
        return json_response(info.model_dump())

    @app.get("/v1/models")
    def models_route() -> Response:
        return json_response(openai.models(context(), int(state.started_at)))

    @app.get("/metrics")
    def metrics_route() -> Response:
        return Response(metrics.render(), mimetype=CONTENT_TYPE.split(";")[0])

    @app.get("/openapi.json")
    def openapi_route() -> Response:
        return json_response(openapi.document())

    docs.register_docs(app)  # /docs: Swagger UI over /openapi.json

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
        public = (
            request.path in HEALTH_ROUTES or request.path in docs.PUBLIC_PATHS or _is_root_get()
        )
        if settings.api_key and not public:
            supplied = request.headers.get("Authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                raise HttpError(
                    401, "unauthorized", "Missing or wrong API key: send Authorization: Bearer"
                )

    @app.errorhandler(ServingError)
    def serving_error(error: ServingError) -> Response:
        """Every error's answer; generation requests count their failures themselves
        (`RequestMetrics`)."""
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
