"""The scheduling policy (README, "Scheduling policy"), rule by rule, without a model or threads:
the planner alone, and the real generator driven step by step over a scripted backend."""

from __future__ import annotations

import pytest

from handler.errors import OverloadedError, UnavailableError
from handler.generation.planner import Policy, SlotView, StepPlan, Waiting, plan
from handler.generation.request import (
    ErrorEvent,
    FinalEvent,
    GenerationRequest,
    RequestHandle,
    TokenEvent,
)
from handler.generation.slots import SlotState
from handler.testing.scripted import Call, ScriptedBackend, scripted_generator

EMPTY, DECODE = SlotState.EMPTY, SlotState.DECODE


def slots(*states: SlotState, cancelled: tuple[int, ...] = ()) -> list[SlotView]:
    return [SlotView(i, state, i in cancelled) for i, state in enumerate(states)]


def queue(*lengths: int, cancelled: tuple[int, ...] = ()) -> list[Waiting]:
    return [Waiting(n, i in cancelled) for i, n in enumerate(lengths)]


def request(prompt: int = 3, max_new_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt_ids=list(range(1, prompt + 1)), max_new_tokens=max_new_tokens)


def events(handle: RequestHandle) -> list:
    out = []
    while (event := handle.poll(0)) is not None:
        out.append(event)
    return out


# --- the planner alone ---------------------------------------------------------------------------

BUDGET = Policy(max_batch_prefill_tokens=100)


def test_admission_is_first_come_first_served_and_never_overtakes() -> None:
    """Requests are admitted in queue order; one that does not fit the prefill budget stops
    admission, and the shorter requests behind it wait (no overtaking)."""
    step = plan(BUDGET, slots(EMPTY, EMPTY, EMPTY, EMPTY), queue(40, 70, 5), 0)
    assert step.admit == ((0, 0),)
    assert step.taken == 1


def test_a_prefill_batches_prompts_within_the_budget_and_always_admits_the_first() -> None:
    step = plan(BUDGET, slots(EMPTY, EMPTY, EMPTY, EMPTY), queue(30, 30, 40, 1), 0)
    assert step.prefill == (0, 1, 2)  # 100 tokens: the budget exactly; the fourth waits
    alone = plan(BUDGET, slots(EMPTY, EMPTY), queue(500, 1), 0)
    assert alone.prefill == (0,)  # a prompt larger than the budget still goes, alone


def test_admission_fills_only_free_slots() -> None:
    step = plan(BUDGET, slots(DECODE, EMPTY, DECODE, EMPTY), queue(1, 1, 1), 0)
    assert step.admit == ((0, 1), (1, 3))
    assert step.taken == 2


def test_a_request_takes_the_free_slot_holding_its_prompt_where_that_adds_no_row() -> None:
    """A request goes to the free slot it `prefers` (the row holding its prompt's start) unless
    an earlier request took it or the slot lies above every row the step runs anyway; the others
    take the lowest free slots left, in queue order."""
    four = slots(DECODE, EMPTY, EMPTY, DECODE, EMPTY, EMPTY)
    waiting = [Waiting(5, prefers=2), Waiting(5), Waiting(5, prefers=1)]
    assert plan(BUDGET, four, waiting, 0).admit == ((0, 2), (1, 4), (2, 1))
    # Slot 0 preferred (not mistaken for "no preference"); a second claim on it falls back.
    idle = slots(EMPTY, EMPTY, EMPTY)
    step = plan(BUDGET, idle, [Waiting(5), Waiting(5, prefers=0), Waiting(5, prefers=0)], 0)
    assert step.admit == ((0, 1), (1, 0), (2, 2))
    assert step.decode == (0, 1, 2)
    # Slot 5 lies above the rows this step runs (0 to 3): no cheaper than a copy into slot 1.
    high = plan(BUDGET, four, [Waiting(5, prefers=5)], 0)
    assert high.admit == ((0, 1),) and high.decode == (0, 1, 3)


def test_every_running_slot_decodes_and_admitted_ones_join_after_their_prefill() -> None:
    step = plan(BUDGET, slots(DECODE, EMPTY, DECODE, EMPTY), queue(5), 0)
    assert step == StepPlan(taken=1, admit=((0, 1),), decode=(0, 1, 2))
    mixed = plan(Policy(100, mixed_steps=True), slots(DECODE, EMPTY), queue(5), 0)
    assert mixed.mixed and mixed.prefill == (1,) and mixed.decode == (0,)
    nothing_running = plan(Policy(100, mixed_steps=True), slots(EMPTY, EMPTY), queue(5), 0)
    assert not nothing_running.mixed and nothing_running.decode == (0,)


def test_while_requests_run_admission_waits_for_enough_arrivals_or_enough_steps() -> None:
    """TGI's rule: admit once `ratio x running` can join at once, or after `max_waiting_tokens`
    decode steps; with nothing running, at once."""
    policy = Policy(100, max_waiting_tokens=5, waiting_served_ratio=0.5)
    four_running = slots(DECODE, DECODE, DECODE, DECODE, EMPTY, EMPTY, EMPTY)
    assert plan(policy, four_running, queue(1), 0).admit == ()  # 1 < 0.5 x 4
    assert plan(policy, four_running, queue(1), 4).admit == ()
    assert plan(policy, four_running, queue(1), 5).prefill == (4,)  # held 5 steps: enough
    assert plan(policy, four_running, queue(1, 1), 0).prefill == (4, 5)  # 2 can join
    # Cancelled arrivals do not count towards the ratio.
    assert plan(policy, four_running, queue(1, 1, cancelled=(1,)), 0).admit == ()
    assert plan(policy, slots(EMPTY, EMPTY), queue(1), 0).prefill == (0,)


