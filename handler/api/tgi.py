"""Text Generation Inference's generate contract: `/generate`, `/generate_stream`, POST `/`.

Request: `{"inputs": str, "parameters": {...}, "stream": bool}`. Response: `{"generated_text"}`
plus `details` when asked; streams are server-sent events whose last event carries
`generated_text` (and `details`). Shapes follow TGI's router (`router/src/lib.rs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from handler.api.common import (
    Answer,
    ApiContext,
    WireRequest,
    encode,
    finite,
    on_device_sampling_error,
    request,
    sampling_params,
    sse,
    stop_sequences,
    stream_error,
    unsupported,
)
from handler.api.structured import tgi_grammar
from handler.errors import ValidationError
from handler.generation.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    Token,
    TokenEvent,
)


class GenerateParameters(WireRequest):
    """Every parameter of TGI's generate schema. Not implemented, and rejected when used:
    `best_of` > 1, `watermark`, `adapter_id`."""

    best_of: int | None = None
    """Only 1 (or nothing)."""
    decoder_input_details: bool = False
    """Report the prompt tokens with their log-probabilities (not when streaming)."""
    details: bool = False
    """Report the finish reason, the seed and every token."""
    do_sample: bool = False
    """Sample instead of choosing the most likely token; without `parameters` it is on."""
    frequency_penalty: float | None = None
    """In [-2, 2]: lowers a token's logit by this much per occurrence so far."""
    grammar: Any = None
    """Structured output, as TGI's router takes it: `{"type": "json", "value": <JSON schema>}`
    (also `json_object`, and `json_schema` with `{"name", "schema"}`) or `{"type": "regex",
    "value": <pattern>}`. The answer follows it; a grammar that ends ends the answer."""
    max_new_tokens: int | None = None
    """At least 1; prompt + new tokens at most `max_total_tokens`. Default: all that is left."""
    repetition_penalty: float | None = None
    """Above 0 (clamped into [1e-4, 1e4]); 1 is none."""
    return_full_text: bool | None = None
    """Put the prompt in front of `generated_text`. Default: false on `/generate` and
    `/generate_stream`; true on POST `/` and `/invocations`, as TGI's router does for a model
    whose pipeline tag is `text-generation` (or has none)."""
    seed: int | None = None
    """In [0, 2^64) when sampling: the same seed gives the same text."""
    stop: list[str] = pydantic.Field(default_factory=list)
    """Up to `max_stop_sequences` texts that end the answer (and stay in it)."""
    temperature: float | None = None
    """Above 0 (clamped into [1e-4, 1e4]); any value other than 1 samples."""
    top_k: int | None = None
    """At least 1: sample among the k most likely tokens."""
    top_n_tokens: int | None = None
    """Up to `max_top_n_tokens`: report that many most likely tokens at each step."""
    top_p: float | None = None
    """In (0, 1): sample among the most likely tokens holding this much probability."""
    truncate: int | None = None
    """In (0, `max_input_tokens`]: keep only the last tokens of the prompt."""
    typical_p: float | None = None
    """In (0, 1): locally typical sampling."""
    watermark: bool = False
    """Not implemented: refused when true."""
    adapter_id: str | None = None
    """Not implemented: refused."""


class GenerateRequest(WireRequest):
    inputs: str
    """The prompt, at most `max_input_tokens` tokens (unless `truncate`)."""
    parameters: GenerateParameters | None = None
    stream: bool = False
    """On POST `/` and `/invocations`: answer with server-sent events."""


# --- answers (the OpenAPI document's response schemas) -----------------------------------------

FinishReasonName = Literal["length", "eos_token", "stop_sequence"]


class TokenInfo(Answer):
    id: int
    text: str
    logprob: float | None
    """Null for the first prompt token, and where the model gives none (on-device sampling)."""
    special: bool


class Details(Answer):
    finish_reason: FinishReasonName
    generated_tokens: int
    seed: int | None
    prefill: list[TokenInfo]
    """The prompt tokens, with `decoder_input_details`."""
    tokens: list[TokenInfo]
    top_tokens: list[list[TokenInfo]] | None = None
    """With `top_n_tokens`: the most likely tokens at each step."""


class GenerateResponse(Answer):
    """The answer of `/generate`; POST `/` and `/invocations` answer a list of one."""

    generated_text: str
    details: Details | None = None
    """With `details`."""


class StreamDetails(Answer):
    finish_reason: FinishReasonName
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(Answer):
    """One server-sent event of a TGI stream (`data: {json}`); the last carries the text."""

    index: int
    """From 1."""
    token: TokenInfo
    top_tokens: list[TokenInfo] | None = None
    generated_text: str | None
    details: StreamDetails | None


class TokenizedToken(Answer):
    id: int
    text: str
    start: int
    """UTF-8 byte offset of the token's text in the input."""
    stop: int


