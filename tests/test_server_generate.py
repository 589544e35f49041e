"""The real gunicorn server on SmolLM2: TGI routes against `transformers` greedy `generate`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from transformers import PreTrainedTokenizerBase

from tests.conftest import PROMPTS, RunningServer, reference_greedy


def sse_events(response: requests.Response) -> list[dict]:
    """Parse a raw SSE body strictly: `data: ` with a space, each event ended by a blank line."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    text = response.content.decode()
    events = []
    for block in text.split("\n\n"):
        if not block or block.startswith(":"):
            continue
        assert block.startswith("data: "), block
        events.append(json.loads(block[len("data: ") :]))
    assert text.endswith("\n\n")
    return events


def generate(server: RunningServer, prompt: str, **parameters: object) -> requests.Response:
    body = {"inputs": prompt, "parameters": {"details": True, **parameters}}
    return requests.post(f"{server.url}/generate", json=body, timeout=120)


def test_generate_equals_transformers_for_several_prompts(
    server: RunningServer, reference_model, tokenizer: PreTrainedTokenizerBase
) -> None:
    for prompt in PROMPTS[:5]:
        response = generate(server, prompt, max_new_tokens=16)
        assert response.status_code == 200, response.text
        answer = response.json()
        ids = [t["id"] for t in answer["details"]["tokens"]]
        expected = reference_greedy(reference_model, tokenizer(prompt).input_ids, 16)
        assert ids == expected, prompt
        assert answer["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert answer["details"]["generated_tokens"] == len(expected)


def test_stream_gives_the_same_tokens_in_tgi_sse_format(server: RunningServer) -> None:
    prompt = PROMPTS[6]
    whole = generate(server, prompt, max_new_tokens=12).json()
    response = requests.post(
        f"{server.url}/generate_stream",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}},
        timeout=120,
    )
    events = sse_events(response)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    # The stream starts from the held prompt of the first request: its log-probabilities are
    # the same up to rounding (prefix reuse), everything else is equal.
    streamed = [e["token"] for e in events]
    assert [{**t, "logprob": None} for t in streamed] == [
        {**t, "logprob": None} for t in whole["details"]["tokens"]
    ]
    assert [t["logprob"] for t in streamed] == pytest.approx(
        [t["logprob"] for t in whole["details"]["tokens"]], abs=1e-4
    )
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == whole["generated_text"]
    assert last["details"]["finish_reason"] == "length"
    assert last["details"]["generated_tokens"] == 12
    assert last["details"]["input_length"] > 0
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]


