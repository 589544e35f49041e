"""Tool calling: tools reach the model through its chat template; its calls come back parsed.

The model writes calls in its own format, known from its chat template (one `ToolFormat` per
family, as vLLM's tool parsers): Hermes / Qwen (`<tool_call>\\n{"name", "arguments"}\\n
</tool_call>`), Llama 3.1+ JSON (`{"name", "parameters"}`, several separated by `; `) and
Mistral (`[TOOL_CALLS][{"name", "arguments"}, ...]`). A template with none of them cannot take
`tools` (a 422 says so).

`tool_choice` `required` and a named function constrain the whole answer to calls whose
arguments follow the function's `parameters`; `auto` leaves the model free until it opens a
call (a lazy grammar triggered by the format's marker), then constrains the call. The JSON of a
call is written as `json.dumps` writes it (`JSON_STYLE`), so `parse` reads every call the
grammar lets through, and reads it the same whether streamed or not.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance

from handler.api.common import ApiContext, on_device_sampling_error
from handler.errors import ValidationError
from handler.generation.grammar import JSON_STYLE, Constraint, compiler_for

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TEXT = r"/(.|\n)*/"


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolFormat:
    """How one family of chat templates writes tool calls."""

    family: Literal["hermes", "llama3_json", "mistral"]
    arguments_key: str
    """The key of a call's arguments: `arguments`, or `parameters` (Llama)."""
    open: str
    """Text before the calls (Hermes: before each call)."""
    separator: str
    """Between two calls."""
    close: str
    """Text after the calls (Hermes: after each call)."""
    special_open: int | None = None
    """Token id of `open` when it is one special token (Mistral's `[TOOL_CALLS]`)."""

    @property
    def markers(self) -> frozenset[str]:
        """Special-token texts the parser must see (they are left out of answer text)."""
        return frozenset({self.open}) if self.special_open is not None else frozenset()


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return template if isinstance(template, str) else ""


def detect_format(tokenizer: Any) -> ToolFormat | None:
    """The tool-call format the chat template teaches, or None."""
    template = _template(tokenizer)
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return ToolFormat("hermes", "arguments", "<tool_call>\n", "\n", "\n</tool_call>")
    if "[TOOL_CALLS]" in template:
        special = _special_id(tokenizer, "[TOOL_CALLS]")
        return ToolFormat("mistral", "arguments", "[TOOL_CALLS]", ", ", "]", special)
    if "<|python_tag|>" in template or '"parameters": dictionary of argument name' in template:
        return ToolFormat("llama3_json", "parameters", "", "; ", "")
    return None


def _special_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) == 1 and text in getattr(tokenizer, "all_special_tokens", ()):
        return int(ids[0])
    added = getattr(tokenizer, "added_tokens_encoder", {})
    return int(added[text]) if len(ids) == 1 and text in added else None


@dataclass(frozen=True)
class ToolPlan:
    """A validated tool request: what the template gets and how the answer is read."""

    format: ToolFormat
    functions: list[Function]
    choice: str
    """`auto`, `required`, or the name of the function that must be called."""
    parallel: bool
    legacy: bool
    """`functions` / `function_call`: answered with `function_call`, not `tool_calls`."""
    constraint: Constraint


def template_tools(body: Any) -> list[dict[str, Any] | Callable[..., Any]] | None:
    """The tools as the chat template gets them (legacy `functions` as tools), typed as
    `apply_chat_template` takes them (JSON schemas, or functions it describes itself)."""
    if body.functions:
        return [{"type": "function", "function": f} for f in body.functions]
    return body.tools or None


def _functions(items: list[Any], name: str) -> list[Function]:
    functions = []
    for index, item in enumerate(items):
        spec = item.get("function") if isinstance(item, dict) and name == "tools" else item
        if name == "tools" and (not isinstance(item, dict) or item.get("type") != "function"):
            raise ValidationError(f'`tools[{index}].type` must be "function"')
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValidationError(f"`{name}[{index}]` needs a function `name`")
        if not NAME.fullmatch(spec["name"]):
            raise ValidationError(
                f"`{name}[{index}]` name must be 1 to 64 letters, digits, `_`, `.` or `-`"
            )
        parameters = spec.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ValidationError(f"`{name}[{index}]` parameters must be a JSON schema object")
        functions.append(Function(spec["name"], parameters))
    if len({f.name for f in functions}) != len(functions):
        raise ValidationError(f"`{name}` names a function twice")
    return functions


