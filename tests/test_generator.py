"""The generator on SmolLM2 against `transformers` `generate`, alone and in a busy batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from handler.engine import Engine
from handler.errors import GenerationError, OverloadedError
from handler.generation.request import ErrorEvent, FinalEvent, GenerationRequest, TokenEvent
from handler.generation.stopping import FinishReason
from handler.model.params import SamplingParams
from tests.conftest import PROMPTS, reference_greedy, start_engine

pytestmark = pytest.mark.slow


def generate(engine: Engine, request: GenerationRequest) -> tuple[list[TokenEvent], FinalEvent]:
    return engine.generator.submit(request).result(timeout=120)


def test_greedy_matches_transformers_alone(engine: Engine, reference_model, tokenizer) -> None:
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt).input_ids
        max_new = 12 + 3 * i
        tokens, final = generate(engine, GenerationRequest(prompt_ids, max_new))
        assert [t.token.id for t in tokens] == reference_greedy(
            reference_model, prompt_ids, max_new
        )
        assert final.generated_tokens == len(tokens)
        assert final.prompt_tokens == len(prompt_ids)


def test_greedy_matches_transformers_in_busy_batch(
    engine: Engine, reference_model, tokenizer
) -> None:
    """16 requests of different prompt lengths and budgets through 4 slots at once."""
    jobs = []
    for i in range(16):
        prompt_ids = tokenizer(PROMPTS[i % 8] + " " * (i // 8)).input_ids
        jobs.append((prompt_ids, 6 + (i * 5) % 27))
    expected = [reference_greedy(reference_model, ids, n) for ids, n in jobs]
    handles = [engine.generator.submit(GenerationRequest(ids, n)) for ids, n in jobs]
    assert engine.generator.in_flight > engine.backend.shape.batch_size
    for handle, want in zip(handles, expected):
        tokens, _ = handle.result(timeout=300)
        assert [t.token.id for t in tokens] == want


def test_seeded_sample_is_identical_alone_and_in_batch(engine: Engine, tokenizer) -> None:
    params = SamplingParams(
        do_sample=True, temperature=0.9, top_k=40, top_p=0.92, repetition_penalty=1.1, seed=1234
    )
    prompt_ids = tokenizer(PROMPTS[3]).input_ids
    _, alone = generate(engine, GenerationRequest(prompt_ids, 32, params))
    others = [
        engine.generator.submit(
            GenerationRequest(
                tokenizer(PROMPTS[i]).input_ids, 8 + 4 * i, SamplingParams(do_sample=True, seed=i)
            )
        )
        for i in range(3)
    ]
    handle = engine.generator.submit(GenerationRequest(prompt_ids, 32, params))
    others += [
        engine.generator.submit(
            GenerationRequest(
                tokenizer(PROMPTS[i]).input_ids, 30, SamplingParams(do_sample=True, top_p=0.5)
            )
        )
        for i in range(4, 7)
    ]
    _, batched = handle.result(timeout=120)
    assert batched.text == alone.text and batched.seed == alone.seed == 1234
    texts = {o.result(timeout=120)[1].text for o in others} | {alone.text}
    assert len(texts) > 1  # the sampled neighbours really produced different text


def test_unseeded_sampling_reports_its_seed(engine: Engine, tokenizer) -> None:
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    _, first = generate(engine, GenerationRequest(prompt_ids, 16, SamplingParams(do_sample=True)))
    assert first.seed is not None
    _, again = generate(
        engine, GenerationRequest(prompt_ids, 16, SamplingParams(do_sample=True, seed=first.seed))
    )
    assert again.text == first.text


def test_finish_reasons(engine: Engine, reference_model, tokenizer) -> None:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    tokens, final = generate(engine, GenerationRequest(chat, 64))
    assert final.finish_reason is FinishReason.EOS_TOKEN
    assert tokens[-1].token.id == tokenizer.eos_token_id and tokens[-1].token.special
    assert "<|im_end|>" not in final.text and "Paris" in final.text

    _, final = generate(engine, GenerationRequest(chat, 3))
    assert final.finish_reason is FinishReason.LENGTH and final.generated_tokens == 3

    # A stop sequence spanning several tokens; the stop text stays in the output.
    reference = tokenizer.decode(
        reference_greedy(reference_model, chat, 64), skip_special_tokens=True
    )
    stop = reference[reference.index("capital") : reference.index("capital") + 10]
    _, final = generate(engine, GenerationRequest(chat, 64, stop_sequences=["zzz", stop]))
    assert final.finish_reason is FinishReason.STOP_SEQUENCE
    assert final.text.endswith(stop) or stop in final.text[-len(stop) - 8 :]
    assert reference.startswith(final.text)

    _, final = generate(engine, GenerationRequest(chat, 64, ignore_eos=True))
    assert final.finish_reason is FinishReason.LENGTH and final.generated_tokens == 64


def test_sequence_length_cap(smollm2_dir: Path, tokenizer) -> None:
    small = start_engine(
        smollm2_dir, MAX_BATCH_SIZE="2", MAX_TOTAL_TOKENS="24", MAX_INPUT_TOKENS="20"
    )
    try:
        prompt_ids = tokenizer(PROMPTS[4]).input_ids
        assert len(prompt_ids) < 20
        tokens, final = generate(small, GenerationRequest(prompt_ids, 100, ignore_eos=True))
        assert final.finish_reason is FinishReason.LENGTH
        assert len(prompt_ids) + len(tokens) == 24
    finally:
        small.generator.stop()


def test_streamed_pieces_join_to_text_without_broken_characters(engine: Engine, tokenizer) -> None:
    split_characters = 0
    for prompt in (
        "日本の首都は",
        "Translate to Chinese: I love cats. 中文:",
        "Emoji party: 🎉🎉",
        "😀😃😄😁",
    ):
        prompt_ids = tokenizer(prompt).input_ids
        tokens, final = generate(
            engine,
            GenerationRequest(
                prompt_ids, 40, SamplingParams(do_sample=True, seed=7), ignore_eos=True
            ),
        )
        pieces = [t.token.text for t in tokens if not t.token.special]
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == final.text
        split_characters += sum("\ufffd" in tokenizer.decode([t.token.id]) for t in tokens)
    # The runs did produce characters whose bytes span several tokens (held back, then emitted).
    assert split_characters > 0


def test_logprobs_are_the_models(engine: Engine, reference_model, tokenizer) -> None:
    prompt_ids = tokenizer(PROMPTS[1]).input_ids
    params = SamplingParams(top_n_tokens=3)
    tokens, final = generate(
        engine, GenerationRequest(prompt_ids, 4, params, decoder_input_details=True)
    )
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + [t.token.id for t in tokens]])
        logprobs = torch.log_softmax(reference_model(ids).logits[0].float(), dim=-1)
    for i, event in enumerate(tokens):
        position = len(prompt_ids) - 1 + i
        assert event.token.logprob == pytest.approx(
            logprobs[position, event.token.id].item(), abs=1e-3
        )
        best = logprobs[position].topk(3)
        assert [t.id for t in event.top_tokens] == best.indices.tolist()
        assert event.top_tokens[0].id == event.token.id  # greedy picks the best
    assert [t.id for t in final.prefill] == prompt_ids
    assert final.prefill[0].logprob is None
    for j in range(1, len(prompt_ids)):
        assert final.prefill[j].logprob == pytest.approx(
            logprobs[j - 1, prompt_ids[j]].item(), abs=1e-3
        )


def test_cancel_frees_the_slot(engine: Engine, tokenizer) -> None:
    generator = engine.generator
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    handles = [
        generator.submit(GenerationRequest(prompt_ids, 400, ignore_eos=True)) for _ in range(4)
    ]
    events = handles[0].events(timeout=60)
    assert isinstance(next(events), TokenEvent)
    for handle in handles:
        handle.cancel()
    deadline = time.monotonic() + 10
    while generator.active_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generator.active_slots == 0 and generator.in_flight == 0
    tokens, final = generate(engine, GenerationRequest(prompt_ids, 5))
    assert len(tokens) == 5 and final.finish_reason is FinishReason.LENGTH


def test_overload_is_refused_at_once(smollm2_dir: Path, tokenizer) -> None:
    small = start_engine(smollm2_dir, MAX_BATCH_SIZE="1", MAX_CONCURRENT_REQUESTS="2")
    try:
        prompt_ids = tokenizer(PROMPTS[0]).input_ids
        running = [small.generator.submit(GenerationRequest(prompt_ids, 30)) for _ in range(2)]
        with pytest.raises(OverloadedError):
            small.generator.submit(GenerationRequest(prompt_ids, 30))
        for handle in running:
            handle.result(timeout=120)
        small.generator.submit(GenerationRequest(prompt_ids, 2)).result(timeout=60)
    finally:
        small.generator.stop()


def test_fault_in_a_model_step_fails_only_that_step(
    engine: Engine, reference_model, tokenizer, monkeypatch
) -> None:
    backend = engine.backend
    real_decode = backend.decode
    victim_ids = tokenizer(PROMPTS[2]).input_ids
    armed = threading.Event()

    def faulty_decode(input_ids, position_ids, seq_ids):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("injected device fault")
        return real_decode(input_ids, position_ids, seq_ids)

    monkeypatch.setattr(backend, "decode", faulty_decode)
    victims = [
        engine.generator.submit(GenerationRequest(victim_ids, 200, ignore_eos=True))
        for _ in range(2)
    ]
    for victim in victims:
        assert isinstance(next(victim.events(timeout=60)), TokenEvent)
    armed.set()
    for victim in victims:
        with pytest.raises(GenerationError, match="decode step raised RuntimeError"):
            victim.result(timeout=60)
    assert engine.generator.healthy and engine.generator.active_slots == 0

    # A failing prefill fails only the requests it was prefilling.
    real_prefill = backend.prefill
    calls = []

    def faulty_prefill(input_ids, seq_ids, *args):
        calls.append(seq_ids)
        if len(calls) == 1:
            raise ValueError("injected prefill fault")
        return real_prefill(input_ids, seq_ids, *args)

    monkeypatch.setattr(backend, "prefill", faulty_prefill)
    # A prompt no row holds (a held one but its last token would join a decode step instead).
    fresh = tokenizer("A prompt that no earlier request in this module sent.").input_ids
    first = engine.generator.submit(GenerationRequest(fresh, 5))
    events = list(first.events(timeout=60))
    assert isinstance(events[-1], ErrorEvent) and events[-1].error.status == 424
    after = tokenizer(PROMPTS[5]).input_ids
    tokens, _ = generate(engine, GenerationRequest(after, 10))
    assert [t.token.id for t in tokens] == reference_greedy(reference_model, after, 10)
