"""Every request field honoured or refused, through the real server and real clients.

A field that would change what the answer must be is either implemented (and checked here
against `transformers` or against its definition) or refused with a 422 that names it; any other
unknown field is accepted and logged once by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import uuid
from pathlib import Path

import jsonschema
import openai
import pytest
import requests
import torch
from huggingface_hub import InferenceClient
from transformers import AutoTokenizer

from handler.server.app import create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState, Stage
from tests.conftest import PROMPTS, RunningServer, launch_server, reference_greedy

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def generate_reference(model, tokenizer, ids: list[int], **kwargs) -> list[int]:
    """`transformers` `generate` with extra generation arguments (greedy unless they sample)."""
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=model.generation_config.pad_token_id or 0,
            **kwargs,
        )
    return output[0, len(ids) :].tolist()


def chat_ids(tokenizer, messages=CHAT, **template) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template)
    return tokenizer(text, add_special_tokens=False).input_ids


# --- part 2: refused or honoured, never silently dropped ---------------------------------------

CHAT_ROUTES = ("/v1/chat/completions", "/invocations")
COMPLETION_ROUTES = ("/v1/completions", "/invocations")
REFUSED = [
    ("use_beam_search", True, "beam search"),
    ("allowed_token_ids", [1, 2], "restricting the vocabulary"),
]
CHAT_ONLY_REFUSED = [
    ("functions", [{"name": "f", "parameters": {}}], "tool calling"),
    ("function_call", {"name": "f"}, "tool calling"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tool calling"),
    ("tool_choice", "required", "tool calling"),
    ("modalities", ["text", "audio"], "text only"),
    ("audio", {"voice": "alloy", "format": "wav"}, "text only"),
    ("prediction", {"type": "content", "content": "x"}, "predicted outputs"),
]


def cases() -> list[tuple[str, bool, str, object, str]]:
    """(route, chat body?, field, value, what the refusal says), every route a field applies to."""
    table = []
    for name, value, why in REFUSED:
        table += [("/v1/chat/completions", True, name, value, why)]
        table += [("/v1/completions", False, name, value, why)]
        table += [("/invocations", chat, name, value, why) for chat in (True, False)]
    for name, value, why in CHAT_ONLY_REFUSED:
        table += [(route, True, name, value, why) for route in CHAT_ROUTES]
    return table


@pytest.mark.parametrize(("route", "chat", "name", "value", "why"), cases())
def test_a_field_that_would_change_the_answer_is_refused_by_name(
    server: RunningServer, route: str, chat: bool, name: str, value: object, why: str
) -> None:
    if chat:
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0, name: value}
    else:
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, name: value}
    response = requests.post(f"{server.url}{route}", json=body, timeout=60)
    assert response.status_code == 422, (route, name, response.text)
    error = response.json()
    assert error["error_type"] == "validation"
    assert f"`{name}`" in error["error"] and why in error["error"], error


def test_an_invalid_tgi_grammar_is_refused_on_every_generate_route(server: RunningServer) -> None:
    """Structured output is implemented (tests/test_structured_output.py); a grammar that does
    not compile is a 422 naming it, on every route that takes one."""
    grammar = {"type": "json", "value": {"type": "strin"}}
    body = {"inputs": "Hi", "parameters": {"grammar": grammar}}
    for route in ("/generate", "/generate_stream", "/", "/invocations"):
        response = requests.post(f"{server.url}{route}", json=body, timeout=60)
        assert response.status_code == 422, response.text
        assert "`grammar.value`" in response.json()["error"], response.text


def test_inert_values_of_refused_fields_are_accepted(server: RunningServer, golden) -> None:
    """`response_format` text, no tools, `modalities` text: they ask for nothing."""
    body = {
        "messages": CHAT,
        "max_tokens": 4,
        "temperature": 0,
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "tools": [],
        "function_call": "none",
        "guided_json": None,
    }
    assert requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).ok
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    body["response_format"] = {"type": "text"}
    answer = requests.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert answer.json()["choices"][0]["text"] == golden(PROMPTS[0], 4)


def test_continue_final_message_and_add_generation_prompt_take_effect(
    client: openai.OpenAI, tokenizer, reference_model
) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "The capital of France is"}]
    answer = client.chat.completions.create(
        model="m",
        messages=messages,
        temperature=0,
        max_tokens=6,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    ids = chat_ids(tokenizer, messages, continue_final_message=True)
    assert answer.usage.prompt_tokens == len(ids)
    expected = generate_reference(reference_model, tokenizer, ids, max_new_tokens=6)
    assert answer.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(
            model="m", messages=messages, extra_body={"continue_final_message": True}
        )
    assert "add_generation_prompt" in raised.value.body


def test_stream_options_without_stream_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(
            model="m", messages=CHAT, stream_options={"include_usage": True}
        )
    assert "`stream_options` needs `stream`" in raised.value.body


def test_an_unknown_harmless_field_is_logged_once_by_name(engine, caplog) -> None:
    state = ServerState(engine.settings)
    state.engine, state.stage = engine, Stage.READY
    app = create_app(state, Metrics()).test_client()
    name = f"x_unknown_{uuid.uuid4().hex[:8]}"
    body = {"messages": CHAT, "max_tokens": 2, "temperature": 0, name: "secret-value-42"}
    with caplog.at_level(logging.WARNING, logger="handler.api"):
        for _ in range(2):
            assert app.post("/v1/chat/completions", json=body).status_code == 200
        generate = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, name: 1}}
        assert app.post("/generate", json=generate).status_code == 200
    lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 2, lines  # once for chat, once (as `parameters.<name>`) for generate
    assert "ChatCompletionRequest" in lines[0] and f"parameters.{name}" in lines[1]
    assert not any("secret-value-42" in r.getMessage() for r in caplog.records)


# --- part 3: sampling the engine already has, on the OpenAI routes -----------------------------


def test_warpers_that_leave_one_token_equal_transformers(
    client: openai.OpenAI, tokenizer, reference_model
) -> None:
    """top_k 1, min_p 1 and a tiny typical_p each leave exactly one token per step, so sampling
    with them is deterministic and `transformers` sampling with the same warper must agree."""
    ids = tokenizer(PROMPTS[4]).input_ids
    cases = [
        ({"top_k": 1}, {"top_k": 1}),
        ({"min_p": 1.0}, {"min_p": 1.0, "top_k": 0}),
        ({"typical_p": 0.001}, {"typical_p": 0.001, "top_k": 0}),
    ]
    for ours, theirs in cases:
        answer = client.completions.create(
            model="m", prompt=PROMPTS[4], max_tokens=12, seed=11, extra_body=ours
        )
        expected = generate_reference(
            reference_model, tokenizer, ids, max_new_tokens=12, do_sample=True, **theirs
        )
        text = tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.choices[0].text == text, ours


def test_repetition_penalty_equals_transformers(
    client: openai.OpenAI, tokenizer, reference_model
) -> None:
    ids = tokenizer(PROMPTS[2]).input_ids
    answer = client.completions.create(
        model="m",
        prompt=PROMPTS[2],
        max_tokens=16,
        temperature=0,
        extra_body={"repetition_penalty": 1.5},
    )
    expected = generate_reference(
        reference_model, tokenizer, ids, max_new_tokens=16, repetition_penalty=1.5
    )
    assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_ignore_eos_min_tokens_and_stop_token_ids(
    client: openai.OpenAI, tokenizer, reference_model
) -> None:
    ids = chat_ids(tokenizer, add_generation_prompt=True)
    natural = reference_greedy(reference_model, ids, 40)
    assert natural[-1] == tokenizer.eos_token_id and len(natural) < 20  # ends by itself
    base = {"model": "m", "messages": CHAT, "temperature": 0, "max_tokens": 24}

    longer = client.chat.completions.create(**base, extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == 24 and longer.choices[0].finish_reason == "length"

    minimum = len(natural) + 3
    held = client.chat.completions.create(**base, extra_body={"min_tokens": minimum})
    expected = generate_reference(
        reference_model, tokenizer, ids, max_new_tokens=24, min_new_tokens=minimum
    )
    assert held.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert held.usage.completion_tokens >= minimum

    stop_at = natural[1]
    stopped = client.chat.completions.create(**base, extra_body={"stop_token_ids": [stop_at]})
    assert stopped.usage.completion_tokens == natural.index(stop_at) + 1
    assert stopped.choices[0].finish_reason == "stop"


def test_logit_bias_of_minus_100_on_the_greedy_token_changes_it(
    client: openai.OpenAI, tokenizer, reference_model
) -> None:
    ids = tokenizer(PROMPTS[0]).input_ids
    first = reference_greedy(reference_model, ids, 1)[0]
    with torch.inference_mode():
        logits = reference_model(torch.tensor([ids])).logits[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    answer = client.completions.create(
        model="m",
        prompt=PROMPTS[0],
        max_tokens=1,
        temperature=0,
        logprobs=2,
        logit_bias={str(first): -100},
    )
    assert answer.choices[0].text == tokenizer.decode([runner_up])
    # The reported log-probabilities are the model's own, before the bias.
    reported = answer.choices[0].logprobs.top_logprobs[0]
    assert reported[tokenizer.decode([first])] == pytest.approx(
        float(torch.log_softmax(logits, -1)[first]), abs=1e-4
    )


def test_n_choices_with_a_seed_are_reproducible_per_choice(client: openai.OpenAI) -> None:
    request = {"model": "m", "messages": CHAT, "max_tokens": 12, "temperature": 1.0, "seed": 5}
    three = client.chat.completions.create(**request, n=3)
    again = client.chat.completions.create(**request, n=3)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    # Choice j draws with seed + j, as a single choice asked with that seed does. Alone, its
    # logits differ from the batch's in the last bits (batched products round differently, by
    # CPU family too), which can flip a draw that falls at a near tie later in the answer (seed
    # 5 does at its fourth token on AMD EPYC): the first word is compared.
    for j, text in enumerate(texts):
        alone = client.chat.completions.create(**{**request, "seed": 5 + j})
        assert (alone.choices[0].message.content or "").split()[:1] == text.split()[:1]
    assert len(set(texts)) > 1
    assert three.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt counts once
    streamed = client.chat.completions.create(**request, n=3, stream=True)
    pieces = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == texts


def test_echo_reports_prompt_logprobs_like_transformers(
    client: openai.OpenAI, tokenizer, reference_model, golden
) -> None:
    prompt = PROMPTS[1]
    answer = client.completions.create(
        model="m", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    choice = answer.choices[0]
    assert choice.text == prompt + golden(prompt, 5)
    ids = tokenizer(prompt).input_ids
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 5
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    with torch.inference_mode():
        logits = reference_model(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected.tolist(), abs=1e-3)
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:])


def test_completion_streams_carry_logprobs(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="m", prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=1
    )
    chunks = list(
        client.completions.create(
            model="m", prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=1, stream=True
        )
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == whole.choices[0].logprobs.tokens
    values = [v for lp in streamed for v in lp.token_logprobs]
    # The second request starts from the first one's held prompt: the same up to rounding.
    assert values == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-4)
    offsets = [o for lp in streamed for o in lp.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset


# --- part 4: chat history with tool calls ------------------------------------------------------

TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{% if greeting is defined %}{{ greeting }} {% endif %}{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""A Hermes-style template that renders tool calls and results (and reads one extra variable)."""

