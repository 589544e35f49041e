"""What every wire format shares: parsing bodies into schemas, TGI's validation rules, SSE.

The rules are TGI's router's (`validation.rs`): they run before a request is queued, so a bad
request costs nothing but its own answer. Messages name the parameter and the limit, never the
prompt.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pydantic

from handler.config import Settings
from handler.errors import ClientError, ValidationError
from handler.generation.request import GenerationRequest
from handler.model.params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from handler.engine import Engine
    from handler.generation.grammar import Constraint

logger = logging.getLogger("handler.api")

Schema = TypeVar("Schema", bound=pydantic.BaseModel)

STRICT = pydantic.ConfigDict(
    strict=True, allow_inf_nan=False, extra="allow", use_attribute_docstrings=True
)
"""Wire schemas take JSON types as they are (no `"5"` for 5, no NaN). Unknown fields are kept
aside for `parse`, which refuses those that would change the answer and logs the others. Field
docstrings become descriptions in `/openapi.json`."""


@dataclass(frozen=True)
class Refused:
    """An undeclared request field that would change what the answer must be: a request that
    uses it gets a 422 naming it, never an answer that ignores it."""

    why: str
    """Completes "`name` is not supported by this server": what to do instead."""
    inert: tuple[Any, ...] = ()
    """Values that ask for nothing (as well as null, false and empty), accepted silently."""

    def asks_for_something(self, value: Any) -> bool:
        return value not in (None, False, "", [], {}) and value not in self.inert


class WireRequest(pydantic.BaseModel):
    """Base of the request schemas (and of the objects nested in them)."""

    model_config = STRICT

    refused: ClassVar[Mapping[str, Refused]] = {}
    """Undeclared fields this schema refuses (see `Refused`); other unknown fields are logged
    once per name and ignored, as vLLM does."""


MAX_LOGGED_FIELDS = 256
"""Distinct unknown field names logged per process; names are the caller's text, so the set of
those already logged is bounded."""
_logged_fields: set[str] = set()
_logged_lock = threading.Lock()

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
    prompt_logprobs: bool = True
    """The backend can report prompt log-probabilities (`ModelShape.prompt_logprobs`)."""
    max_top_k: int | None = None
    """The largest `top_k` the model honours (`ModelShape.max_top_k`); None: any."""
    messages_api: bool = False
    """`MESSAGES_API_ENABLED`: `/invocations` takes chat completion bodies only, as TGI's."""

    @classmethod
    def of(cls, engine: Engine) -> ApiContext:
        """The context of a loaded engine: its settings (with the compiled shapes of an exported
        model applied) and what its backend can do."""
        settings, shape = engine.settings, engine.backend.shape
        return cls(
            settings=settings,
            tokenizer=engine.tokenizer,
            model_id=engine.model_id,
            vocab_size=shape.vocab_size,
            on_device_sampling=shape.on_device_sampling,
            prompt_logprobs=shape.prompt_logprobs and not shape.on_device_sampling,
            max_top_k=shape.max_top_k,
            messages_api=settings.messages_api_enabled,
        )


def parse(schema: type[Schema], body: Any) -> Schema:
    """Validate a decoded JSON body; errors name the field, not the value. Unknown fields are
    refused when the schema says they would change the answer, else logged once per name."""
    if not isinstance(body, dict):
        raise ValidationError(f"expected a JSON object, got {_json_type(body)}")
    try:
        parsed = schema.model_validate(body)
    except pydantic.ValidationError as exc:
        known = _field_names(schema)
        problems = []
        for error in exc.errors(include_url=False, include_input=False)[:3]:
            # Only field names and indices: a key of a free-form object is the caller's text,
            # and pydantic's union tags (`list[str]`) mean nothing to the caller.
            parts = [str(p) for p in error["loc"] if isinstance(p, int) or p in known]
            problems.append(f"`{'.'.join(parts) or 'body'}`: {error['msg']}")
        raise ValidationError("; ".join(problems)) from None
    ignored: list[str] = []
    _screen(parsed, "", ignored)
    _log_ignored(schema.__name__, ignored)
    return parsed


