"""What every wire format shares: parsing bodies into schemas, TGI's validation rules, SSE.

The rules are TGI's router's (`validation.rs`): they run before a request is queued, so a bad
request costs nothing but its own answer. Messages name the parameter and the limit, never the
prompt.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic

from handler.config import Settings
from handler.errors import ClientError, ValidationError
from handler.generation.request import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Schema = TypeVar("Schema", bound=pydantic.BaseModel)

STRICT = pydantic.ConfigDict(
    strict=True, allow_inf_nan=False, extra="ignore", use_attribute_docstrings=True
)
"""Wire schemas take JSON types as they are (no `"5"` for 5, no NaN) and ignore unknown fields,
as TGI's serde structs do. Field docstrings become descriptions in `/openapi.json`."""

TEMPERATURE_RANGE = (1e-4, 1e4)
"""Accepted temperatures are clamped into this range: the token selector and Neuron's sampling
parameters are float32, where 1e300 overflows (and failed the whole step) and 1e-300 divides
the logits into infinities. Below 1e-4 sampling is already greedy, above 1e4 already uniform."""
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
"""Accepted repetition penalties are clamped into this range, for the same float32 reason."""


class Answer(pydantic.BaseModel):
    """Base of the answer schemas: they document what the formatting functions send."""

    model_config = pydantic.ConfigDict(use_attribute_docstrings=True)


class ErrorResponse(Answer):
    """TGI's error body, the answer to every failed request (and the last event of a failed
    TGI stream)."""

    error: str
    """What went wrong and what to change; never the prompt, never a traceback."""
    error_type: str
    """`validation`, `overloaded`, `generation`, `healthcheck`, `bad_request`..."""


@dataclass(frozen=True)
class ApiContext:
    """What turning a wire request into a `GenerationRequest` needs."""

    settings: Settings
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    vocab_size: int
    on_device_sampling: bool = False
    """The model samples on the device (Neuron): no seeds, penalties, typical-p or logprobs."""


def parse(schema: type[Schema], body: Any) -> Schema:
    """Validate a decoded JSON body; errors name the field, not the value."""
    if not isinstance(body, dict):
        raise ValidationError(f"expected a JSON object, got {_json_type(body)}")
    try:
        return schema.model_validate(body)
    except pydantic.ValidationError as exc:
        known = _field_names(schema)
        problems = []
        for error in exc.errors(include_url=False, include_input=False)[:3]:
            # Only field names and indices: a key of a free-form object is the caller's text,
            # and pydantic's union tags (`list[str]`) mean nothing to the caller.
            parts = [str(p) for p in error["loc"] if isinstance(p, int) or p in known]
            problems.append(f"`{'.'.join(parts) or 'body'}`: {error['msg']}")
        raise ValidationError("; ".join(problems)) from None


@functools.cache
def _field_names(schema: type[pydantic.BaseModel]) -> frozenset[str]:
    """Every property name of `schema` and the models nested in it."""
    document = schema.model_json_schema()
    objects = [document, *document.get("$defs", {}).values()]
    return frozenset(name for obj in objects for name in obj.get("properties", {}))


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def encode(ctx: ApiContext, text: str, truncate: int | None, add_special_tokens: bool) -> list[int]:
    """Tokenize a prompt; with `truncate`, keep its last `truncate` tokens (TGI)."""
    limit = ctx.settings.max_input_tokens
    if not text:
        raise ValidationError("`inputs` cannot be empty")
    if truncate is not None and not 0 < truncate <= limit:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {limit}. Given: {truncate}"
        )
    ids = ctx.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    if truncate is not None:
        ids = ids[-truncate:]
    if not ids:
        raise ValidationError("`inputs` cannot be empty")
    if len(ids) > limit:
        raise ValidationError(f"`inputs` must have less than {limit} tokens. Given: {len(ids)}")
    return ids


def token_budget(
    ctx: ApiContext, prompt_tokens: int, max_new_tokens: int | None, name: str = "max_new_tokens"
) -> int:
    """`max_new_tokens`, checked against what the sequence length leaves; by default all of it.
    `name` is the parameter as the caller's API calls it."""
    total = ctx.settings.max_total_tokens
    if max_new_tokens is None:
        return total - prompt_tokens
    if max_new_tokens <= 0:
        raise ValidationError(f"`{name}` must be strictly positive")
    if prompt_tokens + max_new_tokens > total:
        raise ValidationError(
            f"`inputs` tokens + `{name}` must be <= {total}. "
            f"Given: {prompt_tokens} `inputs` tokens and {max_new_tokens} `{name}`"
        )
    return max_new_tokens


