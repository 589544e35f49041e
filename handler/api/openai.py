"""The OpenAI-compatible contract: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Parameters map onto TGI's: `temperature` 0 means greedy and anything else (or nothing) samples,
as in TGI's chat route. `top_p` 1.0 (the OpenAI default) means no nucleus filtering. TGI's
`eos_token` and `stop_sequence` finish reasons are both reported as `stop`. The `model` field
is echoed back and never used to choose or load anything.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from handler.api import tools
from handler.api.common import (
    SSE_DONE,
    Answer,
    ApiContext,
    Refused,
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
from handler.api.structured import check_compatible, openai_constraint
from handler.api.tools import ToolPlan, ToolStream, message_calls, template_tools
from handler.errors import TemplateError, ValidationError
from handler.generation.grammar import Constraint
from handler.generation.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    Token,
    TokenEvent,
)
from handler.generation.stopping import FinishReason
from handler.model.params import SamplingParams

FINISH_REASONS = {
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
}


SHARED_REFUSED = {
    "use_beam_search": Refused(": beam search is not implemented"),
    "length_penalty": Refused(": it applies to beam search, which is not implemented", (1, 1.0)),
    "allowed_token_ids": Refused(": restricting the vocabulary is not implemented"),
    "bad_words": Refused(": banned words are not implemented"),
    "logits_processors": Refused(": custom logits processors are not accepted"),
    "prompt_logprobs": Refused(": use `echo` with `logprobs` on /v1/completions"),
    "return_tokens_as_token_ids": Refused(": tokens are reported as text"),
    "skip_special_tokens": Refused(": special tokens are always left out of the text", (True,)),
    "include_stop_str_in_output": Refused(
        ": a stop sequence always stays at the end of the text, as in TGI", (True,)
    ),
}
"""Undeclared fields, of OpenAI's API or vLLM's extensions, that would change the answer."""


class ContentPart(WireRequest):
    type: str
    text: str | None = None


class FunctionCall(WireRequest):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """JSON text, as OpenAI sends it (an object is accepted too)."""


class ToolCall(WireRequest):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(WireRequest):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls: passed to the chat template as `transformers` documents them
    (arguments as an object)."""
    tool_call_id: str | None = None
    """A `tool` turn: which call this result answers."""


class StreamOptions(WireRequest):
    include_usage: bool = False


class _Sampling(WireRequest):
    """Parameters chat and completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    """Extension (TGI, vLLM): above 0; 1 is none."""
    top_k: int | None = None
    """Extension (vLLM): sample among the k most likely tokens; 0 or -1 is off."""
    min_p: float | None = None
    """Extension (vLLM): in [0, 1], keep tokens at least this times as likely as the best."""
    typical_p: float | None = None
    """Extension (TGI): in (0, 1), locally typical sampling."""
    seed: int | None = None
    """With `n` > 1, choice i uses `seed + i`."""
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    """Extension (vLLM): token ids that end the answer like EOS (finish reason `stop`)."""
    ignore_eos: bool = False
    """Extension (vLLM): go on after EOS, up to `max_tokens`."""
    min_tokens: int | None = None
    """Extension (vLLM): no EOS, stop token or stop sequence ends the answer before this many
    tokens."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    """Choices per prompt, each generated in its own slot."""
    logit_bias: dict[str, float] | None = None
    """Token id (as text) -> value in [-100, 100] added to its logit before sampling;
    log-probabilities stay the model's own."""
    truncate_prompt_tokens: int | None = None
    """Extension (vLLM): keep only the prompt's last tokens (as TGI's `truncate`)."""
    user: str | None = None
    """Accepted and ignored."""
    response_format: dict[str, Any] | None = None
    """`{"type": "text"}` (the default), `{"type": "json_object"}`, or `{"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}`: the answer is JSON valid
    against the schema (enforced whatever `strict` says)."""
    structured_outputs: dict[str, Any] | None = None
    """Extension (vLLM): one of `json` (a schema), `regex`, `choice` (a list of strings),
    `grammar` (Lark or GBNF) or `json_object`; `whitespace_pattern` as
    `guided_whitespace_pattern`."""
    guided_json: Any = None
    """Extension (vLLM, older name of `structured_outputs.json`)."""
    guided_regex: str | None = None
    """Extension (vLLM): the answer matches this regex in full."""
    guided_choice: list[str] | None = None
    """Extension (vLLM): the answer is one of these strings."""
    guided_grammar: str | None = None
    """Extension (vLLM): a Lark (llguidance) or GBNF grammar."""
    guided_whitespace_pattern: str | None = None
    """Extension (vLLM): whitespace allowed between JSON tokens (default: none, as
    `json.dumps` separates items and keys)."""
    guided_decoding_backend: str | None = None
    """Extension (vLLM): `auto`, `guidance` or `llguidance` (the one this server runs)."""


