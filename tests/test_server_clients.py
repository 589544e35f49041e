"""Real clients, unchanged, against the real server: openai, huggingface_hub, text-generation."""

from __future__ import annotations

import openai
import pytest
import text_generation
from huggingface_hub import InferenceClient

from tests.conftest import PROMPTS, RunningServer

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def chat_golden(reference_model, tokenizer):
    """Greedy chat answer from `transformers` with the same template rendering."""
    from tests.conftest import reference_greedy

    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out = reference_greedy(reference_model, ids, 24)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_openai_chat_and_completions(server: RunningServer, chat_golden: str, golden) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="anything", messages=CHAT, temperature=0, max_tokens=24
    )
    assert chat.choices[0].message.content == chat_golden
    assert chat.model == "anything"
    assert chat.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="m",
        messages=CHAT,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == chat_golden
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert len(chunks[1].choices[0].logprobs.content[0].top_logprobs) == 2

    completion = client.completions.create(
        model="m", prompt=PROMPTS[0], temperature=0, max_tokens=10
    )
    assert completion.choices[0].text == golden(PROMPTS[0], 10)
    assert completion.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model="m", prompt=PROMPTS[1], temperature=0, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == golden(PROMPTS[1], 10)

    several = client.completions.create(model="m", prompt=PROMPTS[:3], temperature=0, max_tokens=6)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [golden(p, 6) for p in PROMPTS[:3]]


def test_openai_client_sees_errors(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(model="m", messages=CHAT, max_tokens=100_000)
    # TGI's error shape: `error` is the message, which the client keeps as the error body.
    assert "max_tokens" in raised.value.body


def test_huggingface_hub_inference_client(server: RunningServer, chat_golden: str, golden) -> None:
    client = InferenceClient(base_url=server.url)
    output = client.text_generation(PROMPTS[2], max_new_tokens=10, details=True, do_sample=False)
    # It posts to `/`, where `return_full_text` defaults to true, as TGI's router does.
    assert output.generated_text == PROMPTS[2] + golden(PROMPTS[2], 10)
    assert output.details.finish_reason == "length"
    assert len(output.details.tokens) == 10

    stream = client.text_generation(
        PROMPTS[2], max_new_tokens=10, stream=True, details=True, do_sample=False
    )
    events = list(stream)
    assert "".join(e.token.text for e in events) == golden(PROMPTS[2], 10)
    assert events[-1].generated_text == PROMPTS[2] + golden(PROMPTS[2], 10)
    assert events[-1].details.generated_tokens == 10

    chat_client = InferenceClient(base_url=f"{server.url}/v1/chat/completions")
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in chat_client.chat_completion(CHAT, max_tokens=24, temperature=0, stream=True)
        if chunk.choices
    ]
    assert "".join(pieces) == chat_golden
    answer = chat_client.chat_completion(CHAT, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == chat_golden


def test_text_generation_client(server: RunningServer, golden) -> None:
    client = text_generation.Client(server.url, timeout=120)
    response = client.generate(PROMPTS[1], max_new_tokens=8, decoder_input_details=True)
    assert response.generated_text == golden(PROMPTS[1], 8)
    assert response.details.prefill and response.details.tokens
    assert response.details.finish_reason.value == "length"
    tokens = [r.token.text for r in client.generate_stream(PROMPTS[1], max_new_tokens=8)]
    assert "".join(tokens) == golden(PROMPTS[1], 8)
    with pytest.raises(text_generation.errors.ValidationError):
        client.generate(PROMPTS[1], max_new_tokens=8, top_p=1.5)
