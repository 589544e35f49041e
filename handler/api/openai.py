"""The OpenAI-compatible contract: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Parameters map onto TGI's: `temperature` 0 means greedy and anything else (or nothing) samples,
as in TGI's chat route. `top_p` 1.0 (the OpenAI default) means no nucleus filtering. TGI's
`eos_token` and `stop_sequence` finish reasons are both reported as `stop`. The `model` field
is echoed back and never used to choose or load anything.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from handler.api.common import (
    SSE_DONE,
    STRICT,
    Answer,
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
from handler.errors import TemplateError, ValidationError
from handler.generation.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    Token,
    TokenEvent,
)
from handler.generation.stopping import FinishReason

FINISH_REASONS = {
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
}


class ContentPart(pydantic.BaseModel):
    model_config = STRICT

    type: str
    text: str | None = None


class Message(pydantic.BaseModel):
    model_config = STRICT

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(pydantic.BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Sampling(pydantic.BaseModel):
    """Parameters chat and completions share."""

    model_config = STRICT

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    """TGI extension."""
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Accepted and ignored."""


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


# --- answers (the OpenAPI document's response schemas) -----------------------------------------

FinishReasonName = Literal["stop", "length"]


class TopLogprob(Answer):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Answer):
    content: list[ChatLogprob]


class AssistantMessage(Answer):
    role: Literal["assistant"]
    content: str


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    """The request's `model`, echoed; else the served model's id."""
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Answer):
    role: Literal["assistant"] | None = None
    """In the first chunk only."""
    content: str


class ChatChunkChoice(Answer):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None


