"""Wire requests to engine requests, with the real tokenizer (no model, no server)."""

from __future__ import annotations

import pytest

from handler.api import openai, tgi
from handler.api.common import ApiContext, parse
from handler.config import read_settings
from handler.errors import TemplateError, ValidationError


@pytest.fixture(scope="module")
def ctx(tokenizer) -> ApiContext:
    settings = read_settings([], {"MAX_BATCH_SIZE": "4", "MAX_TOTAL_TOKENS": "512"})
    return ApiContext(settings, tokenizer, "smollm2", vocab_size=49152)


def test_tgi_samples_by_default_only_without_parameters(ctx: ApiContext) -> None:
    bare = tgi.validate(ctx, parse(tgi.GenerateRequest, {"inputs": "Hi"}), streaming=False)
    assert bare.request.params.sampling
    assert bare.request.max_new_tokens == 512 - len(bare.request.prompt_ids)
    empty = parse(tgi.GenerateRequest, {"inputs": "Hi", "parameters": {}})
    assert not tgi.validate(ctx, empty, streaming=False).request.params.sampling


def test_truncate_keeps_the_last_tokens(ctx: ApiContext, tokenizer) -> None:
    text = "one two three four five six seven"
    body = parse(tgi.GenerateRequest, {"inputs": text, "parameters": {"truncate": 3}})
    call = tgi.validate(ctx, body, streaming=False)
    assert call.request.prompt_ids == tokenizer(text).input_ids[-3:]


def test_openai_temperature_zero_is_greedy_and_top_p_one_is_off(ctx: ApiContext) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    greedy = openai.validate_chat(
        ctx,
        parse(openai.ChatCompletionRequest, {"messages": messages, "temperature": 0, "top_p": 1}),
    )
    params = greedy.requests[0].params
    assert not params.sampling and params.top_p == 1.0
    default = openai.validate_chat(ctx, parse(openai.ChatCompletionRequest, {"messages": messages}))
    assert default.requests[0].params.sampling


def test_chat_prompt_is_the_template_tokenized_without_extra_special_tokens(
    ctx: ApiContext, tokenizer
) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    call = openai.validate_chat(ctx, parse(openai.ChatCompletionRequest, {"messages": messages}))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert call.requests[0].prompt_ids == tokenizer(text, add_special_tokens=False).input_ids


def test_a_tokenizer_without_template_is_a_template_error(ctx: ApiContext, tokenizer) -> None:
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    no_template = ApiContext(ctx.settings, bare, "m", 49152)
    body = parse(openai.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(TemplateError) as raised:
        openai.validate_chat(no_template, body)
    assert raised.value.status == 422 and raised.value.error_type == "template_error"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"inputs": 3}, "inputs"),
        ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, "max_new_tokens"),
        ({"inputs": "x", "parameters": {"temperature": float("nan")}}, "temperature"),
        ({"inputs": "x", "parameters": {"stop": "a"}}, "stop"),
        ({}, "inputs"),
    ],
)
def test_schema_errors_name_the_field(body: dict, named: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse(tgi.GenerateRequest, body)
    assert named in raised.value.message
    assert raised.value.message.startswith("Input validation error: ")


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"seed": 3}, "seed"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"top_n_tokens": 2}, "top_n_tokens"),
        ({"decoder_input_details": True}, "decoder_input_details"),
    ],
)
def test_on_device_sampling_refuses_what_it_cannot_do(
    ctx: ApiContext, parameters: dict, named: str
) -> None:
    on_device = ApiContext(ctx.settings, ctx.tokenizer, "m", 49152, on_device_sampling=True)
    body = parse(tgi.GenerateRequest, {"inputs": "Hi", "parameters": parameters})
    with pytest.raises(ValidationError) as raised:
        tgi.validate(on_device, body, streaming=False)
    assert f"`{named}` is not available" in raised.value.message
    assert "on-device sampling" in raised.value.message
    # Temperature, top-k and top-p are what on-device sampling takes.
    fine = {"inputs": "Hi", "parameters": {"temperature": 0.7, "top_k": 5, "top_p": 0.9}}
    assert tgi.validate(on_device, parse(tgi.GenerateRequest, fine), streaming=False)


def test_on_device_sampling_refuses_openai_logprobs(ctx: ApiContext) -> None:
    on_device = ApiContext(ctx.settings, ctx.tokenizer, "m", 49152, on_device_sampling=True)
    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}
    with pytest.raises(ValidationError, match="`logprobs` is not available"):
        openai.validate_chat(on_device, parse(openai.ChatCompletionRequest, body))