def plan(ctx: ApiContext, body: Any) -> ToolPlan | None:
    """Validate `tools` / `tool_choice` / `parallel_tool_calls` (or the legacy `functions` /
    `function_call`) and compile the grammar they ask for; None when no call may be made."""
    legacy = bool(body.functions)
    if legacy and body.tools:
        raise ValidationError("`functions` and `tools` cannot be used together: use `tools`")
    if body.function_call is not None and body.tool_choice is not None:
        raise ValidationError("`function_call` and `tool_choice` cannot be used together")
    items = body.functions if legacy else body.tools
    choice_name = "function_call" if body.function_call is not None else "tool_choice"
    choice = body.function_call if body.function_call is not None else body.tool_choice
    if not items:
        if choice not in (None, "none", "auto"):
            raise ValidationError(f"`{choice_name}` needs `tools` (tool calling)")
        return None
    functions = _functions(items, "functions" if legacy else "tools")
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    forced: str | None = None
    if isinstance(choice, dict):
        spec = choice if legacy else choice.get("function")
        named = spec.get("name") if isinstance(spec, dict) else None
        if named not in {f.name for f in functions}:
            listed = "functions" if legacy else "tools"
            raise ValidationError(f"`{choice_name}` names a function that is not in `{listed}`")
        forced = named
    elif choice not in ("auto", "required") or (legacy and choice == "required"):
        raise ValidationError(
            f"`{choice_name}` must be none, auto, {'' if legacy else 'required, '}or a function"
        )
    if ctx.on_device_sampling:
        raise on_device_sampling_error(choice_name if forced or choice != "auto" else "tools")
    fmt = detect_format(ctx.tokenizer)
    if fmt is None:
        raise ValidationError(
            f"`{'functions' if legacy else 'tools'}` needs a chat template with tool calling: "
            "this model's template renders no tool-call format this server parses (Hermes / "
            "Qwen `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`)"
        )
    parallel = body.parallel_tool_calls is not False and not legacy and forced is None
    chosen = [f for f in functions if forced is None or f.name == forced]
    lark = grammar(fmt, chosen, parallel, lazy=forced is None and choice == "auto")
    constraint = compiler_for(ctx.tokenizer, ctx.vocab_size).compile(
        _lark(lark), "tools", "tool grammar"
    )
    return ToolPlan(fmt, functions, forced or str(choice), parallel, legacy, constraint)


