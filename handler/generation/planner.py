"""The scheduler's decisions, as a pure function of what it sees: no model, no threads, no clock.

Each iteration of the generator's loop asks `plan` what to do, then runs the plan:

1. free the slots of cancelled requests;
2. admit waiting requests into free slots, first come first served (a waiting request is never
   overtaken; cancelled ones are dropped on the way), with one batched prefill whose prompts add
   up to at most `max_batch_prefill_tokens` (the first one is always admitted: its prompt is at
   most `max_input_tokens`); each goes to the lowest free slot, or to the free slot whose row
   holds its prompt's start (`Waiting.prefers`) where that adds no row to the step;
3. while requests run, hold admission back (TGI's batching rule, since a prefill pauses every
   stream) until `waiting_served_ratio x running` requests can join at once, or until it has
   been held for `max_waiting_tokens` decode steps; with nothing running, admit at once;
4. decode every slot whose prompt is in the cache. When the backend can (`mixed_steps`), the
   admitted prompts share the running slots' decode forward (a mixed step), so that streams
   pause for the new prompts' tokens only; otherwise the prefill runs first and its rows join
   the decode step.

A running stream is therefore delayed by at most one prefill of `max_batch_prefill_tokens`
tokens between two of its tokens. Cancelled requests at the head of the queue leave it at every
plan, held back or not, so that they do not count against `max_concurrent_requests`. A request
that fails to start (its slot's assignment raises) fails alone; its slot stays free until the
next plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from handler.generation.slots import SlotState

__all__ = ["Policy", "SlotView", "StepPlan", "Waiting", "plan"]


@dataclass(frozen=True)
class Policy:
    """The scheduling settings."""

    max_batch_prefill_tokens: int
    max_waiting_tokens: int = 0
    waiting_served_ratio: float = 0.0
    mixed_steps: bool = False


@dataclass(frozen=True)
class SlotView:
    """What the planner sees of a slot."""

    index: int
    state: SlotState
    cancelled: bool = False


@dataclass(frozen=True)
class Waiting:
    """What the planner sees of a queued request."""

    prompt_tokens: int
    cancelled: bool = False
    prefers: int | None = None
    """A free slot whose row holds the start of this prompt (prefix reuse): admitted there, the
    request needs no copy, and the row's holding is not overwritten by another request."""


@dataclass(frozen=True)
class StepPlan:
    """What one iteration does, in this order: release, take from the queue, prefill, decode."""

    release: tuple[int, ...] = ()
    """Slots of cancelled requests, freed first."""
    taken: int = 0
    """How many requests leave the head of the queue (admitted or, when cancelled, dropped)."""
    admit: tuple[tuple[int, int], ...] = ()
    """(queue position, slot): the requests admitted and where they go, in queue order."""
    decode: tuple[int, ...] = ()
    """Slots of this iteration's decode step (with `mixed`, the running slots only; otherwise
    the running slots and the admitted ones, after their prefill)."""
    mixed: bool = False
    """The admitted prompts share the decode step's forward."""

    @property
    def prefill(self) -> tuple[int, ...]:
        """Slots that are prefilled, in queue order."""
        return tuple(slot for _, slot in self.admit)

    @property
    def idle(self) -> bool:
        return not (self.release or self.taken or self.decode)


def plan(
    policy: Policy,
    slots: Sequence[SlotView],
    waiting: Sequence[Waiting],
    steps_since_prefill: int,
) -> StepPlan:
    """The next iteration's plan. `steps_since_prefill`: decode steps run since the last
    prefill (admission's hold-back counts them)."""
    release = tuple(s.index for s in slots if s.state is not SlotState.EMPTY and s.cancelled)
    free = [s.index for s in slots if s.state is SlotState.EMPTY or s.index in release]
    running = [s.index for s in slots if s.state is SlotState.DECODE and s.index not in release]
    taken, admit = 0, list[tuple[int, int]]()
    while taken < len(waiting) and waiting[taken].cancelled:  # even while admission waits
        taken += 1
    if free and not _hold_back(policy, len(free), len(running), waiting, steps_since_prefill):
        budget = policy.max_batch_prefill_tokens
        for position, request in enumerate(waiting[taken:], start=taken):
            if len(admit) == len(free):
                break
            if request.cancelled:
                taken = position + 1
                continue
            if admit and request.prompt_tokens > budget:
                break
            budget -= request.prompt_tokens
            admit.append((position, free[len(admit)]))
            taken = position + 1
    admit = _place(admit, free, running, waiting)
    admitted = [slot for _, slot in admit]
    mixed = bool(admitted and running and policy.mixed_steps)
    decode = tuple(running) if mixed else tuple(sorted(running + admitted))
    return StepPlan(release, taken, tuple(admit), decode, mixed)


def _place(
    admit: list[tuple[int, int]],
    free: list[int],
    running: list[int],
    waiting: Sequence[Waiting],
) -> list[tuple[int, int]]:
    """Which free slot each admitted request takes, given `admit`'s first choice (the lowest
    free slots, in queue order): a request goes to the slot it `prefers` when no earlier one took
    it and the slot is below the highest row that decodes anyway (the step runs rows 0 up to
    it); the others take the lowest slots left, in queue order."""
    if not admit:
        return admit
    span = max(running + [slot for _, slot in admit])
    taken: dict[int, int] = {}
    for position, _ in admit:
        wanted = waiting[position].prefers
        if wanted is not None and wanted in free and wanted <= span and wanted not in taken:
            taken[wanted] = position
    chosen = {position: slot for slot, position in taken.items()}
    left = iter(slot for slot in free if slot not in taken)
    return [
        (position, chosen[position] if position in chosen else next(left)) for position, _ in admit
    ]


def _hold_back(
    policy: Policy,
    free: int,
    running: int,
    waiting: Sequence[Waiting],
    steps_since_prefill: int,
) -> bool:
    """TGI's batching rule: while requests run, a prefill waits until `waiting_served_ratio x
    running` requests can join at once, or until it has been held for `max_waiting_tokens`
    decode steps."""
    if not running or steps_since_prefill >= policy.max_waiting_tokens:
        return False
    queued = sum(not w.cancelled for w in waiting)
    return min(queued, free) < int(running * policy.waiting_served_ratio)