def test_cancelled_requests_free_their_slot_first_and_leave_the_queue() -> None:
    step = plan(BUDGET, slots(DECODE, DECODE, cancelled=(1,)), queue(9, 9, cancelled=(0,)), 0)
    assert step.release == (1,)
    assert step.admit == ((1, 1),)  # the freed slot takes the first live request
    assert step.taken == 2  # the cancelled one is dropped on the way
    assert step.decode == (0, 1)


def test_nothing_to_do_is_an_idle_plan() -> None:
    assert plan(BUDGET, slots(EMPTY, EMPTY), [], 0).idle
    assert not plan(BUDGET, slots(DECODE, EMPTY), [], 0).idle


# --- the generator, driven step by step over a scripted backend ----------------------------------


def test_requests_run_in_steps_and_end_with_their_final_event() -> None:
    backend = ScriptedBackend()
    generator = scripted_generator(backend)
    first, second = generator.submit(request(3, 3)), generator.submit(request(2, 3))
    generator.step()  # both prefilled together, then their first decode
    generator.step()  # the last decode: three tokens each
    assert generator.step().idle
    assert [c.method for c in backend.calls] == ["prefill", "decode", "decode"]
    assert backend.calls[0].prefill == [0, 1]
    for handle, expected in ((first, "def"), (second, "cde")):
        *tokens, final = events(handle)
        assert isinstance(final, FinalEvent) and final.finish_reason == "length"
        assert final.text == expected and final.generated_tokens == 3
        assert [t.token.text for t in tokens] == list(expected)
    assert generator.active_slots == 0 and generator.in_flight == 0


def test_a_prefill_is_followed_by_a_decode_of_every_running_slot_in_the_same_step() -> None:
    """A running stream is delayed by at most one prefill between two of its tokens."""
    backend = ScriptedBackend()
    generator = scripted_generator(backend)
    generator.submit(request(3, 10))
    generator.step()
    generator.submit(request(3, 10))
    generator.step()
    assert backend.calls[-2:] == [Call("prefill", prefill=[1]), Call("decode", decode=[0, 1])]


def test_a_mixed_step_carries_the_prefill_and_a_failed_one_runs_again_apart() -> None:
    backend = ScriptedBackend(mixed_steps=True)
    generator = scripted_generator(backend)
    running = generator.submit(request(3, 10))
    generator.step()
    generator.submit(request(3, 10))
    generator.step()
    assert backend.calls[-1] == Call("mixed", decode=[0], prefill=[1])

    def fail(call: Call) -> None:
        raise RuntimeError("mixed forward failed")

    backend.before["mixed"] = fail
    late = generator.submit(request(3, 10))
    generator.step()
    assert [c.method for c in backend.calls[-3:]] == ["mixed", "prefill", "decode"]
    assert backend.calls[-1].decode == [0, 1, 2]
    assert not any(isinstance(e, ErrorEvent) for e in events(running) + events(late))


def test_a_failed_step_fails_only_its_requests() -> None:
    backend = ScriptedBackend()
    generator = scripted_generator(backend)
    running = generator.submit(request(3, 10))
    generator.step()

    def fail(call: Call) -> None:
        raise RuntimeError("prefill failed")

    backend.before["prefill"] = fail
    doomed = generator.submit(request(3, 10))
    generator.step()
    assert isinstance(events(doomed)[-1], ErrorEvent)
    assert all(isinstance(e, TokenEvent) for e in events(running))
    assert generator.active_slots == 1


def test_a_request_cancelled_during_its_prefill_is_freed_before_the_next_decode() -> None:
    backend = ScriptedBackend()
    generator = scripted_generator(backend)
    running = generator.submit(request(3, 10))
    generator.step()
    handle = generator.submit(request(3, 10))
    backend.before["prefill"] = lambda call: handle.cancel()
    generator.step()  # its prefill ran; the decode of the same step still takes it
    assert backend.calls[-1] == Call("decode", decode=[0, 1])
    step = generator.step()
    assert step.release == (1,)
    assert backend.calls[-1] == Call("decode", decode=[0])  # the freed row is left out
    assert generator.active_slots == 1 and generator.in_flight == 1
    assert not running.cancelled


def test_cancelled_requests_leave_the_queue_even_while_admission_is_held_back() -> None:
    policy = Policy(100, max_waiting_tokens=5, waiting_served_ratio=1.0)
    step = plan(policy, slots(DECODE, DECODE, EMPTY), queue(1, 1, 1, cancelled=(0, 1)), 0)
    assert step.admit == () and step.taken == 2


def test_requests_beyond_the_in_flight_limit_are_refused_at_once() -> None:
    generator = scripted_generator(max_concurrent_requests=2)
    generator.submit(request())
    generator.submit(request())
    with pytest.raises(OverloadedError):
        generator.submit(request())
    generator.step()  # admitted, still in flight
    with pytest.raises(OverloadedError):
        generator.submit(request())


def test_shutdown_fails_running_and_waiting_requests_and_refuses_new_ones() -> None:
    generator = scripted_generator(ScriptedBackend(batch_size=1))
    running, waiting = generator.submit(request()), generator.submit(request())
    generator.step()
    generator.stop()
    for handle in (running, waiting):
        last = events(handle)[-1]
        assert isinstance(last, ErrorEvent) and isinstance(last.error, UnavailableError)
    with pytest.raises(UnavailableError):
        generator.submit(request())
    assert generator.in_flight == 0
