"""Prompt-prefix reuse (handler/generation/prefix.py): which row holds a prompt's start, the
generator's record of what each row holds (checked against a scripted backend as strict as a
real cache), and answers against `transformers` `generate` when a prompt starts from held
positions (the compiled step's cases are in tests/test_compiled.py)."""

from __future__ import annotations

from pathlib import Path

from handler.engine import Engine
from handler.generation.generator import Generator
from handler.generation.prefix import MIN_REUSE, Reuse, best_reuse, common_prefix
from handler.generation.request import ErrorEvent, FinalEvent, GenerationRequest, TokenEvent
from handler.model.params import SamplingParams
from handler.testing.scripted import Call, ScriptedBackend, scripted_generator
from tests.conftest import PROMPTS, assert_fp32_golden, start_engine

# --- which row holds a prompt's start ---------------------------------------------------------


def test_the_longest_held_prefix_wins_and_the_last_prompt_token_is_always_computed() -> None:
    prompt = list(range(40))
    held = {0: list(range(20)), 1: [*list(range(30)), 99], 2: list(range(50))}
    assert common_prefix(prompt, held[1]) == 30
    assert best_reuse(prompt, 3, held) == Reuse(source=2, length=39)
    assert best_reuse(prompt, 3, {0: held[0], 1: held[1]}) == Reuse(1, 30)


def test_the_target_row_itself_wins_a_tie_and_short_matches_are_not_reused() -> None:
    prompt = list(range(40))
    assert best_reuse(prompt, 2, {1: prompt, 2: prompt}) == Reuse(2, 39)  # no copy needed
    short = [*prompt[: MIN_REUSE - 1], 99]
    assert best_reuse(short + [5] * 10, 0, {1: prompt}) is None
    # A short prompt held whole (but its last token) is reused: nothing else is left to match.
    assert best_reuse([7, 8, 9], 0, {1: [7, 8, 9, 10]}) == Reuse(1, 2)
    assert best_reuse([7], 0, {1: [7, 8]}) is None
    assert best_reuse(prompt, 0, {}) is None


# --- the generator's record, over a scripted backend ------------------------------------------


def run_all(generator: Generator) -> None:
    while not generator.step().idle:
        pass


def answer(handle) -> list[int]:
    tokens, final = handle.result(timeout=5)
    assert isinstance(final, FinalEvent)
    return [t.token.id for t in tokens]


def prompt(n: int, first: int = 1) -> list[int]:
    return [first + i % 50 for i in range(n)]


def reusing(**options) -> tuple[ScriptedBackend, Generator]:
    backend = ScriptedBackend(sequence_length=128, prefix_reuse=True, **options)
    return backend, scripted_generator(backend)


def test_a_repeated_prompt_starts_from_its_row_and_answers_the_same() -> None:
    backend, generator = reusing()
    ids = prompt(20)
    first = generator.submit(GenerationRequest(ids, 3))
    run_all(generator)
    seen = len(backend.calls)
    again = generator.submit(GenerationRequest(ids, 3))
    run_all(generator)
    assert answer(again) == answer(first)
    # The row holds all the prompt but its last token: that token is a row of the decode step,
    # whose logits choose the first new token; no prefill runs.
    assert backend.calls[seen:] == [Call("decode", decode=[0])] * 3
    assert generator.reused_tokens == 19


def test_a_next_turn_reuses_the_prompt_and_the_answer_fed_back() -> None:
    backend, generator = reusing()
    ids = prompt(20)
    handle = generator.submit(GenerationRequest(ids, 4))
    run_all(generator)
    turn = ids + answer(handle) + [3, 4]
    generator.submit(GenerationRequest(turn, 2))
    run_all(generator)
    # The row holds the prompt and the answer but its last token, which was never fed back.
    last = [c for c in backend.calls if c.method == "prefill"][-1]
    assert last == Call("prefill", prefill=[0], cached=[20 + 4 - 1])


def test_a_running_request_lends_its_prefix_to_another_row() -> None:
    backend, generator = reusing()
    ids = prompt(20)
    generator.submit(GenerationRequest(ids, 10))
    generator.step()
    generator.step()
    generator.submit(GenerationRequest([*ids[:18], 7, 7, 7], 3))
    generator.step()
    assert backend.calls[-3:] == [
        Call("copy", cached=[0, 1, 18]),
        Call("prefill", prefill=[1], cached=[18]),
        Call("decode", decode=[0, 1]),
    ]


def test_prompts_admitted_together_are_not_sources_for_each_other() -> None:
    """Row 0 holds the prompt; two requests for it are admitted into rows 0 and 1 at once: row
    0 starts from its own positions (joining the decode step), row 1 computes the prompt (row 0
    is being written)."""
    backend, generator = reusing()
    ids = prompt(20)
    generator.submit(GenerationRequest(ids, 3))
    run_all(generator)
    with generator._cond:
        generator.submit(GenerationRequest(ids, 3))
        generator.submit(GenerationRequest(ids, 3))
    generator.step()
    assert backend.calls[-2:] == [Call("prefill", prefill=[1]), Call("decode", decode=[0, 1])]