class ChatTokenizeResponse(Answer):
    tokenize_response: list[TokenizedToken]
    templated_text: str


class Info(Answer):
    """`/info`: TGI's fields, then this server's."""

    model_id: str | None
    model_sha: str | None
    model_pipeline_tag: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    max_batch_size: int
    max_batch_prefill_tokens: int
    backend: str | None
    device: str | None
    dtype: str | None
    kv_cache_dtype: str | None
    on_device_sampling: bool
    compiled_step: str | None = None
    """How the torch backend's decode step is compiled (None: not compiled)."""
    eager_reason: str | None = None
    """Why the torch backend's decode step is not compiled."""
    status: str


class Health(Answer):
    status: Literal["ready"]


class Unhealthy(Answer):
    """503 from the health checks: loading, draining, or the scheduler died."""

    error: str
    error_type: Literal["healthcheck"]
    status: str
    """`starting`, `downloading`, `loading`, `warming_up`, `draining`, `failed`..."""


# --- validation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generate:
    """A validated generate call: the engine's request and how to format its answer."""

    request: GenerationRequest
    details: bool
    prefix: str
    """Prepended to `generated_text` (the prompt, with `return_full_text`)."""


def validate(
    ctx: ApiContext, body: GenerateRequest, streaming: bool, full_text: bool = False
) -> Generate:
    """`full_text`: the route's default for `return_full_text` (true on TGI's compat routes)."""
    # Without `parameters` TGI samples by default; with them, only when asked.
    params = body.parameters or GenerateParameters(do_sample=True)
    best_of = params.best_of
    if best_of is not None and not 0 < best_of <= ctx.settings.max_best_of:
        raise ValidationError(
            f"`best_of` must be > 0 and <= {ctx.settings.max_best_of}. "
            f"Given: {best_of} (best_of > 1 is not implemented by this server)"
        )
    if params.watermark:
        raise unsupported("watermark")
    if params.adapter_id:
        raise unsupported("adapter_id", ": it serves one model without adapters")
    if params.decoder_input_details and streaming:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming")
    if params.decoder_input_details and ctx.on_device_sampling:
        raise on_device_sampling_error("decoder_input_details")
    sampling = sampling_params(
        ctx,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        typical_p=params.typical_p,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed,
        top_n_tokens=params.top_n_tokens,
    )
    stops = stop_sequences(ctx, params.stop)
    prompt_ids = encode(ctx, body.inputs, params.truncate, add_special_tokens=True)
    constraint = tgi_grammar(ctx, params.grammar) if params.grammar is not None else None
    generation = request(
        ctx,
        prompt_ids,
        params.max_new_tokens,
        sampling,
        stops,
        decoder_input_details=params.decoder_input_details,
        constraint=constraint,
    )
    return Generate(
        generation,
        details=params.details,
        prefix=body.inputs if _choose(params.return_full_text, full_text) else "",
    )


def _choose(given: bool | None, default: bool) -> bool:
    return default if given is None else given


def token(t: Token) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": finite(t.logprob), "special": t.special}


def response(call: Generate, tokens: list[TokenEvent], final: FinalEvent) -> dict[str, Any]:
    """The non-streaming answer (POST `/` wraps it in a list)."""
    answer: dict[str, Any] = {"generated_text": call.prefix + final.text}
    if call.details:
        details: dict[str, Any] = {
            "finish_reason": final.finish_reason.value,
            "generated_tokens": final.generated_tokens,
            "seed": final.seed,
            "prefill": [token(t) for t in final.prefill],
            "tokens": [token(e.token) for e in tokens],
        }
        if call.request.params.top_n_tokens:
            details["top_tokens"] = [[token(t) for t in e.top_tokens] for e in tokens]
        answer["details"] = details
    return answer


def stream(call: Generate, events: Iterator[Event]) -> Iterator[bytes]:
    """SSE events: one per token (`index` from 1); the last also carries `generated_text` and,
    with `details`, the finish reason. An error ends the stream with one error event."""
    index = 0
    for event in events:
        if isinstance(event, ErrorEvent):
            yield stream_error(event.error, openai=False)
            return
        if not isinstance(event, TokenEvent):
            continue
        index += 1
        payload: dict[str, Any] = {"index": index, "token": token(event.token)}
        if event.top_tokens:
            payload["top_tokens"] = [token(t) for t in event.top_tokens]
        payload["generated_text"] = None
        payload["details"] = None
        if event.last:
            final = next(events)
            if isinstance(final, ErrorEvent):
                yield stream_error(final.error, openai=False)
                return
            assert isinstance(final, FinalEvent)
            payload["generated_text"] = call.prefix + final.text
            if call.details:
                payload["details"] = {
                    "finish_reason": final.finish_reason.value,
                    "generated_tokens": final.generated_tokens,
                    "seed": final.seed,
                    "input_length": final.prompt_tokens,
                }
        yield sse(payload)
