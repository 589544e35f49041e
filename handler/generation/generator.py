"""The static-batch generator and its scheduler thread.

One thread owns the model. Each loop iteration (`Generator.step`) asks the planner
(`handler/generation/planner.py`: which slots to free, which waiting requests to admit or hold
back, whether the prefill shares the decode step's forward) and runs its plan against the
backend: releases, admissions, then a prefill and a decode step, or one mixed step. If a mixed
step fails, its prefill and its decode run again apart, so that a failure still fails only the
requests it belongs to.

Where the backend can (`ModelShape.prefix_reuse`), an admitted prompt whose first tokens some
cache row holds starts after them (`handler/generation/prefix.py`): the generator keeps what each
empty row holds, and a running row holds its prompt and its answer so far. A request is admitted
into the free slot that holds its prompt where the planner can (`Waiting.prefers`). A prompt
held all but its last token (a repeated prompt) skips the prefill: that token runs as a row of
the step's decode (`_join`), so admitting it costs the running requests nothing.

Grammar masks of constrained rows are computed on a worker thread while the step's forward
runs (`TokenSelector.prepare`), and applied when its logits arrive.

A failure inside a model step fails only the requests of that step: their slots are cleared,
they get an `ErrorEvent`, and the loop goes on. If the loop itself dies, `failure` says why and
`healthy` turns false so that health checks report it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from handler.errors import GenerationError, OverloadedError, UnavailableError
from handler.generation.planner import Policy, SlotView, StepPlan, Waiting, plan
from handler.generation.prefix import MIN_REUSE, Reuse, best_reuse, common_prefix, parking_row
from handler.generation.request import (
    ErrorEvent,
    FinalEvent,
    GenerationRequest,
    RequestHandle,
    Token,
    TokenEvent,
)
from handler.generation.sampling import Selection, TokenSelector
from handler.generation.slots import Slot, SlotState
from handler.generation.stopping import FinishReason, StoppingCriteria
from handler.model.base import MixedBackend, ModelBackend, PrefillOutput, PrefixBackend

logger = logging.getLogger(__name__)


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: object = None
) -> frozenset[int]:
    """Every EOS id: the tokenizer's and the generation config's (an int or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return frozenset(ids)


class Generator:
    """Continuous batching over a fixed number of slots, driven by one scheduler thread."""

    def __init__(
        self,
        backend: ModelBackend,
        tokenizer: PreTrainedTokenizerBase,
        *,
        eos_token_ids: frozenset[int],
        max_concurrent_requests: int = 128,
        max_batch_prefill_tokens: int | None = None,
        on_step: Callable[[str, int, float], None] | None = None,
        max_waiting_tokens: int = 0,
        waiting_served_ratio: float = 0.0,
        prefix_caching: bool = True,
    ) -> None:
        """`on_step(method, batch_size, seconds)` is called after each successful `prefill` or
        `decode` step (metrics). `prefix_caching`: start prompts after the positions a row
        already holds, where the backend can (`ModelShape.prefix_reuse`)."""
        self.backend = backend
        self.tokenizer = tokenizer
        shape = backend.shape
        self.max_total_tokens = shape.sequence_length
        self.eos_token_ids = eos_token_ids
        self.special_ids = frozenset(tokenizer.all_special_ids) | eos_token_ids
        self.max_concurrent_requests = max_concurrent_requests
        self.max_batch_prefill_tokens = max_batch_prefill_tokens or (
            shape.batch_size * shape.sequence_length
        )
        self.slots = [Slot(i) for i in range(shape.batch_size)]
        self.on_device_sampling = shape.on_device_sampling
        """The model chooses tokens: no log-probabilities, top tokens or seeds to report."""
        self.selector = TokenSelector(shape.batch_size, shape.vocab_size, shape.sequence_length)
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._in_flight = 0
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        self._token_text: dict[int, str] = {}
        self._on_step = on_step
        self.max_waiting_tokens = max_waiting_tokens
        self.waiting_served_ratio = waiting_served_ratio
        self._steps_since_prefill = 0
        self.prefix_caching = prefix_caching and shape.prefix_reuse
        self._held: list[list[int]] = [[] for _ in range(shape.batch_size + shape.prefix_rows)]
        """Per empty slot and prefix row (`ModelShape.prefix_rows`, from `batch_size` on): the
        tokens whose keys and values it holds from position 0."""
        self._released: dict[int, int] = {}
        """Per row, the `_releases` count when it was last released (least recently used)."""
        self._releases = 0
        self.reused_tokens = 0
        """Prompt tokens not computed because their row held them (a running total)."""

    @property
    def policy(self) -> Policy:
        """The planner's settings; whether steps may be mixed is the backend's current word
        (a torch backend turns it off when its decode step is compiled)."""
        return Policy(
            self.max_batch_prefill_tokens,
            self.max_waiting_tokens,
            self.waiting_served_ratio,
            self.backend.shape.mixed_steps,
        )

    # --- caller side (any thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        return sum(slot.state is not SlotState.EMPTY for slot in self.slots)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; `OverloadedError` when `max_concurrent_requests` are in flight."""
        handle = RequestHandle(request, on_cancel=self._wake)
        with self._cond:
            if not self._accepting or self.failure is not None:
                raise UnavailableError(self.failure or "The server is not accepting requests")
            if self._in_flight >= self.max_concurrent_requests:
                raise OverloadedError("Model is overloaded")
            self._in_flight += 1
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace` seconds, then stop."""
        deadline = time.monotonic() + grace
        with self._cond:
            self._accepting = False
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        else:  # never started (driven by `step`): end what is left here
            self._shutdown()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._busy():
                        self._cond.wait()
                    if self._stop:
                        break
                self.step()
        except BaseException as exc:  # the loop itself broke: report, never hide
            self.failure = f"The scheduler thread died: {type(exc).__name__}: {exc}"
            logger.exception("scheduler thread died")
        self._shutdown()

    def _busy(self) -> bool:
        return any(slot.state is not SlotState.EMPTY for slot in self.slots)

    def step(self) -> StepPlan:
        """One iteration of the scheduler: plan (`handler/generation/planner.py`), then run the
        plan against the backend. The scheduler thread calls it in a loop; tests may call it
        directly on a generator that was never started. Returns the plan it ran."""
        with self._cond:
            views = [
                SlotView(s.index, s.state, s.handle is not None and s.handle.cancelled)
                for s in self.slots
            ]
            queue = self._queue_views()
            step = plan(self.policy, views, queue, self._steps_since_prefill)
            taken = [self._waiting.popleft() for _ in range(step.taken)]
            admitted = {position: taken[position] for position, _ in step.admit}
            self._in_flight -= step.taken - len(admitted)  # the cancelled ones dropped
            self._cond.notify_all()
        for index in step.release:
            self._release(self.slots[index])
        prefill = [
            self.slots[slot]
            for position, slot in step.admit
            if self._start(self.slots[slot], admitted[position])
        ]
        for slot in prefill:
            if slot.handle is not None and slot.handle.cancelled:  # cancelled since the plan
                self._release(slot)
        prefill = [slot for slot in prefill if slot.state is SlotState.PREFILL]
        reuse = self._reuse(prefill)
        self._park(prefill, reuse)
        joining = self._join(prefill, reuse)
        prefill = [slot for slot in prefill if slot.state is SlotState.PREFILL]
        if step.mixed and prefill:
            # Prompts starting from held positions run their own (short) prefill first.
            held = [slot for slot in prefill if slot.index in reuse]
            if held:
                self._prefill(held, reuse)
            fresh = [slot for slot in prefill if slot.index not in reuse]
            running = [self.slots[i] for i in step.decode]
            running = [s for s in running if s.state is SlotState.DECODE] + joining
            if fresh:
                self._mixed(fresh, running)
            elif running:
                self._decode(running)
            return step
        if prefill:
            self._prefill(prefill, reuse)
        decoding = [self.slots[i] for i in step.decode]
        decoding = [slot for slot in decoding if slot.state is SlotState.DECODE]  # joining's too
        if decoding:
            self._decode(decoding)
        return step

    def _queue_views(self) -> list[Waiting]:
        """What the planner sees of the queue. The requests that could be admitted now also
        name the free slot whose row holds most of their prompt's start (`Waiting.prefers`)."""
        free = {
            s.index: self._held[s.index]
            for s in self.slots
            if s.state is SlotState.EMPTY and self._held[s.index]
        }
        candidates = sum(s.state is SlotState.EMPTY for s in self.slots)
        views = []
        for handle in self._waiting:
            prefers = None
            if free and candidates > 0 and not handle.cancelled:
                candidates -= 1
                if self._reusable(handle.request):
                    found = best_reuse(handle.request.prompt_ids, -1, free)
                    prefers = found.source if found is not None else None
            views.append(Waiting(len(handle.request.prompt_ids), handle.cancelled, prefers))
        return views

    def _reusable(self, request: GenerationRequest) -> bool:
        """Whether a request may start from held positions: not when every prompt position's
        logits are wanted, nor for a seeded draw, which repeats exactly only over the same
        computation (a held prefix's numbers differ in the last bits)."""
        return (
            self.prefix_caching
            and not request.decoder_input_details
            and request.params.seed is None
        )

    def _start(self, slot: Slot, handle: RequestHandle) -> bool:
        """Assign an admitted request to its slot; a request that cannot start fails alone."""
        try:
            self._assign(slot, handle)
        except Exception as exc:
            logger.error("admitting %s failed", handle.request.request_id, exc_info=exc)
            self.selector.release(slot.index)
            if slot.handle is not None:
                slot.release()
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()
            handle.put(ErrorEvent(GenerationError(f"The request could not start: {exc}")))
            return False
        return True

    def _assign(self, slot: Slot, handle: RequestHandle) -> None:
        request = handle.request
        eos = frozenset() if request.ignore_eos else self.eos_token_ids
        end_ids = eos | request.stop_token_ids
        seed = self.selector.assign(
            slot.index, request.params, request.prompt_ids, end_ids, request.constraint
        )
        self.backend.assign(slot.index, request.params)
        if self.on_device_sampling:
            seed = None
        stopping = StoppingCriteria(
            request.max_new_tokens,
            request.stop_sequences,
            end_ids,
            self.max_total_tokens,
            min_tokens=request.params.min_tokens,
            constraint=request.constraint,
        )
        slot.assign(handle, self.tokenizer, stopping, seed)

    def _reuse(self, slots: list[Slot]) -> dict[int, Reuse]:
        """Which of the admitted `slots` start from positions some row holds
        (`handler/generation/prefix.py`): slot index -> where. The rows being admitted are
        sources only for themselves (their copies all run before any of their prefills)."""
        if not self.prefix_caching or not slots:
            return {}
        targets = {slot.index for slot in slots}
        held = self._holdings(targets)
        found: dict[int, Reuse] = {}
        for slot in slots:
            request = slot.request.request
            if not self._reusable(request):
                continue
            own = {slot.index: self._held[slot.index]}
            reuse = best_reuse(request.prompt_ids, slot.index, held | own)
            if reuse is not None:
                found[slot.index] = reuse
        return found

    def _join(self, slots: list[Slot], reuse: dict[int, Reuse]) -> list[Slot]:
        """The admitted `slots` whose rows will hold all their prompt but its last token once
        the held positions are copied: they copy them and move on to decoding, so that their last
        prompt token runs as a row of this step's decode (which chooses their first token)
        instead of a forward of its own. Returns them, in the `DECODE` state."""
        joining: list[Slot] = []
        for slot in slots:
            found = reuse.get(slot.index)
            if found is None or found.length != len(slot.request.request.prompt_ids) - 1:
                continue
            try:
                if found.source != slot.index:
                    cast(PrefixBackend, self.backend).copy_prefix(
                        found.source, slot.index, found.length
                    )
            except Exception as exc:
                self._fail([slot], "prefill", exc)
                continue
            self.reused_tokens += found.length
            slot.prefilled()
            joining.append(slot)
        return joining

    def _park(self, slots: list[Slot], reuse: dict[int, Reuse]) -> None:
        """Before the admitted `slots` overwrite their rows, move what each holds (unless it is
        reused in place, or held elsewhere too) into a prefix row, or without prefix rows into
        an idle slot (`parking_row`), that no admitted prompt copies from."""
        if not self.prefix_caching:
            return
        targets = {slot.index for slot in slots}
        # Rows being admitted are overwritten, and reuse sources are copied from after this.
        sources = targets | {found.source for found in reuse.values()}
        backend = cast(PrefixBackend, self.backend)
        for slot in slots:
            record = self._held[slot.index]
            found = reuse.get(slot.index)
            if len(record) < MIN_REUSE or (found is not None and found.source == slot.index):
                continue
            others = self._holdings(targets).values()
            if any(common_prefix(record, held) == len(record) for held in others):
                continue
            # The prefix rows where there are any; else the idle slots.
            rows = range(len(self.slots), len(self._held)) or range(len(self.slots))
            idle = {
                row: self._held[row]
                for row in rows
                if row not in sources
                and (row >= len(self.slots) or self.slots[row].state is SlotState.EMPTY)
            }
            row = parking_row(idle, self._released)
            if row is None:
                return
            try:
                backend.copy_prefix(slot.index, row, len(record))
            except Exception as exc:  # the holding is lost, nothing else
                logger.warning("parking a held prefix failed: %s", exc)
                self._held[row] = []
                continue
            self._held[row] = record
            self._released[row] = self._released.get(slot.index, -1)
            sources.add(row)  # not parked over again in this step

    def _holdings(self, exclude: set[int]) -> dict[int, list[int]]:
        """What every row but `exclude` holds (slots being admitted hold nothing yet), the
        prefix rows included."""
        holdings = {
            s.index: self._holds(s)
            for s in self.slots
            if s.index not in exclude and s.state is not SlotState.PREFILL
        }
        for row in range(len(self.slots), len(self._held)):
            holdings[row] = self._held[row]
        return holdings

    def _holds(self, slot: Slot) -> list[int]:
        """The tokens whose keys and values `slot`'s row holds from position 0: a running
        request's prompt and generated tokens but the last one, not yet fed back (a prompt that
        joined the decode step (`_join`) before its first step: all but its last token), or
        what an empty row kept."""
        if slot.state is SlotState.DECODE:
            return (slot.request.request.prompt_ids + slot.generated)[:-1]
        return self._held[slot.index]

    def _release(self, slot: Slot) -> RequestHandle:
        self._held[slot.index] = self._holds(slot)
        self._releases += 1
        self._released[slot.index] = self._releases
        self.selector.release(slot.index)
        handle = slot.release()
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
        return handle

    def _fail(self, slots: list[Slot], phase: str, exc: Exception) -> None:
        ids = ", ".join(slot.request.request.request_id for slot in slots)
        logger.error("model %s step failed for %s", phase, ids, exc_info=exc)
        for slot in slots:
            handle = self._release(slot)
            self._held[slot.index] = []  # the failed step may have written part of the row
            error = GenerationError(
                f"Request failed during generation: the model's {phase} step raised "
                f"{type(exc).__name__} (request {handle.request.request_id})"
            )
            handle.put(ErrorEvent(error))

    def _prefill(self, slots: list[Slot], reuse: dict[int, Reuse] | None = None) -> None:
        """Prefill `slots`; those in `reuse` start from the positions it names (copied into
        their rows first)."""
        requests = [slot.request.request for slot in slots]
        seq_ids = [slot.index for slot in slots]
        reuse = reuse or {}
        started = time.monotonic()
        try:
            self.selector.prepare(seq_ids)
            prompts = [r.prompt_ids for r in requests]
            wanted = [r.decoder_input_details for r in requests]
            if reuse:
                backend = cast(PrefixBackend, self.backend)  # `shape.prefix_reuse` said it can
                for slot in slots:
                    found = reuse.get(slot.index)
                    if found is not None and found.source != slot.index:
                        backend.copy_prefix(found.source, slot.index, found.length)
                cached = [reuse[i].length if i in reuse else 0 for i in seq_ids]
                output = backend.prefill(prompts, seq_ids, wanted, cached)
                self.reused_tokens += sum(cached)
            else:
                output = self.backend.prefill(prompts, seq_ids, wanted)
            selection = self.selector.select(output.logits, seq_ids)
        except Exception as exc:
            self._fail(slots, "prefill", exc)
            return
        self._observe("prefill", len(slots), started)
        self._prefilled(slots, output)
        self._emit(slots, selection)

    def _prefilled(self, slots: list[Slot], output: PrefillOutput) -> None:
        self._steps_since_prefill = 0
        for slot, prompt_logits in zip(slots, output.prompt_logits):
            slot.prefilled()
            if prompt_logits is not None:
                request = slot.request.request
                slot.prefill_tokens, slot.prefill_top = self._prompt_tokens(
                    request.prompt_ids, prompt_logits, request.params.top_n_tokens
                )

    @staticmethod
    def _last_tokens(slots: list[Slot]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode inputs: `[n]` last token of each slot (a joining prompt's own last token,
        `_join`), `[n]` its position."""
        input_ids = torch.tensor(
            [(slot.generated or slot.request.request.prompt_ids)[-1] for slot in slots],
            dtype=torch.long,
        )
        positions = torch.tensor([slot.total_tokens - 1 for slot in slots], dtype=torch.long)
        return input_ids, positions

    def _mixed(self, admitted: list[Slot], decoding: list[Slot]) -> None:
        requests = [slot.request.request for slot in admitted]
        prompt_seq_ids = [slot.index for slot in admitted]
        seq_ids = [slot.index for slot in decoding]
        input_ids, positions = self._last_tokens(decoding)
        backend = cast(MixedBackend, self.backend)  # `shape.mixed_steps` said it can
        started = time.monotonic()
        try:
            self.selector.prepare(seq_ids + prompt_seq_ids)
            logits, output = backend.mixed(
                input_ids,
                positions,
                seq_ids,
                [r.prompt_ids for r in requests],
                prompt_seq_ids,
                [r.decoder_input_details for r in requests],
            )
            selection = self.selector.select(
                torch.cat([logits, output.logits]), seq_ids + prompt_seq_ids
            )
        except Exception as exc:
            logger.warning("mixed step failed (%s): its prefill and decode run again apart", exc)
            self._prefill(admitted)
            self._decode([slot for slot in self.slots if slot.state is SlotState.DECODE])
            return
        self._observe("prefill", len(admitted), started)
        self._observe("decode", len(decoding), started)
        self._prefilled(admitted, output)
        self._emit(decoding + admitted, selection)

    def _decode(self, slots: list[Slot]) -> None:
        seq_ids = [slot.index for slot in slots]
        input_ids, positions = self._last_tokens(slots)
        started = time.monotonic()
        try:
            self.selector.prepare(seq_ids)
            logits = self.backend.decode(input_ids, positions, seq_ids)
            selection = self.selector.select(logits, seq_ids)
        except Exception as exc:
            self._fail(slots, "decode", exc)
            return
        self._observe("decode", len(slots), started)
        self._steps_since_prefill += 1
        self._emit(slots, selection)

    def _observe(self, method: str, batch_size: int, started: float) -> None:
        if self._on_step is not None:
            self._on_step(method, batch_size, time.monotonic() - started)

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _prompt_tokens(
        self, prompt_ids: list[int], logits: torch.Tensor, top_n: int
    ) -> tuple[list[Token], list[list[Token]]]:
        """Prompt tokens with log P(token | preceding tokens), and at each position the `top_n`
        most likely tokens (none at the first). logits: `[prompt_len, vocab]`."""
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [prompt_len - 1, vocab]
        following = torch.tensor(prompt_ids[1:], dtype=torch.long)[:, None]
        values = [None, *logprobs.gather(1, following)[:, 0].tolist()]
        tokens = [
            Token(id=i, text=self._text(i), logprob=lp, special=i in self.special_ids)
            for i, lp in zip(prompt_ids, values)
        ]
        tops: list[list[Token]] = [[] for _ in prompt_ids]
        if top_n and len(prompt_ids) > 1:
            best, ids = logprobs.topk(top_n, dim=-1)
            for position, (row_ids, row_best) in enumerate(zip(ids.tolist(), best.tolist()), 1):
                tops[position] = [
                    Token(i, self._text(i), lp, i in self.special_ids)
                    for i, lp in zip(row_ids, row_best)
                ]
        return tokens, tops

    def _emit(self, slots: list[Slot], selection: Selection) -> None:
        for slot, token_id, logprob, top in zip(
            slots, selection.ids, selection.logprobs, selection.top
        ):
            special = token_id in self.special_ids
            piece, reason = slot.append(token_id, special)
            reported: float | None = logprob
            if self.on_device_sampling:
                reported, top = None, []
            token = Token(token_id, self._text(token_id) if special else piece, reported, special)
            top_tokens = [Token(i, self._text(i), lp, i in self.special_ids) for i, lp in top]
            slot.request.put(TokenEvent(token, top_tokens, last=reason is not None))
            if reason is not None:
                self._finish(slot, reason)

    def _finish(self, slot: Slot, reason: FinishReason) -> None:
        now = time.monotonic()
        handle = slot.request
        final = FinalEvent(
            finish_reason=reason,
            text=slot.final_text(),
            generated_tokens=len(slot.generated),
            prompt_tokens=len(handle.request.prompt_ids),
            seed=slot.seed,
            prefill=slot.prefill_tokens,
            prefill_top=slot.prefill_top,
            queue_time=slot.started_at - handle.submitted_at,
            inference_time=now - slot.started_at,
        )
        self._release(slot)
        handle.put(final)

    def _shutdown(self) -> None:
        """Fail whatever is left when the loop ends."""
        reason = self.failure or "The server is shutting down"
        for slot in self.slots:
            if slot.handle is not None:
                handle = self._release(slot)
                handle.put(ErrorEvent(UnavailableError(reason)))
        with self._cond:
            self._accepting = False
            while self._waiting:
                handle = self._waiting.popleft()
                self._in_flight -= 1
                handle.put(ErrorEvent(UnavailableError(reason)))
            self._cond.notify_all()