def test_requests_admitted_together_go_to_the_rows_holding_their_prompts() -> None:
    """Two requests end together; their prompts come back in the other order. Each goes to the
    row that holds it and joins the decode step there: no copy, no prefill (taking the lowest
    free slots, each would have overwritten the other's holding and computed its prompt)."""
    backend, generator = reusing(batch_size=2)
    a, b = prompt(20), prompt(20, first=30)
    with generator._cond:
        first = [generator.submit(GenerationRequest(ids, 3)) for ids in (a, b)]
    run_all(generator)
    answers = [answer(h) for h in first]
    calls = len(backend.calls)
    with generator._cond:
        again = [generator.submit(GenerationRequest(ids, 3)) for ids in (b, a)]
    run_all(generator)
    assert backend.calls[calls:] == [Call("decode", [0, 1])] * 3
    assert [answer(h) for h in again] == answers[::-1]
    assert generator.reused_tokens == 2 * 19


def test_no_reuse_for_prompt_logprobs_when_off_or_after_a_failed_step() -> None:
    ids = prompt(20)
    backend, generator = reusing()
    generator.submit(GenerationRequest(ids, 3))
    run_all(generator)
    details = generator.submit(GenerationRequest(ids, 3, decoder_input_details=True))
    run_all(generator)
    assert isinstance(details.result(timeout=5)[1], FinalEvent)
    # A seeded draw repeats exactly only over the same computation: its prompt is computed.
    params = SamplingParams(do_sample=True, temperature=1.0, seed=3)
    generator.submit(GenerationRequest(ids, 3, params=params))
    run_all(generator)
    assert all(not c.cached for c in backend.calls if c.method == "prefill")

    def fail(call: Call) -> None:
        raise RuntimeError("decode failed")

    backend.before["decode"] = fail
    doomed = generator.submit(GenerationRequest(ids, 3))
    run_all(generator)
    assert isinstance(list(doomed.events(timeout=5))[-1], ErrorEvent)
    del backend.before["decode"]
    generator.submit(GenerationRequest(ids, 3))
    run_all(generator)
    # The failed step's row 0 is forgotten; the copy parked in row 3 before it serves instead.
    copy = max(i for i, c in enumerate(backend.calls) if c.method == "copy")
    assert backend.calls[copy:] == [Call("copy", cached=[3, 0, 19])] + [Call("decode", [0])] * 3

    off = ScriptedBackend(sequence_length=128, prefix_reuse=True)
    generator = scripted_generator(off, prefix_caching=False)
    for _ in range(2):
        generator.submit(GenerationRequest(ids, 3))
        run_all(generator)
    assert all(not c.cached for c in off.calls) and generator.reused_tokens == 0


def test_a_row_about_to_be_overwritten_parks_its_holding_in_an_idle_row() -> None:
    """Requests take the lowest free row; what it held moves to the highest idle row first, so
    that a prompt seen two requests ago is still held."""
    backend, generator = reusing()
    a, b = prompt(20), prompt(20, first=30)
    for ids in (a, b, a):
        generator.submit(GenerationRequest(ids, 3))
        run_all(generator)
    moves = [c.cached for c in backend.calls if c.method == "copy"]
    # b parks a's 22 held tokens in row 3; a's return parks b in row 2, then copies a back.
    assert moves == [[0, 3, 22], [0, 2, 22], [3, 0, 19]]
    assert [c.prefill for c in backend.calls if c.method == "prefill"] == [[0], [0]]


def test_with_every_slot_busy_holdings_park_in_the_prefix_rows() -> None:
    """One slot and two prefix rows (rows 1 and 2): each new prompt moves the last one out of
    the slot; a prompt seen two requests ago comes back from its prefix row."""
    backend = ScriptedBackend(batch_size=1, sequence_length=128, prefix_reuse=True, prefix_rows=2)
    generator = scripted_generator(backend)
    a, b, c = prompt(20), prompt(20, first=30), prompt(20, first=60)
    for ids in (a, b, c, a):
        generator.submit(GenerationRequest(ids, 3))
        run_all(generator)
    moves = [call.cached for call in backend.calls if call.method == "copy"]
    # b parks a in row 2, c parks b in row 1. When a returns, row 2 (a, the least recently
    # released) is the one it copies from, so c evicts b from row 1 instead.
    assert moves == [[0, 2, 22], [0, 1, 22], [0, 1, 22], [2, 0, 19]]
    assert backend.calls[-4:] == [Call("copy", cached=[2, 0, 19])] + [Call("decode", [0])] * 3


