"""Text Generation Inference's generate contract: `/generate`, `/generate_stream`, POST `/`.

Request: `{"inputs": str, "parameters": {...}, "stream": bool}`. Response: `{"generated_text"}`
plus `details` when asked; streams are server-sent events whose last event carries
`generated_text` (and `details`). Shapes follow TGI's router (`router/src/lib.rs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydantic

from handler.api.common import (
    STRICT,
    ApiContext,
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
from handler.errors import ValidationError
from handler.generation.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    Token,
    TokenEvent,
)


class GenerateParameters(pydantic.BaseModel):
    """Every parameter of TGI's generate schema. Not implemented, and rejected when used:
    `best_of` > 1, `grammar`, `watermark`, `adapter_id`."""

    model_config = STRICT

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = pydantic.Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


class GenerateRequest(pydantic.BaseModel):
    model_config = STRICT

    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool = False


@dataclass(frozen=True)
class Generate:
    """A validated generate call: the engine's request and how to format its answer."""

    request: GenerationRequest
    details: bool
    prefix: str
    """Prepended to `generated_text` (the prompt, with `return_full_text`)."""


def validate(ctx: ApiContext, body: GenerateRequest, streaming: bool) -> Generate:
    # Without `parameters` TGI samples by default; with them, only when asked.
    params = body.parameters or GenerateParameters(do_sample=True)
    best_of = params.best_of
    if best_of is not None and not 0 < best_of <= ctx.settings.max_best_of:
        raise ValidationError(
            f"`best_of` must be > 0 and <= {ctx.settings.max_best_of}. "
            f"Given: {best_of} (best_of > 1 is not implemented by this server)"
        )
    if params.grammar is not None:
        raise unsupported("grammar", ": constrained generation is not implemented")
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
    generation = request(
        ctx,
        prompt_ids,
        params.max_new_tokens,
        sampling,
        stops,
        decoder_input_details=params.decoder_input_details,
    )
    return Generate(
        generation,
        details=params.details,
        prefix=body.inputs if params.return_full_text else "",
    )


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