def test_sixteen_concurrent_mixed_requests_each_equal_their_solo_answer(
    server: RunningServer, golden
) -> None:
    """4 slots, 16 requests: generate, stream, POST / and chat-free completions, mixed lengths."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + (i * 5) % 20, i % 4) for i in range(16)]

    def run(job: tuple[str, int, int]) -> str:
        prompt, n, kind = job
        params = {"max_new_tokens": n}
        if kind == 0:
            return requests.post(
                f"{server.url}/generate", json={"inputs": prompt, "parameters": params}, timeout=300
            ).json()["generated_text"]
        if kind == 1:
            response = requests.post(
                f"{server.url}/generate_stream",
                json={"inputs": prompt, "parameters": params},
                timeout=300,
            )
            return sse_events(response)[-1]["generated_text"]
        if kind == 2:  # POST / returns the full text by default, as TGI's does
            full = requests.post(
                f"{server.url}/", json={"inputs": prompt, "parameters": params}, timeout=300
            ).json()[0]["generated_text"]
            assert full.startswith(prompt)
            return full[len(prompt) :]
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        answer = requests.post(f"{server.url}/v1/completions", json=body, timeout=300).json()
        return answer["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(run, jobs))
    for (prompt, n, _), text in zip(jobs, texts, strict=True):
        assert text == golden(prompt, n), (prompt, n)


def test_details_options(server: RunningServer, tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = PROMPTS[0]
    answer = generate(
        server,
        prompt,
        max_new_tokens=4,
        decoder_input_details=True,
        top_n_tokens=3,
        return_full_text=True,
    ).json()
    details = answer["details"]
    prompt_ids = tokenizer(prompt).input_ids
    assert [t["id"] for t in details["prefill"]] == prompt_ids
    assert details["prefill"][0]["logprob"] is None
    assert all(t["logprob"] < 0 for t in details["prefill"][1:])
    assert len(details["top_tokens"]) == 4
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(top) == 3
        assert top[0]["id"] == token["id"]  # greedy: the chosen token is the most likely
        assert top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
    assert answer["generated_text"].startswith(prompt)


def test_eos_is_listed_as_special_and_left_out_of_the_text(server: RunningServer) -> None:
    chat = "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n"
    answer = generate(server, chat, max_new_tokens=60).json()
    details = answer["details"]
    assert details["finish_reason"] == "eos_token"
    last = details["tokens"][-1]
    assert last["special"] is True and last["text"] == "<|im_end|>"
    assert "<|im_end|>" not in answer["generated_text"]


def test_stop_sequence_and_seeded_sampling(server: RunningServer) -> None:
    plain = generate(server, PROMPTS[0], max_new_tokens=16).json()["generated_text"]
    stop = plain.split()[2]
    answer = generate(server, PROMPTS[0], max_new_tokens=16, stop=[stop]).json()
    assert answer["details"]["finish_reason"] == "stop_sequence"
    assert answer["generated_text"].endswith(stop)
    sampled = [
        generate(server, PROMPTS[1], max_new_tokens=8, do_sample=True, seed=7, top_k=20).json()
        for _ in range(2)
    ]
    assert sampled[0]["generated_text"] == sampled[1]["generated_text"]
    assert sampled[0]["details"]["seed"] == 7


def test_timing_and_token_headers(server: RunningServer, tokenizer) -> None:
    response = generate(server, PROMPTS[0], max_new_tokens=5)
    headers = response.headers
    for name in (
        "x-compute-type",
        "x-compute-time",
        "x-compute-characters",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert name in headers, name
    assert headers["x-generated-tokens"] == "5"
    assert int(headers["x-prompt-tokens"]) == len(tokenizer(PROMPTS[0]).input_ids)
    assert int(headers["x-total-time"]) >= int(headers["x-inference-time"])
    assert headers["x-compute-characters"] == str(len(PROMPTS[0]))


def test_info_tokenize_and_models(server: RunningServer, tokenizer) -> None:
    info = requests.get(f"{server.url}/info", timeout=10).json()
    for field in (
        "model_id",
        "model_sha",
        "model_pipeline_tag",
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "max_client_batch_size",
        "router",
        "version",
        "sha",
        "docker_label",
    ):
        assert field in info, field
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 256

    text = "Héllo wörld 🙂"
    tokens = requests.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=10).json()
    assert [t["id"] for t in tokens] == tokenizer(text).input_ids
    raw = text.encode()
    for t in tokens:
        assert raw[t["start"] : t["stop"]].decode() == t["text"]
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len(raw)

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    templated = requests.post(f"{server.url}/chat_tokenize", json=chat, timeout=10).json()
    assert templated["templated_text"].endswith("<|im_start|>assistant\n")
    assert [t["id"] for t in templated["tokenize_response"]] == tokenizer(
        templated["templated_text"], add_special_tokens=False
    ).input_ids

    models = requests.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == info["model_id"]


def test_metrics_use_tgi_names(server: RunningServer) -> None:
    generate(server, PROMPTS[0], max_new_tokens=3)
    requests.post(f"{server.url}/generate", json={"inputs": ""}, timeout=10)
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["tgi_request_count"] >= 2
    assert values["tgi_request_success"] >= 1
    assert values['tgi_request_failure{err="validation"}'] >= 1
    assert "tgi_queue_size" in values and "tgi_batch_current_size" in values
    for histogram in (
        "tgi_request_duration",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_input_length",
        "tgi_request_generated_tokens",
    ):
        assert values[f"{histogram}_count"] >= 1, histogram
    assert values['tgi_batch_inference_duration_count{method="decode"}'] >= 1
    assert values['tgi_batch_inference_duration_count{method="prefill"}'] >= 1


def test_one_log_line_per_request_never_the_prompt(server: RunningServer, tokenizer) -> None:
    prompt = "My passphrase is marmalade-octopus, and"
    assert generate(server, prompt, max_new_tokens=3).status_code == 200
    prompt_tokens = len(tokenizer(prompt).input_ids)
    expected = f"route=/generate prompt_tokens={prompt_tokens} generated_tokens=3 finish_reason="
    log = server.log()
    assert any(expected in line and "queue_time=" in line for line in log.splitlines())
    assert "marmalade" not in log