PARIS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
]


@pytest.fixture(scope="module")
def tool_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The server on SmolLM2 with a tool-capable chat template in its tokenizer config."""
    model = tmp_path_factory.mktemp("tool-model")
    for item in smollm2_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (model / item.name).symlink_to(item)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):  # would win over the config
        if (model / name).exists():
            (model / name).unlink()
    running = launch_server(model, tmp_path_factory.mktemp("tool-server"))
    yield running, model
    assert running.stop() == 0, running.log()
    shutil.rmtree(model, ignore_errors=True)


def test_the_paris_conversation_renders_the_call_and_the_result(tool_server, reference_model):
    server, model_dir = tool_server
    response = requests.post(f"{server.url}/chat_tokenize", json={"messages": PARIS}, timeout=60)
    assert response.status_code == 200, response.text
    text = response.json()["templated_text"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n22 C and sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The answer is generated from that prompt: equal to transformers on the same text.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    answer = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": PARIS, "max_tokens": 16, "temperature": 0},
        timeout=60,
    ).json()
    expected = reference_greedy(reference_model, ids, 16)
    content = answer["choices"][0]["message"]["content"]
    assert content == tokenizer.decode(expected, skip_special_tokens=True)
    assert answer["usage"]["prompt_tokens"] == len(ids)
    # Tools reach the template on /chat_tokenize, and chat_template_kwargs reach it too.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    shown = requests.post(
        f"{server.url}/chat_tokenize",
        json={"messages": PARIS[:1], "tools": tools, "chat_template_kwargs": {"greeting": "Hi!"}},
        timeout=60,
    ).json()["templated_text"]
    assert '"name": "get_weather"' in shown and "Hi! What is the weather" in shown


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 16}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]


@pytest.fixture(scope="module")
def tool_client(tool_server) -> openai.OpenAI:
    server, _ = tool_server
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def assert_valid_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_required_and_named_tool_calls_return_valid_arguments(tool_client) -> None:
    answer = tool_client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls  # one call at most without parallel calls
    assert call.type == "function" and call.id.startswith("call_")
    assert_valid_call(call.function.name, call.function.arguments)
    # With parallel calls the model may go on calling: every complete call is valid.
    answer = tool_client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=90, temperature=0
    )
    assert answer.choices[0].message.tool_calls, answer.choices[0]
    for call in answer.choices[0].message.tool_calls:
        assert_valid_call(call.function.name, call.function.arguments)
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = tool_client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40, temperature=0
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_time" and answer.choices[0].finish_reason == "tool_calls"
    assert_valid_call("get_time", call.function.arguments)
    # Streamed, the same call arrives as an id and a name, then pieces of its arguments.
    chunks = list(
        tool_client.chat.completions.create(
            model="m",
            messages=ASK,
            tools=TOOLS,
            tool_choice=named,
            max_tokens=40,
            temperature=0,
            stream=True,
        )
    )
    pieces = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_time" and pieces[0].index == 0
    assert len(pieces) > 2  # the arguments come in several deltas, as OpenAI streams them
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The legacy `functions` answer `function_call`.
    legacy = requests.post(
        f"{tool_client.base_url}chat/completions",
        json={
            "messages": ASK,
            "functions": [t["function"] for t in TOOLS],
            "function_call": {"name": "get_weather"},
            "max_tokens": 60,
            "temperature": 0,
        },
        timeout=600,
    ).json()
    assert legacy["choices"][0]["finish_reason"] == "function_call", legacy
    called = legacy["choices"][0]["message"]["function_call"]
    assert called["name"] == "get_weather"
    assert_valid_call("get_weather", called["arguments"])


def test_auto_leaves_the_model_free_and_a_tool_result_conversation_answers(
    tool_server, tool_client, reference_model
) -> None:
    """`auto` does not force a call (TGI's defect): without one, the answer is `transformers`
    greedy on the same prompt. The multi-turn conversation with a tool result, with tools
    offered, renders and answers."""
    server, model_dir = tool_server
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Say hello to me."}]
    body = {"messages": messages, "tools": TOOLS}
    text = requests.post(f"{server.url}/chat_tokenize", json=body, timeout=60).json()
    ids = tokenizer(text["templated_text"], add_special_tokens=False).input_ids
    expected = tokenizer.decode(
        reference_greedy(reference_model, ids, 16), skip_special_tokens=True
    )
    answer = tool_client.chat.completions.create(
        model="m", messages=messages, tools=TOOLS, max_tokens=16, temperature=0
    )
    if "<tool_call>" in expected:
        for call in answer.choices[0].message.tool_calls:
            assert_valid_call(call.function.name, call.function.arguments)
    else:
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].message.tool_calls is None
    history = [*PARIS[:2], {**PARIS[2]}]
    answer = tool_client.chat.completions.create(
        model="m", messages=history, tools=TOOLS, tool_choice="auto", max_tokens=24, temperature=0
    )
    message = answer.choices[0].message
    assert message.content or message.tool_calls
    assert answer.usage.prompt_tokens > 0


def test_a_template_without_tool_support_refuses_the_conversation(server: RunningServer) -> None:
    """SmolLM2's own template drops `tool_calls`: a 422 says so instead of a blind answer."""
    for route in ("/chat_tokenize", "/v1/chat/completions"):
        response = requests.post(f"{server.url}{route}", json={"messages": PARIS}, timeout=60)
        assert response.status_code == 422, response.text
        assert response.json()["error_type"] == "template_error"
        assert "does not render tool calls" in response.json()["error"]


def test_chat_template_kwargs_cannot_override_the_request(server: RunningServer) -> None:
    body = {"messages": CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}
    response = requests.post(f"{server.url}/chat_tokenize", json=body, timeout=60)
    assert response.status_code == 422 and "add_generation_prompt" in response.json()["error"]


# --- part 5: TGI details -----------------------------------------------------------------------


def test_compat_routes_return_the_full_text_by_default(server: RunningServer, golden) -> None:
    """TGI's router: POST `/` and `/invocations` default `return_full_text` to true for a
    text-generation model; `/generate` defaults it to false; an explicit false is kept."""
    prompt = PROMPTS[2]
    parameters = {"max_new_tokens": 6, "do_sample": False}
    for route in ("/", "/invocations"):
        body = {"inputs": prompt, "parameters": parameters}
        full = requests.post(f"{server.url}{route}", json=body, timeout=60).json()
        assert full == [{"generated_text": prompt + golden(prompt, 6)}], route
        body["parameters"] = {**parameters, "return_full_text": False}
        short = requests.post(f"{server.url}{route}", json=body, timeout=60).json()
        assert short == [{"generated_text": golden(prompt, 6)}], route
    body = {"inputs": prompt, "parameters": parameters}
    plain = requests.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert plain == {"generated_text": golden(prompt, 6)}
    hub = InferenceClient(base_url=server.url)  # posts to `/`
    assert hub.text_generation(prompt, max_new_tokens=6) == prompt + golden(prompt, 6)
    assert hub.text_generation(prompt, max_new_tokens=6, return_full_text=False) == golden(
        prompt, 6
    )


def test_messages_api_enabled_makes_invocations_a_chat_route(engine, chat_text) -> None:
    state = ServerState(dataclasses.replace(engine.settings, messages_api_enabled=True))
    state.engine, state.stage = engine, Stage.READY
    app = create_app(state, Metrics()).test_client()
    chat = app.post(
        "/invocations", json={"messages": CHAT, "max_tokens": 24, "temperature": 0}
    ).json
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == chat_text
    refused = app.post("/invocations", json={"inputs": "Hi"})
    assert refused.status_code == 422 and "MESSAGES_API_ENABLED" in refused.json["error"]


@pytest.fixture(scope="module")
def chat_text(reference_model, tokenizer) -> str:
    out = reference_greedy(reference_model, chat_ids(tokenizer, add_generation_prompt=True), 24)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_tokenize_honours_truncate(server: RunningServer, tokenizer) -> None:
    text = "one two three four five six seven"
    body = {"inputs": text, "parameters": {"truncate": 3}}
    tokens = requests.post(f"{server.url}/tokenize", json=body, timeout=60).json()
    assert [t["id"] for t in tokens] == tokenizer(text).input_ids[-3:]
    assert tokens[-1]["stop"] == len(text.encode())
    bad = requests.post(
        f"{server.url}/tokenize", json={"inputs": text, "parameters": {"truncate": 0}}, timeout=60
    )
    assert bad.status_code == 422 and "truncate" in bad.json()["error"]