class ChatCompletionChunk(Answer):
    """One server-sent event of a chat stream; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    """Empty in the last chunk, which carries `usage` (`stream_options.include_usage`)."""
    usage: Usage | None = None


class CompletionLogprobs(Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None]]
    text_offset: list[int]


class CompletionChoice(Answer):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonName | None
    """Null in stream chunks before the last one of a choice."""


class Completion(Answer):
    """The `/v1/completions` answer, and each event of its stream (ended by `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class StreamErrorDetail(Answer):
    message: str
    type: str
    code: int
    """The HTTP status the error would have had before the stream started."""


class StreamError(Answer):
    """The last event of a failed OpenAI stream (what the `openai` client parses)."""

    error: StreamErrorDetail


class ModelCard(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Answer):
    object: Literal["list"]
    data: list[ModelCard]


# --- validation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Validated OpenAI call: one engine request per prompt, and how to format the answers."""

    kind: Literal["chat", "completion"]
    requests: list[GenerationRequest]
    model: str
    logprobs: bool
    include_usage: bool
    prefixes: list[str]
    """Prepended to each choice's text (`echo`)."""
    id: str
    created: int


def _sampling(ctx: ApiContext, body: _Sampling, top_n: int, top_n_name: str) -> Any:
    if body.n not in (None, 1):
        raise unsupported("n", ": ask for one choice per request")
    if body.logit_bias:
        raise unsupported("logit_bias")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    if body.temperature is not None and body.temperature < 0:
        raise ValidationError("`temperature` must be >= 0")
    greedy = body.temperature == 0
    return sampling_params(
        ctx,
        do_sample=not greedy,
        temperature=None if greedy else body.temperature,
        top_p=None if body.top_p == 1 else body.top_p,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
        top_n_tokens=top_n,
        top_n_name=top_n_name,
    )


def render_chat(ctx: ApiContext, body: ChatCompletionRequest) -> str:
    """The prompt text: the tokenizer's chat template with the generation prompt appended."""
    if not body.messages:
        raise ValidationError("`messages` cannot be empty")
    if not getattr(ctx.tokenizer, "chat_template", None):
        raise TemplateError(
            "This model has no chat template: use /generate with a formatted prompt"
        )
    messages = []
    for message in body.messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise unsupported("messages.content", " for parts other than text")
            content = "".join(part.text or "" for part in content)
        messages.append({"role": message.role, "content": content or ""})
    try:
        return ctx.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja2 errors, including the template's own raise_exception
        raise TemplateError(f"Could not apply the chat template: {exc}") from None


def validate_chat(ctx: ApiContext, body: ChatCompletionRequest) -> Call:
    if body.tools:
        raise unsupported("tools", ": tool calling is not implemented")
    if body.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", ": tool calling is not implemented")
    if body.response_format not in (None, {"type": "text"}):
        raise unsupported("response_format", ": constrained generation is not implemented")
    if body.top_logprobs is not None and not body.logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs` set to true")
    if body.logprobs and ctx.on_device_sampling:
        raise on_device_sampling_error("logprobs")
    params = _sampling(ctx, body, top_n=body.top_logprobs or 0, top_n_name="top_logprobs")
    stops = stop_sequences(ctx, body.stop)
    prompt_ids = encode(ctx, render_chat(ctx, body), None, add_special_tokens=False)
    if body.max_completion_tokens is not None:
        max_new, name = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_new, name = body.max_tokens, "max_tokens"
    return Call(
        kind="chat",
        requests=[request(ctx, prompt_ids, max_new, params, stops, max_new_tokens_name=name)],
        model=body.model or ctx.model_id,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prefixes=[""],
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
    )


def validate_completion(ctx: ApiContext, body: CompletionRequest) -> Call:
    if body.suffix:
        raise unsupported("suffix")
    if body.best_of not in (None, 1):
        raise unsupported("best_of", ": only best_of = 1 is implemented")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    limit = ctx.settings.max_client_batch_size
    if not prompts:
        raise ValidationError("`prompt` cannot be empty")
    if len(prompts) > limit:
        raise ValidationError(
            f"`prompt` may hold at most {limit} prompts (MAX_CLIENT_BATCH_SIZE). "
            f"Given: {len(prompts)}"
        )
    params = _sampling(ctx, body, top_n=body.logprobs or 0, top_n_name="logprobs")
    stops = stop_sequences(ctx, body.stop)
    requests = [
        request(
            ctx,
            encode(ctx, p, None, add_special_tokens=True),
            body.max_tokens,
            params,
            stops,
            max_new_tokens_name="max_tokens",
        )
        for p in prompts
    ]
    return Call(
        kind="completion",
        requests=requests,
        model=body.model or ctx.model_id,
        logprobs=body.logprobs is not None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prefixes=prompts if body.echo else [""] * len(prompts),
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
    )


# --- answers ---------------------------------------------------------------------------------


def _chat_logprob(t: Token, top: list[Token]) -> dict[str, Any]:
    return {
        "token": t.text,
        "logprob": finite(t.logprob),
        "bytes": list(t.text.encode()),
        "top_logprobs": [
            {"token": o.text, "logprob": finite(o.logprob), "bytes": list(o.text.encode())}
            for o in top
        ],
    }


def _completion_logprobs(events: list[TokenEvent], offset: int) -> dict[str, Any]:
    """The legacy completions format: parallel lists plus text offsets."""
    text_offset = []
    for event in events:
        text_offset.append(offset)
        offset += 0 if event.token.special else len(event.token.text)
    return {
        "tokens": [e.token.text for e in events],
        "token_logprobs": [finite(e.token.logprob) for e in events],
        "top_logprobs": [{t.text: finite(t.logprob) for t in e.top_tokens} for e in events],
        "text_offset": text_offset,
    }


def _usage(finals: list[FinalEvent]) -> dict[str, int]:
    prompt = sum(f.prompt_tokens for f in finals)
    completion = sum(f.generated_tokens for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _envelope(call: Call, streaming: bool, fingerprint: str) -> dict[str, Any]:
    obj = "chat.completion" if call.kind == "chat" else "text_completion"
    if streaming and call.kind == "chat":
        obj += ".chunk"
    return {
        "id": call.id,
        "object": obj,
        "created": call.created,
        "model": call.model,
        "system_fingerprint": fingerprint,
    }


def response(
    call: Call,
    results: list[tuple[list[TokenEvent], FinalEvent]],
    fingerprint: str,
) -> dict[str, Any]:
    choices = []
    for index, (tokens, final) in enumerate(results):
        choice: dict[str, Any] = {"index": index}
        if call.kind == "chat":
            choice["message"] = {"role": "assistant", "content": final.text}
            choice["logprobs"] = (
                {"content": [_chat_logprob(e.token, e.top_tokens) for e in tokens]}
                if call.logprobs
                else None
            )
        else:
            prefix = call.prefixes[index]
            choice["text"] = prefix + final.text
            choice["logprobs"] = (
                _completion_logprobs(tokens, len(prefix)) if call.logprobs else None
            )
        choice["finish_reason"] = FINISH_REASONS[final.finish_reason]
        choices.append(choice)
    return {
        **_envelope(call, False, fingerprint),
        "choices": choices,
        "usage": _usage([final for _, final in results]),
    }


def stream(call: Call, streams: list[Iterator[Event]], fingerprint: str) -> Iterator[bytes]:
    """Chunks for each prompt in turn (all of them are generated concurrently), then the usage
    chunk when asked, then `data: [DONE]`. An error ends the stream with an error event."""
    finals: list[FinalEvent] = []
    envelope = _envelope(call, True, fingerprint)
    for index, events in enumerate(streams):
        first = True
        if call.kind == "completion" and call.prefixes[index]:
            yield sse({**envelope, "choices": [_text_choice(index, call.prefixes[index], None)]})
        for event in events:
            if isinstance(event, ErrorEvent):
                yield stream_error(event.error, openai=True)
                return
            if not isinstance(event, TokenEvent):
                continue
            finish = None
            if event.last:
                final = next(events)
                if isinstance(final, ErrorEvent):
                    yield stream_error(final.error, openai=True)
                    return
                assert isinstance(final, FinalEvent)
                finals.append(final)
                finish = FINISH_REASONS[final.finish_reason]
            text = "" if event.token.special else event.token.text
            if call.kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
                delta.setdefault("content", text)
                choice: dict[str, Any] = {
                    "index": index,
                    "delta": delta,
                    "logprobs": (
                        {"content": [_chat_logprob(event.token, event.top_tokens)]}
                        if call.logprobs
                        else None
                    ),
                    "finish_reason": finish,
                }
            else:
                choice = _text_choice(index, text, finish)
            first = False
            yield sse({**envelope, "choices": [choice]})
    if call.include_usage:
        yield sse({**envelope, "choices": [], "usage": _usage(finals)})
    yield SSE_DONE


def _text_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def models(ctx: ApiContext, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": ctx.model_id, "object": "model", "created": created, "owned_by": "local"}],
    }