class ChatCompletionRequest(_Sampling):
    refused: ClassVar[Mapping[str, Refused]] = {
        **SHARED_REFUSED,
        "modalities": Refused(": this server answers with text only", (["text"],)),
        "audio": Refused(": this server answers with text only"),
        "prediction": Refused(": predicted outputs are not implemented"),
        "web_search_options": Refused(": web search is not available"),
        "echo": Refused(": echo is for /v1/completions"),
        "add_special_tokens": Refused(
            ": the chat template places every special token itself", (False,)
        ),
        "documents": Refused(": passing documents to the chat template is not implemented"),
        "chat_template": Refused(": the model's own chat template is always used"),
        "mm_processor_kwargs": Refused(": this server serves text models only"),
    }

    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    """Functions the model may call (`{"type": "function", "function": {"name",
    "description", "parameters"}}`), passed to the chat template; calls come back in
    `message.tool_calls` with finish reason `tool_calls`. Needs a template with a tool-call
    format this server parses (Hermes / Qwen, Llama 3.1 JSON, Mistral)."""
    tool_choice: Any = None
    """`none`, `auto` (the default with tools: the model chooses, and its call is constrained
    to the function's parameters once it opens one), `required` (one or more calls), or
    `{"type": "function", "function": {"name"}}` (that call)."""
    parallel_tool_calls: bool | None = None
    """False: at most one call (default true)."""
    functions: list[Any] | None = None
    """Legacy form of `tools` (answered with `message.function_call`)."""
    function_call: Any = None
    """Legacy form of `tool_choice`: `none`, `auto` or `{"name"}`."""
    add_generation_prompt: bool = True
    """Extension (vLLM): end the prompt with the template's assistant header."""
    continue_final_message: bool = False
    """Extension (vLLM): end the prompt inside the last (assistant) message, for the model to
    continue it; needs `add_generation_prompt` false."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extension (vLLM): extra variables for the chat template (such as `enable_thinking`)."""


class CompletionRequest(_Sampling):
    refused: ClassVar[Mapping[str, Refused]] = {**SHARED_REFUSED}

    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    """Put the prompt in front of each choice's text (and, with `logprobs`, its tokens with
    their log-probabilities, the first one null)."""
    logprobs: int | None = None
    best_of: int | None = None


# --- answers (the OpenAPI document's response schemas) -----------------------------------------

FinishReasonName = Literal["stop", "length"]
ChatFinishReasonName = Literal["stop", "length", "tool_calls", "function_call"]


class TopLogprob(Answer):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Answer):
    content: list[ChatLogprob]


class CalledFunction(Answer):
    name: str
    arguments: str
    """JSON text valid against the function's parameters."""


class CalledTool(Answer):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(Answer):
    role: Literal["assistant"]
    content: str | None
    """Null when the answer is only tool calls."""
    tool_calls: list[CalledTool] | None = None
    """With `tools`, the calls the model made."""
    function_call: CalledFunction | None = None
    """With the legacy `functions`, the call the model made."""


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReasonName


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


class FunctionDelta(Answer):
    name: str | None = None
    """In a call's first delta."""
    arguments: str | None = None
    """The next piece of the arguments' JSON text."""


class ToolCallDelta(Answer):
    index: int
    id: str | None = None
    """In a call's first delta."""
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(Answer):
    role: Literal["assistant"] | None = None
    """In the first chunk only."""
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    """With `tools`: pieces of each call, by index."""


class ChatChunkChoice(Answer):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReasonName | None


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
    """The legacy format: parallel lists, one entry per token (with `echo`, the prompt's tokens
    first, the very first without log-probabilities)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
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
    """Validated OpenAI call: one engine request per choice, and how to format the answers.

    Choices are numbered prompt by prompt: choice `i * n + j` is the j-th of prompt i."""

    kind: Literal["chat", "completion"]
    requests: list[GenerationRequest]
    model: str
    logprobs: bool
    include_usage: bool
    prefixes: list[str]
    """Prepended to each choice's text (`echo`)."""
    id: str
    created: int
    n: int = 1
    """Choices per prompt: usage counts each prompt's tokens once."""
    tools: ToolPlan | None = None
    """How to read tool calls out of the answers (chat with `tools`)."""


TEMPLATE_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
"""`apply_chat_template`'s own arguments: not template variables, so not `chat_template_kwargs`."""