def test_with_mixed_steps_a_reusing_prompt_runs_its_own_prefill_first() -> None:
    backend, generator = reusing(mixed_steps=True)
    ids = prompt(20)
    generator.submit(GenerationRequest(ids, 10))
    generator.step()
    reuse = generator.submit(GenerationRequest([*ids[:18], 9, 9], 3))
    fresh = generator.submit(GenerationRequest(prompt(12, first=30), 3))
    generator.step()
    assert backend.calls[-3:] == [
        Call("copy", cached=[0, 1, 18]),
        Call("prefill", prefill=[1], cached=[18]),
        Call("mixed", decode=[0], prefill=[2]),
    ]
    run_all(generator)
    assert len(answer(reuse)) == 3 and len(answer(fresh)) == 3


def test_a_prompt_held_but_its_last_token_joins_the_decode_step() -> None:
    """Its last prompt token runs as a row of the running requests' decode step (of the
    mixed step's decode rows), not as a prefill of its own."""
    for mixed in (False, True):
        backend, generator = reusing(mixed_steps=mixed)
        ids = prompt(20)
        running = generator.submit(GenerationRequest(ids, 10))
        generator.step()
        generator.step()
        joining = generator.submit(GenerationRequest(ids, 3))
        if mixed:
            fresh = generator.submit(GenerationRequest(prompt(12, first=30), 3))
        generator.step()
        last = Call("mixed", decode=[0, 1], prefill=[2]) if mixed else Call("decode", [0, 1])
        assert backend.calls[-2:] == [Call("copy", cached=[0, 1, 19]), last]
        run_all(generator)
        assert len(answer(joining)) == 3 and len(answer(running)) == 10
        if mixed:
            assert len(answer(fresh)) == 3
        assert generator.reused_tokens == 19


# --- answers against `generate` (eager fp32; mixed steps on) ----------------------------------


def generate(engine: Engine, ids: list[int], n: int) -> list[int]:
    tokens, _ = engine.generator.submit(GenerationRequest(ids, n, ignore_eos=True)).result(300)
    return [t.token.id for t in tokens]


def test_a_next_turn_and_a_shared_prefix_answer_as_generate(
    engine: Engine, reference_model, tokenizer
) -> None:
    """The next turn of a conversation (its prompt: the last prompt, the answer and a new
    question) computes only the question; a prompt sharing a running request's prefix copies
    it across rows while the running request goes on. Every answer equals `generate`."""
    generator = engine.generator
    ids = tokenizer(PROMPTS[0]).input_ids
    first = generate(engine, ids, 12)
    assert_fp32_golden(reference_model, ids, first)
    before = generator.reused_tokens
    assert generate(engine, ids, 12) == first  # the last prompt token alone: a decode step
    assert generator.reused_tokens - before == len(ids) - 1
    turn = ids + first + tokenizer(" Tell me more about it, please.").input_ids
    before = generator.reused_tokens
    got = generate(engine, turn, 16)
    assert generator.reused_tokens - before == len(ids) + len(first) - 1
    assert_fp32_golden(reference_model, turn, got)

    long = tokenizer(" ".join(PROMPTS[1:4])).input_ids
    running = generator.submit(GenerationRequest(long, 30, ignore_eos=True))
    head = next(running.events(timeout=300))
    assert isinstance(head, TokenEvent)
    shared = long[: len(long) - 3] + tokenizer(" In French?").input_ids
    before = generator.reused_tokens
    got_shared = generate(engine, shared, 12)
    assert generator.reused_tokens - before == len(long) - 3
    assert_fp32_golden(reference_model, shared, got_shared)
    rest = [t.token.id for t in running.result(timeout=300)[0]]
    assert_fp32_golden(reference_model, long, [head.token.id, *rest])


def test_a_prompt_comes_back_from_a_prefix_row(engine: Engine, reference_model, tokenizer) -> None:
    """Two prompts in turn through one slot: the first one's rows move to a prefix row (beyond
    the 4 slots) before the second overwrites them, and its return copies them back."""
    generator = engine.generator
    assert engine.backend.shape.prefix_rows == 4
    a, b = (tokenizer(PROMPTS[i] + " " + PROMPTS[i + 1]).input_ids for i in (3, 5))
    first = generate(engine, a, 8)
    generate(engine, b, 8)
    assert any(held[: len(a)] == a for held in generator._held[4:]), "a was not parked"
    before = generator.reused_tokens
    assert generate(engine, a, 8) == first
    assert generator.reused_tokens - before == len(a) - 1
    assert_fp32_golden(reference_model, a, first)


def test_prefix_caching_false_computes_every_prompt(smollm2_dir: Path, tokenizer) -> None:
    engine = start_engine(smollm2_dir, PREFIX_CACHING="false")
    try:
        assert not engine.generator.prefix_caching
        ids = tokenizer(PROMPTS[2]).input_ids
        assert generate(engine, ids, 4) == generate(engine, ids, 4)
        assert engine.generator.reused_tokens == 0
    finally:
        engine.generator.stop()