def sampling_params(
    ctx: ApiContext,
    *,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    seed: int | None = None,
    top_n_tokens: int | None = None,
    top_n_name: str = "top_n_tokens",
) -> SamplingParams:
    """TGI's parameter checks, in its order. `top_n_name` names `top_n_tokens` as the caller's
    API does."""
    if temperature is not None and temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if frequency_penalty is not None and not -2 <= frequency_penalty <= 2:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if presence_penalty is not None and not -2 <= presence_penalty <= 2:
        raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    if top_p is not None and not 0 < top_p < 1:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if typical_p is not None and not 0 < typical_p < 1:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if top_k is not None and top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    top_n = top_n_tokens or 0
    if not 0 <= top_n <= ctx.settings.max_top_n_tokens:
        raise ValidationError(
            f"`{top_n_name}` must be >= 0 and <= {ctx.settings.max_top_n_tokens}. Given: {top_n}"
        )
    if seed is not None and not 0 <= seed < 2**64:
        raise ValidationError("`seed` must be an integer between 0 and 2^64 - 1")
    if ctx.on_device_sampling:
        unavailable = {
            "seed": seed is not None,
            "repetition_penalty": repetition_penalty not in (None, 1.0),
            "frequency_penalty": frequency_penalty not in (None, 0.0),
            "presence_penalty": presence_penalty not in (None, 0.0),
            "typical_p": typical_p is not None,
            top_n_name: top_n > 0,
        }
        for name, used in unavailable.items():
            if used:
                raise on_device_sampling_error(name)
    return SamplingParams(
        do_sample=do_sample,
        temperature=_clamp(temperature, TEMPERATURE_RANGE) if temperature is not None else 1.0,
        top_k=min(top_k or 0, ctx.vocab_size),
        top_p=top_p if top_p is not None else 1.0,
        typical_p=typical_p if typical_p is not None else 1.0,
        repetition_penalty=(
            _clamp(repetition_penalty, REPETITION_PENALTY_RANGE)
            if repetition_penalty is not None
            else 1.0
        ),
        frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0,
        seed=seed,
        top_n_tokens=top_n,
    )


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return min(max(value, low), high)


def on_device_sampling_error(name: str) -> ValidationError:
    return ValidationError(
        f"`{name}` is not available: this model was compiled with on-device sampling, which "
        "only takes temperature, top_k and top_p. Export it without on-device sampling to use it"
    )


def stop_sequences(ctx: ApiContext, stop: list[str] | str | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    limit = ctx.settings.max_stop_sequences
    if len(stops) > limit:
        raise ValidationError(f"`stop` supports up to {limit} stop sequences. Given: {len(stops)}")
    return stops


def request(
    ctx: ApiContext,
    prompt_ids: list[int],
    max_new_tokens: int | None,
    params: SamplingParams,
    stop: list[str],
    decoder_input_details: bool = False,
    max_new_tokens_name: str = "max_new_tokens",
) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=token_budget(ctx, len(prompt_ids), max_new_tokens, max_new_tokens_name),
        params=params,
        stop_sequences=stop,
        decoder_input_details=decoder_input_details,
    )


def unsupported(name: str, why: str = "") -> ClientError:
    """A parameter TGI accepts that this server does not implement: say so, never ignore it."""
    return ValidationError(f"`{name}` is not supported by this server{why}")


# --- output ----------------------------------------------------------------------------------


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: report those log-probabilities as null."""
    return value if value is not None and math.isfinite(value) else None


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(payload: Any) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + dumps(payload).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"


def stream_error(error: ClientError | Exception, openai: bool) -> bytes:
    """The error event that ends a stream: TGI's `{"error","error_type"}` on TGI routes,
    `{"error": {"message","type","code"}}` on OpenAI routes (what the `openai` client parses)."""
    message = getattr(error, "message", "Internal server error")
    error_type = getattr(error, "error_type", "server_error")
    if openai:
        status = getattr(error, "status", 500)
        return sse({"error": {"message": message, "type": error_type, "code": status}})
    return sse({"error": message, "error_type": error_type})
