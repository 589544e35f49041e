"""Structured output through the real server and real clients: JSON schemas, regexes, choices.

Every answer must parse and validate (`jsonschema`) or full-match, streamed and not, through
`openai` and `huggingface_hub`, alone and many at once mixed with unconstrained requests whose
answers must stay equal to `transformers` greedy.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import llguidance
import openai
import pytest
import requests
import torch
from huggingface_hub import InferenceClient

from handler.api.tools import (
    Function,
    ToolFormat,
    ToolStream,
    detect_format,
    grammar,
    message_calls,
)
from handler.generation.grammar import GrammarCompiler, fill_masks
from handler.generation.sampling import TokenSelector, unpack_bits
from handler.model.params import SamplingParams
from tests.conftest import PROMPTS, RunningServer


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS: list[dict[str, Any]] = [
    obj({"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "maximum": 120}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 4},
    obj(
        {
            "person": obj(
                {
                    "first": {"type": "string", "maxLength": 8},
                    "last": {"type": "string", "maxLength": 8},
                }
            )
        }
    ),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 100},
            {"type": "string", "maxLength": 6},
        ]
    },
    obj({"ok": {"type": "boolean"}}),
    {
        "type": "array",
        "items": obj(
            {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": {"enum": ["a", "b"]}}
        ),
        "minItems": 1,
        "maxItems": 3,
    },
    obj({"version": {"const": 2}, "name": {"type": "string", "maxLength": 8}}),
    obj({"note": {"type": ["string", "null"], "maxLength": 10}}),
    {"enum": ["cat", "dog", "bird"]},
    {"type": "integer", "minimum": 1, "maximum": 12},
    {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
    obj(
        {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 2},
                "minItems": 2,
                "maxItems": 2,
            }
        }
    ),
    {
        "anyOf": [
            obj(
                {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 10}}
            ),
            obj(
                {
                    "kind": {"const": "square"},
                    "side": {"type": "integer", "minimum": 1, "maximum": 10},
                }
            ),
        ]
    },
    {
        "$defs": {"pt": obj({"x": DIGIT, "y": DIGIT})},
        **obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}),
    },
    obj(
        {
            "city": {"type": "string", "maxLength": 10},
            "country": {"type": "string", "maxLength": 10},
        },
        ["city"],
    ),
    obj(
        {
            "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
            "currency": {"enum": ["USD", "EUR"]},
        }
    ),
    obj(
        {
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        }
    ),
]
"""Nested objects, bounded arrays, enums, `required`, `anyOf`, ranges, patterns, `$ref`:
bounded so that SmolLM2 finishes each within `MAX_TOKENS`."""
MAX_TOKENS = 80
MODES = ("openai", "openai-stream", "hub", "hub-stream")


def ask(text: str) -> str:
    return f"Reply with JSON only, valid against this schema: {text}"


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hub(server: RunningServer) -> InferenceClient:
    return InferenceClient(base_url=server.url)


def json_answer(client: openai.OpenAI, hub: InferenceClient, schema: dict, mode: str) -> str:
    """The text of one JSON-constrained answer: chat through `openai` (`response_format`
    json_schema), or TGI generate through `huggingface_hub` (`grammar`), streamed or not."""
    prompt = ask(json.dumps(schema))
    if mode.startswith("openai"):
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        }
        kwargs: dict[str, Any] = dict(
            model="m",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            response_format=fmt,
        )
        if mode == "openai":
            answer = client.chat.completions.create(**kwargs)
            assert answer.choices[0].finish_reason == "stop", answer
            return answer.choices[0].message.content
        chunks = client.chat.completions.create(stream=True, **kwargs)
        parts, finish = [], None
        for chunk in chunks:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop"
        return "".join(parts)
    grammar = {"type": "json", "value": schema}
    if mode == "hub":
        return hub.text_generation(
            prompt, max_new_tokens=MAX_TOKENS, grammar=grammar, return_full_text=False
        )
    stream = hub.text_generation(
        prompt,
        max_new_tokens=MAX_TOKENS,
        grammar=grammar,
        stream=True,
        details=True,
        return_full_text=False,
    )
    tokens = list(stream)
    assert tokens[-1].details.finish_reason == "eos_token", tokens[-1]
    return tokens[-1].generated_text


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_twenty_schemas_alone_through_both_clients_streamed_and_not(client, hub) -> None:
    for i, schema in enumerate(SCHEMAS):
        text = json_answer(client, hub, schema, MODES[i % len(MODES)])
        assert_valid(text, schema)


def test_sixteen_at_once_mixed_with_unconstrained_requests_that_stay_golden(
    client, hub, golden
) -> None:
    """16 requests through 4 slots: 12 constrained (every mode), 4 free completions equal to
    `transformers` greedy: a grammar row never leaks into its batch mates."""
    jobs: list[tuple[str, Any]] = [
        ("json", (SCHEMAS[(5 * i) % len(SCHEMAS)], MODES[i % len(MODES)])) for i in range(12)
    ]
    jobs += [("free", PROMPTS[i]) for i in range(4)]
    jobs = jobs[::2] + jobs[1::2]  # free requests among the constrained ones

    def run(job: tuple[str, Any]) -> str:
        kind, what = job
        if kind == "json":
            return json_answer(client, hub, *what)
        answer = client.completions.create(model="m", prompt=what, max_tokens=16, temperature=0)
        return answer.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(run, jobs))
    for (kind, what), text in zip(jobs, texts):
        if kind == "json":
            assert_valid(text, what[0])
        else:
            assert text == golden(what, 16)


REGEXES = [
    r"(yes|no)\.",
    r"[0-9]{3}-[0-9]{4}",
    r"[A-Z][a-z]{2,6} (is|was) [a-z]{1,10}\.",
    r"\d+(\.\d{1,2})?",
]


def test_regex_and_choice_answers_full_match(client, hub, server: RunningServer) -> None:
    for i, pattern in enumerate(REGEXES):
        answer = client.completions.create(
            model="m",
            prompt=PROMPTS[i],
            max_tokens=24,
            temperature=0,
            extra_body={"guided_regex": pattern},
        )
        assert re.fullmatch(pattern, answer.choices[0].text), (pattern, answer.choices[0].text)
        grammar = {"type": "regex", "value": pattern}
        text = hub.text_generation(
            PROMPTS[i], max_new_tokens=24, grammar=grammar, return_full_text=False
        )
        assert re.fullmatch(pattern, text), (pattern, text)
    choices = ["Paris", "London", "Berlin"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        answer = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
            extra_body=body,
        )
        assert answer.choices[0].message.content in choices
    # A sampled choice, streamed, through /v1/completions with two choices per prompt.
    chunks = client.completions.create(
        model="m",
        prompt="My favourite city is",
        max_tokens=8,
        n=2,
        seed=3,
        stream=True,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(t in choices for t in texts), texts


def test_json_object_and_guided_json_give_json(client) -> None:
    answer = client.completions.create(
        model="m",
        prompt="A JSON object describing a cat:",
        max_tokens=60,
        temperature=0,
        extra_body={"guided_json": SCHEMAS[0]},
    )
    assert_valid(answer.choices[0].text, SCHEMAS[0])
    answer = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Give me a JSON object with a name."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # an open schema may run to the budget: it must still be a prefix of an object
        assert answer.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "strin"}},
                }
            },
            "Invalid type: strin",
        ),
        ({"guided_json": {"type": "object", "not": {"required": ["a"]}}}, "Unimplemented keys"),
        ({"guided_regex": "(?<=a)b"}, "look-around"),
        ({"guided_regex": "[a-"}, "unclosed character class"),
        ({"guided_grammar": "start: @@"}, "guided_grammar"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "only one structured output"),
        ({"guided_json": {"type": "object"}, "ignore_eos": True}, "ignore_eos"),
        ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "llguidance"),
        ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
    ],
)
def test_an_invalid_request_is_a_422_naming_the_cause_and_the_next_is_unaffected(
    server: RunningServer, golden, body: dict, named: str
) -> None:
    request = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, **body}
    response = requests.post(f"{server.url}/v1/completions", json=request, timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"
    assert named in response.json()["error"], response.text
    plain = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    answer = requests.post(f"{server.url}/v1/completions", json=plain, timeout=60).json()
    assert answer["choices"][0]["text"] == golden(PROMPTS[0], 6)


# --- the token selector, without a server ----------------------------------------------------


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer))


def test_the_mask_leaves_greedy_the_best_allowed_token_and_logprobs_the_models(
    compiler, tokenizer
) -> None:
    """Greedy picks the most likely allowed token; the reported log-probability is the model's
    own (before masking); end tokens are allowed exactly when the grammar may end, and a
    finished grammar says so."""
    vocab = len(tokenizer)
    selector = TokenSelector(2, vocab)
    constraint = compiler.choice(["yes", "no"], "choice")
    eos = tokenizer.eos_token_id
    selector.assign(0, SamplingParams(), [1, 2], frozenset({eos, 7}), constraint)
    selector.assign(1, SamplingParams(), [1, 2], frozenset({eos}))
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    yes, no = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    logits[0, no] = 5.0
    logits[0, yes] = 4.0
    logits[0, 123] = 9.0  # the model's favourite, not allowed
    original = logits.clone()
    selection = selector.select(logits, [0, 1])
    assert selection.ids[0] == no
    assert selection.ids[1] == int(original[1].argmax())  # the free row is untouched
    assert torch.equal(logits, original)  # masks are undone
    expected = torch.log_softmax(original[0], -1)[no]
    assert selection.logprobs[0] == pytest.approx(float(expected), abs=1e-5)
    assert constraint.finished  # "no" is a whole choice: nothing may follow it
    # A grammar that may end allows every end token of its request (7 is a stop token id).
    open_ended = compiler.regex("a+", "regex")
    open_ended.consume(tokenizer("a", add_special_tokens=False).input_ids[0])
    selector.assign(0, SamplingParams(), [1], frozenset({eos, 7}), open_ended)
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    fill_masks([open_ended], bitmask)
    assert bool(unpack_bits(bitmask, vocab)[0, eos])
    logits = torch.full((1, vocab), -5.0)
    logits[0, 7] = 3.0
    assert selector.select(logits, [0]).ids == [7]
    assert open_ended.finished


def test_masks_computed_during_the_forward_choose_as_masks_computed_after_it(
    compiler, tokenizer
) -> None:
    """`prepare` (masks computed while the model runs) changes nothing the selector chooses,
    also when a prepared step never reaches `select` (its forward failed) and the next step
    has other rows."""
    vocab = len(tokenizer)
    schema = {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1}
    selectors = [TokenSelector(3, vocab), TokenSelector(3, vocab)]
    for selector in selectors:
        grammars = [compiler.regex("[0-9]{1,40}", "regex"), compiler.json_schema(schema, "schema")]
        for slot, constraint in enumerate(grammars):
            selector.assign(
                slot, SamplingParams(), [1], frozenset({tokenizer.eos_token_id}), constraint
            )
        selector.assign(2, SamplingParams(), [1])
    overlapped, plain = selectors
    chooser = torch.Generator().manual_seed(0)
    written: list[int] = []  # slot 1's tokens
    for step in range(24):
        slots = [0, 1, 2] if step % 5 else [1, 2]
        logits = torch.randn(len(slots), vocab, generator=chooser)
        # Step 7 is not prepared; a step with other rows was, and its forward failed.
        overlapped.prepare([1, 2] if step == 7 else slots)
        ids = overlapped.select(logits.clone(), slots).ids
        assert ids == plain.select(logits.clone(), slots).ids
        written.append(ids[slots.index(1)])
    assert overlapped.mask_steps == plain.mask_steps == 24
    text = tokenizer.decode(written)
    assert text.startswith('["')  # the grammar held: a JSON array of strings


# --- tool-call formats, without a server ---------------------------------------------------------

HERMES = ToolFormat("hermes", "arguments", "<tool_call>\n", "\n", "\n</tool_call>")
LLAMA = ToolFormat("llama3_json", "parameters", "", "; ", "")
MISTRAL = ToolFormat("mistral", "arguments", "[TOOL_CALLS]", ", ", "]", 5)
CALLS = [("get_weather", {"city": "Paris", "tags": ["a}", {"b": "]"}]}), ("get_time", {})]


def written(fmt: ToolFormat, content: str = "") -> str:
    """The calls as the model writes them in `fmt` (what the tool grammar lets through)."""
    key = fmt.arguments_key
    bodies = [json.dumps({"name": name, key: arguments}) for name, arguments in CALLS]
    if fmt.family == "hermes":
        return content + "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies)
    if fmt.family == "mistral":
        return content + "[TOOL_CALLS][" + ", ".join(bodies) + "]"
    return "; ".join(bodies)


@pytest.mark.parametrize("fmt", [HERMES, LLAMA, MISTRAL], ids=lambda f: f.family)
def test_each_format_parses_whole_and_streamed_to_the_same_calls(fmt: ToolFormat) -> None:
    content = "" if fmt.family == "llama3_json" else "Let me look. "
    text = written(fmt, content)
    message, calls = message_calls(fmt, text)
    assert message == (content.strip() or None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (name, arguments) for name, arguments in CALLS
    ]
    stream = ToolStream(fmt)
    streamed_content, arguments, names = "", ["", ""], {}
    for start in range(0, len(text), 3):  # pieces cut anywhere, markers included
        delta = stream.feed(text[start : start + 3], final=start + 3 >= len(text))
        streamed_content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            if "id" in piece:
                names[piece["index"]] = piece["function"]["name"]
            arguments[piece["index"]] += piece.get("function", {}).get("arguments") or ""
    assert streamed_content.strip() == content.strip()
    assert names == {0: "get_weather", 1: "get_time"}
    assert arguments == [c["function"]["arguments"] for c in calls]


def test_text_that_only_looks_like_a_call_start_is_content() -> None:
    assert message_calls(HERMES, "I like <tool tips>") == ("I like <tool tips>", [])
    assert message_calls(LLAMA, "Hello {json}") == ("Hello {json}", [])
    assert message_calls(MISTRAL, "No calls here") == ("No calls here", [])


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("{% for tool in tools %}{{ tool }}{% endfor %}<tool_call>", "hermes"),
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]", "mistral"),
        ('{{ tools }} "parameters": dictionary of argument name', "llama3_json"),
        ("{{ tools }} plain", None),
        ("<tool_call> without the variable", None),
    ],
)  # fmt: skip
def test_the_format_is_read_from_the_chat_template(tokenizer, template, family) -> None:
    class Templated:
        chat_template = template
        all_special_tokens = ()
        added_tokens_encoder: dict[str, int] = {}  # noqa: RUF012

        def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
            return tokenizer(text, add_special_tokens=add_special_tokens)

    fmt = detect_format(Templated())
    assert (fmt.family if fmt else None) == family


def test_tool_grammars_accept_their_format_and_refuse_others(compiler, tokenizer) -> None:
    functions = [Function(name, {"type": "object"}) for name, _ in CALLS]
    for fmt in (HERMES, LLAMA, ToolFormat("mistral", "arguments", "[TOOL_CALLS]", ", ", "]")):
        for lazy in (False, True):
            lark = llguidance.LLMatcher.grammar_from_lark(grammar(fmt, functions, True, lazy))
            ids = tokenizer(written(fmt), add_special_tokens=False).input_ids
            constraint = compiler.compile(lark, "tools", "tool grammar")
            assert constraint.matcher.try_consume_tokens(ids) == len(ids), (fmt.family, lazy)
            assert constraint.matcher.is_accepting()
            wrong = tokenizer('{"name": "other"', add_special_tokens=False).input_ids
            constraint = compiler.compile(lark, "tools", "tool grammar")
            if not lazy:
                assert constraint.matcher.try_consume_tokens(wrong) < len(wrong)