def _constraint(ctx: ApiContext, body: _Sampling) -> Constraint | None:
    """The request's structured output (response_format, structured_outputs, guided_*)."""
    guided = {
        name: getattr(body, name)
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        if getattr(body, name) is not None
    }
    constraint = openai_constraint(
        ctx,
        body.response_format,
        body.structured_outputs,
        guided,
        body.guided_whitespace_pattern,
        body.guided_decoding_backend,
    )
    check_compatible(constraint, body.ignore_eos, body.min_tokens or 0)
    return constraint


def _sampling(ctx: ApiContext, body: _Sampling, top_n: int, top_n_name: str) -> SamplingParams:
    if body.n is not None and body.n < 1:
        raise ValidationError("`n` must be >= 1")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    if body.temperature is not None and body.temperature < 0:
        raise ValidationError("`temperature` must be >= 0")
    if body.top_k is not None and body.top_k < -1:
        raise ValidationError("`top_k` must be -1 or 0 (off), or strictly positive")
    if body.stream_options is not None and not body.stream:
        raise ValidationError("`stream_options` needs `stream` set to true")
    greedy = body.temperature == 0
    return sampling_params(
        ctx,
        do_sample=not greedy,
        temperature=None if greedy else body.temperature,
        top_k=body.top_k if body.top_k not in (None, 0, -1) else None,
        top_p=None if body.top_p == 1 else body.top_p,
        min_p=body.min_p,
        typical_p=body.typical_p,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
        top_n_tokens=top_n,
        top_n_name=top_n_name,
        logit_bias=body.logit_bias,
        min_tokens=body.min_tokens,
    )


def _stop_token_ids(ctx: ApiContext, body: _Sampling) -> frozenset[int]:
    ids = frozenset(body.stop_token_ids or ())
    if any(not 0 <= i < ctx.vocab_size for i in ids):
        raise ValidationError(f"`stop_token_ids` must be token ids below {ctx.vocab_size}")
    return ids


def _truncate(ctx: ApiContext, body: _Sampling) -> int | None:
    """vLLM's `truncate_prompt_tokens` as TGI's `truncate` (-1: the longest prompt allowed)."""
    if body.truncate_prompt_tokens == -1:
        return ctx.settings.max_input_tokens
    return body.truncate_prompt_tokens


def _choices(
    ctx: ApiContext,
    body: _Sampling,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new: int | None,
    max_new_name: str,
    decoder_input_details: bool = False,
    constraint: Constraint | None = None,
) -> list[GenerationRequest]:
    """`n` engine requests per prompt; with a seed, choice j draws with `seed + j` (vLLM).
    Each request gets its own copy of `constraint` (grammar state is per request)."""
    n = body.n or 1
    limit = ctx.settings.max_concurrent_requests
    if len(prompts) * n > limit:
        raise ValidationError(
            f"`n` x prompts must be <= {limit} (MAX_CONCURRENT_REQUESTS). "
            f"Given: {n} x {len(prompts)}"
        )
    stops = stop_sequences(ctx, body.stop)
    stop_ids = _stop_token_ids(ctx, body)
    requests: list[GenerationRequest] = []
    for prompt_ids in prompts:
        for j in range(n):
            seeded = params if params.seed is None or j == 0 else _reseed(params, params.seed + j)
            requests.append(
                request(
                    ctx,
                    prompt_ids,
                    max_new,
                    seeded,
                    stops,
                    decoder_input_details=decoder_input_details,
                    max_new_tokens_name=max_new_name,
                    ignore_eos=body.ignore_eos,
                    stop_token_ids=stop_ids,
                    constraint=(
                        None
                        if constraint is None
                        else constraint
                        if not requests
                        else constraint.copy()
                    ),
                )
            )
    return requests


def _reseed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed % 2**64)


