"""Structured output requests, as each API spells them, turned into one compiled `Constraint`.

TGI: `parameters.grammar` = `{"type": "json" | "json_object", "value": schema}`, `{"type":
"json_schema", "value": {"name", "schema"}}` or `{"type": "regex", "value": pattern}` (TGI's
router). OpenAI: `response_format` `json_object` / `json_schema`; vLLM: `structured_outputs`
(`json`, `regex`, `choice`, `grammar`, `json_object`) and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (with `guided_whitespace_pattern`). One
request asks for one of them. Grammars compile here, in the request thread: an invalid schema
or regex is a 422 naming the field before anything is queued.
"""

from __future__ import annotations

import json
from typing import Any

from handler.api.common import ApiContext, on_device_sampling_error
from handler.errors import ValidationError
from handler.generation.grammar import Constraint, compiler_for

BACKENDS = ("auto", "guidance", "llguidance")
"""`guided_decoding_backend` values this server honours (it runs llguidance only)."""


def _schema(value: Any, name: str) -> Any:
    """A schema given as an object, or as JSON text (TGI and vLLM accept both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValidationError(f"`{name}` is not valid JSON") from None
    if value is True or isinstance(value, dict):
        return value
    raise ValidationError(f"`{name}` must be a JSON schema (an object)")


def _check(ctx: ApiContext, name: str) -> None:
    if ctx.on_device_sampling:
        raise on_device_sampling_error(name)


def tgi_grammar(ctx: ApiContext, grammar: Any) -> Constraint:
    """TGI's `parameters.grammar`."""
    name = "grammar"
    _check(ctx, name)
    if not isinstance(grammar, dict) or "type" not in grammar or "value" not in grammar:
        raise ValidationError(
            '`grammar` must be {"type": "json" | "json_schema" | "regex", "value": ...}'
        )
    kind, value = grammar["type"], grammar["value"]
    compiler = compiler_for(ctx.tokenizer, ctx.vocab_size)
    if kind in ("json", "json_object"):
        return compiler.json_schema(_schema(value, "grammar.value"), "grammar.value")
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise ValidationError('`grammar.value` must be {"name": ..., "schema": {...}}')
        field = "grammar.value.schema"
        return compiler.json_schema(_schema(value["schema"], field), field)
    if kind == "regex":
        if not isinstance(value, str):
            raise ValidationError("`grammar.value` must be a regex (a string)")
        return compiler.regex(value, "grammar.value")
    raise ValidationError(
        f"`grammar.type` must be json, json_schema or regex. Given: {str(kind)[:40]!r}"
    )


def openai_constraint(
    ctx: ApiContext,
    response_format: dict[str, Any] | None,
    structured_outputs: dict[str, Any] | None,
    guided: dict[str, Any],
    whitespace_pattern: str | None,
    backend: str | None,
) -> Constraint | None:
    """The one constraint of an OpenAI request (chat or completions), or None.
    `guided`: vLLM's `guided_*` fields by name, unset ones left out."""
    if backend is not None and backend not in BACKENDS:
        raise ValidationError(
            f"`guided_decoding_backend` must be one of {', '.join(BACKENDS)}: this server "
            f"constrains with llguidance. Given: {backend[:40]!r}"
        )
    asked: list[tuple[str, str, Any]] = []  # (field name, kind, value)
    if response_format not in (None, {"type": "text"}):
        kind = response_format.get("type")
        if kind == "json_object":
            asked.append(("response_format", "json", {"type": "object"}))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ValidationError(
                    '`response_format.json_schema` must be {"name": ..., "schema": {...}, '
                    '"strict": ...}'
                )
            asked.append(("response_format.json_schema.schema", "json", spec["schema"]))
        else:
            raise ValidationError(
                "`response_format.type` must be text, json_object or json_schema. "
                f"Given: {str(kind)[:40]!r}"
            )
    if structured_outputs:
        kinds = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}
        for key, value in structured_outputs.items():
            if key in kinds and value is not None:
                asked.append((f"structured_outputs.{key}", kinds[key], value))
            elif key == "json_object" and value:
                asked.append(("structured_outputs.json_object", "json", {"type": "object"}))
            elif key == "whitespace_pattern" and value is not None:
                whitespace_pattern = value
            elif key == "disable_any_whitespace" and value is not None:
                pass  # without a pattern, no free whitespace is the default here
            elif value not in (None, False):
                raise ValidationError(
                    f"`structured_outputs.{key[:40]}` is not supported by this server: use "
                    "json, regex, choice, grammar or json_object"
                )
    for key, kind in (("json", "json"), ("regex", "regex"), ("choice", "choice")):
        if f"guided_{key}" in guided:
            asked.append((f"guided_{key}", kind, guided[f"guided_{key}"]))
    if "guided_grammar" in guided:
        asked.append(("guided_grammar", "grammar", guided["guided_grammar"]))
    if not asked:
        return None
    if len(asked) > 1:
        names = ", ".join(f"`{name}`" for name, _, _ in asked)
        raise ValidationError(f"only one structured output may be asked for. Given: {names}")
    name, kind, value = asked[0]
    _check(ctx, name)
    if whitespace_pattern is not None and not isinstance(whitespace_pattern, str):
        raise ValidationError("`guided_whitespace_pattern` must be a regex (a string)")
    compiler = compiler_for(ctx.tokenizer, ctx.vocab_size)
    if kind == "json":
        return compiler.json_schema(_schema(value, name), name, whitespace_pattern)
    if kind == "regex":
        if not isinstance(value, str):
            raise ValidationError(f"`{name}` must be a regex (a string)")
        return compiler.regex(value, name)
    if kind == "choice":
        if not isinstance(value, list):
            raise ValidationError(f"`{name}` must be a list of strings")
        return compiler.choice(value, name)
    if not isinstance(value, str):
        raise ValidationError(f"`{name}` must be a grammar (Lark or GBNF text)")
    return compiler.lark(value, name)


def check_compatible(
    constraint: Constraint | None, ignore_eos: bool, min_tokens: int, name: str = "the grammar"
) -> None:
    """The grammar decides where the answer ends: `ignore_eos` and `min_tokens` would fight it."""
    if constraint is None:
        return
    if ignore_eos:
        raise ValidationError(
            f"`ignore_eos` cannot be combined with structured output: {name} decides where "
            "the answer ends"
        )
    if min_tokens:
        raise ValidationError(
            f"`min_tokens` cannot be combined with structured output: {name} decides where "
            "the answer ends"
        )