def _screen(model: pydantic.BaseModel, prefix: str, ignored: list[str]) -> None:
    """Refuse `model`'s refused extras (and those of the models nested in it); collect the
    dotted names of the other extras in `ignored`."""
    refused = getattr(type(model), "refused", {})
    for name, value in (model.model_extra or {}).items():
        refusal = refused.get(name)
        if refusal is None:
            ignored.append(prefix + name)
        elif refusal.asks_for_something(value):
            raise unsupported(prefix + name, refusal.why)
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, pydantic.BaseModel):
            _screen(value, f"{prefix}{name}.", ignored)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, pydantic.BaseModel):
                    _screen(item, f"{prefix}{name}[].", ignored)


def _log_ignored(schema: str, names: list[str]) -> None:
    """Log each unknown field name once per process (never its value)."""
    with _logged_lock:
        fresh = [n for n in dict.fromkeys(names) if f"{schema}:{n}" not in _logged_fields]
        room = MAX_LOGGED_FIELDS - len(_logged_fields)
        for name in fresh[: max(room, 0)]:
            _logged_fields.add(f"{schema}:{name}")
    for name in fresh[: max(room, 0)]:
        shown = name if len(name) <= 64 else name[:61] + "..."
        logger.warning(
            "request field %r of %s is not used by this server and was ignored (logged once "
            "per field name)",
            shown,
            schema,
        )


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
    min_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    seed: int | None = None,
    top_n_tokens: int | None = None,
    top_n_name: str = "top_n_tokens",
    logit_bias: Mapping[str, float] | None = None,
    min_tokens: int | None = None,
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
    if top_k is not None and ctx.max_top_k is not None and top_k > ctx.max_top_k:
        raise ValidationError(
            f"`top_k` must be <= {ctx.max_top_k} for this model: its on-device sampler was "
            f"compiled for at most {ctx.max_top_k} candidates. Given: {top_k}"
        )
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValidationError("`min_p` must be >= 0.0 and <= 1.0")
    if min_tokens is not None and min_tokens < 0:
        raise ValidationError("`min_tokens` must be >= 0")
    bias = _logit_bias(ctx, logit_bias or {})
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
            "min_p": min_p not in (None, 0.0),
            "logit_bias": bool(bias),
            "min_tokens": bool(min_tokens),
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
        min_p=min_p or 0.0,
        logit_bias=bias,
        min_tokens=min_tokens or 0,
    )


def _logit_bias(ctx: ApiContext, bias: Mapping[str, float]) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: token ids (as JSON object keys) to values in [-100, 100]."""
    pairs = []
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= ctx.vocab_size:
            raise ValidationError(
                f"`logit_bias` keys must be token ids below {ctx.vocab_size}. Given: {key[:20]!r}"
            )
        if not -100 <= value <= 100:
            raise ValidationError(f"`logit_bias` values must be in [-100, 100]. Given: {value}")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return min(max(value, low), high)


def on_device_sampling_error(name: str) -> ValidationError:
    """The 422 for what a model compiled with on-device sampling cannot do, naming the switch
    that exports it with host sampling instead."""
    return ValidationError(
        f"`{name}` is not available: this model was compiled with on-device sampling, which "
        "only takes temperature, top_k and top_p. To use it, export the model with host "
        "sampling: NEURON_ON_DEVICE_SAMPLING=false (--on-device-sampling false) when the "
        "server exports it, or python -m handler.model.neuron_export --on-device-sampling false"
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
    ignore_eos: bool = False,
    stop_token_ids: frozenset[int] = frozenset(),
    constraint: Constraint | None = None,
) -> GenerationRequest:
    if decoder_input_details and not ctx.prompt_logprobs:
        raise ValidationError(
            "prompt log-probabilities (`decoder_input_details`, or `echo` with `logprobs`) are "
            "not available: this model's compiled prefill returns the last position only"
        )
    max_new = token_budget(ctx, len(prompt_ids), max_new_tokens, max_new_tokens_name)
    if params.min_tokens > max_new:
        raise ValidationError(
            f"`min_tokens` must be <= `{max_new_tokens_name}` ({max_new}). "
            f"Given: {params.min_tokens}"
        )
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        params=params,
        stop_sequences=stop,
        decoder_input_details=decoder_input_details,
        ignore_eos=ignore_eos,
        stop_token_ids=stop_token_ids,
        constraint=constraint,
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