def _lark(text: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(text)


def call_schema(fmt: ToolFormat, functions: list[Function]) -> dict[str, Any]:
    """One call's JSON: `{"name": <one of them>, <arguments key>: <its parameters>}`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, fmt.arguments_key: f.parameters},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_STYLE}


def grammar(fmt: ToolFormat, functions: list[Function], parallel: bool, lazy: bool) -> str:
    """The Lark grammar (llguidance's dialect) of an answer under `tool_choice`: calls only
    (`required`, a named function), or text with calls once the model opens one (`auto`)."""
    call = f"%json {json.dumps(call_schema(fmt, functions))}"
    if fmt.family == "hermes":
        body = f'"\\n" {call} {json.dumps(fmt.close)}'
        if lazy:
            head = f'%llguidance {{}}\ntrigger[lazy]: TEXT "<tool_call>"\nTEXT: {TEXT}\n'
            if parallel:
                return head + f"start: called* TEXT\ncalled: trigger {body}\n"
            return head + f"start: TEXT | trigger {body}\n"
        single = f'"<tool_call>" {body}'
        calls = 'call ("\\n" call)*' if parallel else "call"
        return f"start: {calls}\ncall: {single}\n"
    if fmt.family == "mistral":
        items: dict[str, Any] = {"type": "array", "items": call_schema(fmt, functions)}
        items.update({"minItems": 1, "x-guidance": JSON_STYLE})
        if not parallel:
            items["maxItems"] = 1
        opener = f"<[{fmt.special_open}]>" if fmt.special_open is not None else '"[TOOL_CALLS]"'
        calls = f"{opener} %json {json.dumps(items)}"
        if lazy:
            return f"start: TEXT | {calls}\nTEXT: {TEXT}\n"
        return f"start: {calls}\n"
    calls = 'call ("; " call)*' if parallel else "call"
    rules = f"call: {call}\n"
    if lazy:  # Llama answers either with text or with calls only, which open with `{`
        return f"start: PLAIN | {calls}\nPLAIN: /([^{{](.|\\n)*)?/\n{rules}"
    return f"start: {calls}\n{rules}"


# --- reading the answer ----------------------------------------------------------------------


@dataclass
class ParsedCall:
    name: str | None
    arguments: str
    """The arguments' JSON text so far (all of it once `done`)."""
    done: bool


@dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


CALL_HEAD = re.compile(r'\s*\{"name": "((?:[^"\\]|\\.)*)", "(?:arguments|parameters)": ')


def _value_end(text: str, start: int) -> int | None:
    """The index just after the JSON object or array opening at `start`, or None if the text
    ends first."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _call(text: str, start: int) -> tuple[ParsedCall | None, int]:
    """The call whose JSON opens at `start` (None while its name is incomplete), and where
    its JSON ends (or `len(text)`)."""
    head = CALL_HEAD.match(text, start)
    if head is None:
        return None, len(text)
    name = json.loads(f'"{head.group(1)}"')
    end = _value_end(text, head.end())
    arguments = text[head.end() : end] if end is not None else text[head.end() :]
    if end is not None and text.startswith("}", end):
        return ParsedCall(name, arguments, True), end + 1
    return ParsedCall(name, arguments, False), len(text)


def _calls(text: str, position: int, separator: str, calls: list[ParsedCall]) -> None:
    """Append to `calls` the calls that follow one another from `position`, `separator`
    between them, up to the first incomplete one."""
    while position < len(text):
        call, position = _call(text, position)
        if call is None:
            return
        calls.append(call)
        if not call.done or not text.startswith(separator, position):
            return
        position += len(separator)


def _held(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def parse(fmt: ToolFormat, text: str, final: bool) -> Parsed:
    """The content and calls of an answer (`final`) or of the part streamed so far (text that
    may still turn out to open a call is held back)."""
    if fmt.family == "llama3_json":
        stripped = text.lstrip()
        if not stripped:
            return Parsed("" if not final else text)
        if not stripped.startswith("{"):
            return Parsed(text)
        parsed = Parsed("")
        _calls(text, len(text) - len(stripped), fmt.separator, parsed.calls)
        return parsed
    opener = fmt.open.rstrip("\n")
    parsed = Parsed("")
    segments: list[str] = []
    position = 0
    while True:
        found = text.find(opener, position)
        if found < 0:
            tail = text[position:]
            if not final:
                tail = tail[: len(tail) - _held(tail, opener)]
            segments.append(tail)
            break
        segments.append(text[position:found])
        position = found + len(opener)
        if fmt.family == "mistral":
            _calls(text, text.find("[", position) + 1 or len(text), fmt.separator, parsed.calls)
            break
        call, position = _call(text, position)
        if call is None:
            break
        parsed.calls.append(call)
        closing = text.find(fmt.close.strip(), position)
        if not call.done or closing < 0:
            break
        position = closing + len(fmt.close.strip())
    # Whitespace between calls is not content; other text around them is.
    kept = [s for s in segments if s.strip()] if parsed.calls else segments
    parsed.content = "".join(kept)
    return parsed


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolStream:
    """Turns an answer's text pieces into OpenAI chat deltas: content, then each call's id and
    name, then its arguments as they arrive (`tool_calls[i].function.arguments`)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.format = fmt
        self.text = ""
        self.sent_content = 0
        self.sent: list[int] = []
        """Per call already announced, how much of its arguments was sent."""
        self.ids: list[str] = []

    def feed(self, piece: str, final: bool = False) -> dict[str, Any]:
        """The delta for `piece` (`{}` when nothing can be sent yet)."""
        self.text += piece
        parsed = parse(self.format, self.text, final)
        delta: dict[str, Any] = {}
        content = parsed.content[self.sent_content :]
        if content and not (parsed.calls and not content.strip()):
            delta["content"] = content
            self.sent_content = len(parsed.content)
        calls = []
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            entry: dict[str, Any] = {"index": index}
            if index == len(self.sent):
                self.ids.append(call_id())
                self.sent.append(0)
                entry.update({"id": self.ids[index], "type": "function"})
                entry["function"] = {"name": call.name, "arguments": ""}
            fragment = call.arguments[self.sent[index] :]
            if fragment:
                entry.setdefault("function", {})["arguments"] = fragment
                self.sent[index] = len(call.arguments)
            if len(entry) > 1:
                calls.append(entry)
        if calls:
            delta["tool_calls"] = calls
        return delta

    @property
    def called(self) -> bool:
        return bool(self.sent)


def message_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer's content (None when empty) and its complete calls, as OpenAI's
    `message.tool_calls`."""
    parsed = parse(fmt, text, final=True)
    calls = [
        {
            "id": call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in parsed.calls
        if call.done
    ]
    content = parsed.content.strip() if calls else parsed.content
    return content or None, calls