def template_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as `transformers`' `apply_chat_template` documents them: text content,
    assistant `tool_calls` with their arguments as objects, `tool` turns with their
    `tool_call_id`."""
    if not body.messages:
        raise ValidationError("`messages` cannot be empty")
    messages = []
    for message in body.messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise unsupported("messages.content", " for parts other than text")
            content = "".join(part.text or "" for part in content)
        item: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        messages.append(item)
    return messages


def _arguments(arguments: str | dict[str, Any]) -> Any:
    """OpenAI sends a call's arguments as JSON text; templates expect an object (vLLM parses it
    likewise). Text that is not JSON is passed on as it is."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def render_chat(ctx: ApiContext, body: ChatCompletionRequest) -> str:
    """The prompt text: the tokenizer's chat template over the messages (and `tools`), with
    the generation prompt appended unless the request says otherwise."""
    messages = template_messages(body)
    if not getattr(ctx.tokenizer, "chat_template", None):
        raise TemplateError(
            "This model has no chat template: use /generate with a formatted prompt"
        )
    if body.continue_final_message and body.add_generation_prompt:
        raise ValidationError(
            "`continue_final_message` needs `add_generation_prompt` set to false: the prompt "
            "either continues the last message or opens a new one"
        )
    if body.continue_final_message and messages[-1]["role"] != "assistant":
        raise ValidationError(
            "`continue_final_message` needs the last message to be the assistant's"
        )
    extra = dict(body.chat_template_kwargs or {})
    clashing = sorted(TEMPLATE_ARGUMENTS & extra.keys())
    if clashing:
        raise ValidationError(
            f"`chat_template_kwargs` may not set {', '.join(clashing)}: "
            "use the request's own fields"
        )
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages,
            tools=template_tools(body),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=False,
            **extra,
        )
    except Exception as exc:  # jinja2 errors, including the template's own raise_exception
        raise TemplateError(f"Could not apply the chat template: {exc}") from None
    assert isinstance(text, str)  # tokenize=False: the rendered text, never token ids
    _check_rendered(text, messages)
    return text


def _check_rendered(text: str, messages: list[dict[str, Any]]) -> None:
    """A template that does not know tool calls or tool results drops them without a word;
    refuse the conversation instead of answering as if they had not happened."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls", ()):
            if call["function"]["name"] not in text:
                raise TemplateError(
                    f"This model's chat template does not render tool calls: the call to "
                    f"`{call['function']['name']}` in `messages[{index}]` would be lost"
                )
        if message["role"] == "tool" and message["content"].strip() not in text:
            raise TemplateError(
                f"This model's chat template does not render tool results: `messages[{index}]` "
                "would be lost"
            )


def validate_chat(ctx: ApiContext, body: ChatCompletionRequest) -> Call:
    if body.top_logprobs is not None and not body.logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs` set to true")
    if body.logprobs and ctx.on_device_sampling:
        raise on_device_sampling_error("logprobs")
    params = _sampling(ctx, body, top_n=body.top_logprobs or 0, top_n_name="top_logprobs")
    params = dataclasses.replace(params, logprobs=body.logprobs)
    max_new, name = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        max_new, name = body.max_completion_tokens, "max_completion_tokens"
    constraint = _constraint(ctx, body)
    tool_plan = tools.plan(ctx, body)
    if tool_plan is not None:
        if constraint is not None:
            raise ValidationError(
                "structured output (`response_format`, `structured_outputs`, `guided_*`) "
                "cannot be combined with tool calls: use `tool_choice` none, or leave it out"
            )
        constraint = tool_plan.constraint
        check_compatible(constraint, body.ignore_eos, body.min_tokens or 0, "the tool grammar")
    prompt_ids = encode(ctx, render_chat(ctx, body), _truncate(ctx, body), add_special_tokens=False)
    requests = _choices(ctx, body, [prompt_ids], params, max_new, name, constraint=constraint)
    return Call(
        kind="chat",
        requests=requests,
        model=body.model or ctx.model_id,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prefixes=[""] * len(requests),
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        n=body.n or 1,
        tools=tool_plan,
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
    echo_logprobs = body.echo and body.logprobs is not None
    if echo_logprobs and body.stream:
        raise ValidationError("`echo` with `logprobs` is not supported when streaming")
    if echo_logprobs and ctx.on_device_sampling:
        raise on_device_sampling_error("logprobs")
    params = _sampling(ctx, body, top_n=body.logprobs or 0, top_n_name="logprobs")
    params = dataclasses.replace(params, logprobs=body.logprobs is not None)
    truncate = _truncate(ctx, body)
    encoded = [encode(ctx, p, truncate, add_special_tokens=True) for p in prompts]
    requests = _choices(
        ctx,
        body,
        encoded,
        params,
        body.max_tokens,
        "max_tokens",
        decoder_input_details=echo_logprobs,
        constraint=_constraint(ctx, body),
    )
    n = body.n or 1
    return Call(
        kind="completion",
        requests=requests,
        model=body.model or ctx.model_id,
        logprobs=body.logprobs is not None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prefixes=[p for p in prompts for _ in range(n)] if body.echo else [""] * len(requests),
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        n=n,
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


def _completion_logprobs(
    tokens: list[Token], tops: list[list[Token]], offset: int, first_unscored: bool = False
) -> dict[str, Any]:
    """The legacy completions format: parallel lists plus text offsets from `offset`.
    `first_unscored`: the first token is the prompt's first, which has no log-probability."""
    text_offset = []
    for token in tokens:
        text_offset.append(offset)
        offset += 0 if token.special else len(token.text)
    top: list[dict[str, float | None] | None] = [
        {t.text: finite(t.logprob) for t in alternatives} for alternatives in tops
    ]
    if first_unscored and top:
        top[0] = None
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [finite(t.logprob) for t in tokens],
        "top_logprobs": top,
        "text_offset": text_offset,
    }


def _usage(finals: list[FinalEvent], n: int) -> dict[str, int]:
    """Each prompt's tokens count once, whatever its number of choices."""
    prompt = sum(f.prompt_tokens for f in finals[::n])
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
        finish = FINISH_REASONS[final.finish_reason]
        if call.kind == "chat":
            choice["message"] = {"role": "assistant", "content": final.text}
            if call.tools is not None:
                choice["message"], finish = _tool_message(call.tools, tokens, final)
            choice["logprobs"] = (
                {"content": [_chat_logprob(e.token, e.top_tokens) for e in tokens]}
                if call.logprobs
                else None
            )
        else:
            prefix = call.prefixes[index]
            choice["text"] = prefix + final.text
            choice["logprobs"] = None
            if call.logprobs:
                echoed = call.requests[index].decoder_input_details
                prompt = final.prefill if echoed else []
                prompt_tops = final.prefill_top if echoed else []
                choice["logprobs"] = _completion_logprobs(
                    prompt + [e.token for e in tokens],
                    prompt_tops + [e.top_tokens for e in tokens],
                    0 if echoed else len(prefix),
                    first_unscored=echoed,
                )
        choice["finish_reason"] = finish
        choices.append(choice)
    return {
        **_envelope(call, False, fingerprint),
        "choices": choices,
        "usage": _usage([final for _, final in results], call.n),
    }


def _raw_text(plan: ToolPlan, token: Token) -> str:
    """A token's text as the tool parser reads it: special tokens only when they are the
    format's markers (Mistral's `[TOOL_CALLS]`)."""
    if token.special:
        return token.text if token.text in plan.format.markers else ""
    return token.text


def _tool_message(
    plan: ToolPlan, tokens: list[TokenEvent], final: FinalEvent
) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of an answer that may hold tool calls."""
    raw = "".join(_raw_text(plan, e.token) for e in tokens)
    content, calls = message_calls(plan.format, raw)
    finish = FINISH_REASONS[final.finish_reason]
    if not calls:
        return {"role": "assistant", "content": final.text}, finish
    # Cut short (`length`), the complete calls are still reported, with finish reason length.
    cut = final.finish_reason is FinishReason.LENGTH
    if plan.legacy:
        message = {"role": "assistant", "content": content, "function_call": calls[0]["function"]}
        return message, finish if cut else "function_call"
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    return message, finish if cut else "tool_calls"


def stream(call: Call, streams: list[Iterator[Event]], fingerprint: str) -> Iterator[bytes]:
    """Chunks for each prompt in turn (all of them are generated concurrently), then the usage
    chunk when asked, then `data: [DONE]`. An error ends the stream with an error event."""
    finals: list[FinalEvent] = []
    envelope = _envelope(call, True, fingerprint)
    for index, events in enumerate(streams):
        first = True
        offset = len(call.prefixes[index])
        parser = ToolStream(call.tools.format) if call.tools is not None else None
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
                if parser is not None and call.tools is not None:
                    delta = _tool_delta(call.tools, parser, event, first)
                    if finish is not None and parser.called and finish != "length":
                        finish = "function_call" if call.tools.legacy else "tool_calls"
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
                if call.logprobs:
                    choice["logprobs"] = _completion_logprobs(
                        [event.token], [event.top_tokens], offset
                    )
                offset += len(text)
            first = False
            yield sse({**envelope, "choices": [choice]})
    if call.include_usage:
        yield sse({**envelope, "choices": [], "usage": _usage(finals, call.n)})
    yield SSE_DONE


def _tool_delta(plan: ToolPlan, parser: ToolStream, event: TokenEvent, first: bool) -> dict:
    """The chat delta of one token when the answer may hold tool calls (legacy `functions`:
    the first call as `function_call` pieces)."""
    delta = parser.feed(_raw_text(plan, event.token), final=event.last)
    if plan.legacy and "tool_calls" in delta:
        pieces = [c["function"] for c in delta.pop("tool_calls") if c["index"] == 0]
        if pieces:
            delta["function_call"] = pieces[0]
    if first:
        delta = {"role": "assistant", **delta}
        delta.setdefault("content", "")
    return delta


def _text_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def models(ctx: ApiContext, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": ctx.model_id, "object": "model", "created": created, "owned_by": "local"}],
    }
