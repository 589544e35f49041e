"""Token selection, batched over slots with per-row parameters.

Producing logits is the model's job; choosing the next token is this module's. One `select`
call handles every active slot with tensor operations over `[n, vocab]`, in this order: the
request's `logit_bias`, the ban on ending before `min_tokens`, the grammar's allowed set
(structured output: every other token at -inf), repetition penalty,
frequency/presence penalties (TGI's order), then temperature, top-k, top-p, min-p, typical-p
(`transformers`' order), then a greedy argmax or a draw from the row's own seeded
`torch.Generator`. Log-probabilities are always the model's own, before any of these.

Full-vocabulary passes are what cost, so there are few of them: penalties touch only the tokens
a row has seen (gathered from a `[batch, sequence_length]` table of seen ids), log-probabilities
come from one `logsumexp`, and a row with top-k, top-p or min-p samples among its `CANDIDATES`
largest logits (`topk`) instead of sorting the vocabulary; a row whose kept set is wider falls
back to an exact full sort through the same truncation rule (`_keep`). Sampling draws one
uniform number per row and inverts the row's cumulative distribution, so the draw depends only
on the row's own generator and distribution: a seeded request gives the same tokens alone or in
a full batch.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import cast

import torch

from handler.generation.grammar import Constraint, fill_masks
from handler.model.params import SamplingParams
from handler.model.threads import serial_helper

__all__ = ["CANDIDATES", "Selection", "TokenSelector"]

CANDIDATES = 256


@dataclass
class Selection:
    """Chosen tokens for `n` rows."""

    ids: list[int]
    logprobs: list[float | None]
    """Log-probability of each chosen token under the model's distribution (None for a row
    whose request asks for none)."""
    top: list[list[tuple[int, float]]]
    """Per row, its `top_n_tokens` most likely tokens with their log-probabilities."""


class TokenSelector:
    """Holds per-slot parameters, generators and token counts; selects tokens for a step."""

    def __init__(self, batch_size: int, vocab_size: int, sequence_length: int = 4096) -> None:
        self.vocab_size = vocab_size
        self.params: list[SamplingParams | None] = [None] * batch_size
        self.generators: list[torch.Generator | None] = [None] * batch_size
        self.temperature = torch.ones(batch_size)
        self.top_k = torch.zeros(batch_size, dtype=torch.long)
        self.top_p = torch.ones(batch_size)
        self.min_p = torch.zeros(batch_size)
        self.typical_p = torch.ones(batch_size)
        self.repetition = torch.ones(batch_size)
        self.frequency = torch.zeros(batch_size)
        self.presence = torch.zeros(batch_size)
        self.bias: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * batch_size
        """Per slot, `logit_bias` as (`[b]` token ids, `[b]` additive values), or None."""
        self.banned: list[torch.Tensor | None] = [None] * batch_size
        """Per slot, `[e]` ids that may not be chosen yet (the end tokens, before `min_tokens`)."""
        self.banned_steps = [0] * batch_size
        """Per slot, how many more tokens `banned` holds for."""
        self.sequence_length = sequence_length
        self.counts: torch.Tensor | None = None
        """`[batch_size, vocab]` occurrences of each token in prompt + output, allocated on first
        use of a penalty."""
        self.seen: torch.Tensor | None = None
        """`[batch_size, sequence_length]` distinct token ids each row has seen (first
        `seen_len[row]` entries; the rest repeat the first one)."""
        self.seen_len = torch.zeros(batch_size, dtype=torch.long)
        self.constraints: list[Constraint | None] = [None] * batch_size
        """Per slot, the grammar its output must follow, or None."""
        self.end_ids: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * batch_size
        """Per slot, `[e]` tokens that end it: allowed when its grammar may end."""
        self.bitmask = torch.zeros(batch_size, (vocab_size + 31) // 32, dtype=torch.int32)
        """`[batch_size, words]` allowed-token bits of the constrained rows of a step."""
        self.mask_seconds = 0.0
        """Time the step waited for grammar masks and spent applying them (the benchmark
        reports it)."""
        self.mask_steps = 0
        self._pending: tuple[list[int], Future[torch.Tensor]] | None = None
        """Masks being computed while the model runs: (the step's slots, completion)."""
        self._masker: ThreadPoolExecutor | None = None

    def prepare(self, slots: list[int]) -> None:
        """Start computing the grammar masks of the next `select(logits, slots)` in the
        background, so that they are ready when the forward that produces `logits` ends. Call
        it just before that forward; the rows' grammars must not advance until `select`. Does
        nothing when no row is constrained."""
        rows = [s for s in slots if self.constraints[s] is not None]
        if not rows:
            return
        if self._masker is None:
            # Its operators run on itself alone: an OpenMP pool of its own would slow every
            # step's parallel regions (`handler/model/threads.py`).
            self._masker = ThreadPoolExecutor(
                1, thread_name_prefix="grammar-mask", initializer=serial_helper
            )
        constraints = cast(list[Constraint], [self.constraints[s] for s in rows])
        ends = [self.end_ids[s] for s in rows]
        self._pending = (list(slots), self._masker.submit(self._banned, constraints, ends))

    def _banned(self, constraints: list[Constraint], ends: list[torch.Tensor]) -> torch.Tensor:
        """`[m, vocab]` bool: the tokens each grammar does not allow next. Its end token stands
        for every one of the row's end tokens, `ends[row]`."""
        bitmask = self.bitmask[: len(constraints)]
        fill_masks(constraints, bitmask)
        banned = unpack_bits(bitmask, self.vocab_size, unset=True)
        eos_banned = banned[range(len(constraints)), [c.eos_id for c in constraints]].tolist()
        for row, row_ends in enumerate(ends):
            if not eos_banned[row] and row_ends.numel():
                banned[row, row_ends] = False
        for row in banned.all(dim=-1).nonzero()[:, 0].tolist():
            banned[row, constraints[row].eos_id] = False  # the grammar is in error: let it end
        return banned

    def assign(
        self,
        slot: int,
        params: SamplingParams,
        prompt_ids: list[int],
        end_ids: frozenset[int] = frozenset(),
        constraint: Constraint | None = None,
    ) -> int | None:
        """Set up a slot for a request; return the seed used when it samples. `end_ids` are the
        tokens that would end it (EOS, `stop_token_ids`): banned for its first `min_tokens`, and
        allowed by `constraint` (its grammar) exactly when the grammar may end."""
        seed = None
        generator = None
        if params.sampling:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        self.params[slot] = params
        self.generators[slot] = generator
        self.temperature[slot] = params.temperature if params.sampling else 1.0
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.typical_p[slot] = params.typical_p
        self.repetition[slot] = params.repetition_penalty
        self.frequency[slot] = params.frequency_penalty
        self.presence[slot] = params.presence_penalty
        self.bias[slot] = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self.bias[slot] = (torch.tensor(ids), torch.tensor(values, dtype=torch.float32))
        self.constraints[slot] = constraint
        self.end_ids[slot] = torch.tensor(sorted(i for i in end_ids if i < self.vocab_size))
        self.banned[slot] = None
        self.banned_steps[slot] = params.min_tokens if end_ids else 0
        if self.banned_steps[slot]:
            self.banned[slot] = torch.tensor(sorted(i for i in end_ids if i < self.vocab_size))
        if params.penalized:
            counts, seen = self._penalty_tables()
            prompt = torch.tensor(prompt_ids, dtype=torch.long).clamp_(0, self.vocab_size - 1)
            counts[slot] = torch.bincount(prompt, minlength=self.vocab_size)[: self.vocab_size]
            distinct = prompt.unique()
            seen[slot] = distinct[0]
            seen[slot, : distinct.numel()] = distinct
            self.seen_len[slot] = distinct.numel()
        return seed

    def _penalty_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`counts` and `seen`, allocated on first use."""
        if self.counts is None or self.seen is None:
            batch = len(self.params)
            self.counts = torch.zeros(batch, self.vocab_size)
            self.seen = torch.zeros(batch, self.sequence_length + 1, dtype=torch.long)
        return self.counts, self.seen

    def _held(self, slot: int) -> SamplingParams:
        """The parameters of the request in `slot` (one that was assigned)."""
        params = self.params[slot]
        if params is None:
            raise RuntimeError(f"slot {slot} has no request")
        return params

    def release(self, slot: int) -> None:
        self.params[slot] = None
        self.generators[slot] = None
        self.bias[slot] = None
        self.banned[slot] = None
        self.banned_steps[slot] = 0
        self.constraints[slot] = None

    @torch.inference_mode()
    def select(self, logits: torch.Tensor, slots: list[int]) -> Selection:
        """Choose one token per row. logits: `[n, vocab]` float32, row i belongs to `slots[i]`."""
        params = [self._held(s) for s in slots]
        index = torch.tensor(slots, dtype=torch.long)
        logits = logits[:, : self.vocab_size].float()
        blocks = _block_max(logits)  # [n, vocab / BLOCK] or None
        wanted = [i for i, p in enumerate(params) if p.logprobs or p.top_n_tokens]
        normalizer = None  # [n, 1] log of each row's partition function, where asked for
        if len(wanted) == len(params):
            normalizer = _logsumexp(logits, blocks)
        elif wanted:
            asked = torch.tensor(wanted)
            normalizer = torch.zeros(len(params), 1)
            normalizer[asked] = torch.logsumexp(logits[asked], dim=-1, keepdim=True)
        # Biases, bans and penalties are applied in place on the few positions they touch and
        # undone afterwards (in reverse order): cheaper than copying `[n, vocab]`, and the
        # log-probabilities below are the model's own. A grammar mask writes a masked copy,
        # `scores`, on which the rest works and which needs no undoing.
        edits = self._edit(logits, slots)
        scores = logits
        constrained = [i for i, s in enumerate(slots) if self.constraints[s] is not None]
        if constrained:
            scores = self._mask(logits, slots, constrained)
        penalized = self.counts is not None and any(p.penalized for p in params)
        if penalized:
            edit = self._penalize(scores, index)
            if scores is logits:
                edits.append(edit)
        sampled_rows = [i for i, p in enumerate(params) if p.sampling]
        if len(sampled_rows) == len(params):
            ids = self._sample(scores, index, slots)
        else:
            ids = _argmax(scores, blocks if scores is logits and not edits else None)
            if sampled_rows:
                sampled = torch.tensor(sampled_rows)
                ids[sampled] = self._sample(
                    scores[sampled], index[sampled], [slots[i] for i in sampled_rows]
                )
        for rows, positions, raw in reversed(edits):
            logits[rows, positions] = raw
        if penalized:
            self._observe(index, ids)
        for i in constrained:
            self._advance(slots[i], int(ids[i]))
        logprobs: list[float | None] = [None] * len(params)
        if normalizer is not None:
            chosen = (logits.gather(1, ids[:, None]) - normalizer)[:, 0].tolist()
            for i in wanted:
                logprobs[i] = chosen[i]
        top: list[list[tuple[int, float]]] = [[] for _ in params]
        top_n = max(p.top_n_tokens for p in params)
        if top_n and normalizer is not None:  # a row with top tokens is a row in `wanted`
            best, best_ids = logits.topk(top_n, dim=-1)
            values, indices = (best - normalizer).tolist(), best_ids.tolist()
            for i, p in enumerate(params):
                n = p.top_n_tokens
                top[i] = list(zip(indices[i][:n], values[i][:n]))
        return Selection(ids=ids.tolist(), logprobs=logprobs, top=top)

    def _edit(self, scores: torch.Tensor, slots: list[int]) -> list[_Edit]:
        """Add each row's `logit_bias` and ban its end tokens while `min_tokens` are pending,
        in place. Returns what to restore. A step of a row counts against `min_tokens`."""
        edits: list[_Edit] = []
        for row, slot in enumerate(slots):
            bias = self.bias[slot]
            if bias is not None:
                ids, values = bias
                raw = scores[row, ids]
                edits.append((row, ids, raw))
                scores[row, ids] = raw + values
            banned = self.banned[slot]
            if banned is not None and self.banned_steps[slot] > 0:
                edits.append((row, banned, scores[row, banned]))
                scores[row, banned] = float("-inf")
                self.banned_steps[slot] -= 1
        return edits

    def _mask(self, scores: torch.Tensor, slots: list[int], constrained: list[int]) -> torch.Tensor:
        """A copy of `scores` with every token that a row's grammar does not allow at -inf, for
        the rows `constrained` (indices into `slots`). The masks were computed during the
        forward when `prepare` was told of this step, else they are computed now."""
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == slots:
            banned = pending[1].result()
        else:
            if pending is not None:  # from a step whose forward failed: let it end first
                wait([pending[1]])
            held = [slots[i] for i in constrained]
            constraints = cast(list[Constraint], [self.constraints[s] for s in held])
            banned = self._banned(constraints, [self.end_ids[s] for s in held])
        if len(constrained) == len(slots):  # the common all-constrained batch: one pass
            masked = scores.masked_fill(banned, float("-inf"))
        else:
            rows = torch.tensor(constrained)
            masked = scores.clone()
            masked[rows] = scores[rows].masked_fill(banned, float("-inf"))
        self.mask_seconds += time.perf_counter() - started
        self.mask_steps += 1
        return masked

    def _advance(self, slot: int, token_id: int) -> None:
        """Move the slot's grammar past its chosen token (an end token as the grammar's own)."""
        constraint = self.constraints[slot]
        assert constraint is not None
        if token_id in self.end_ids[slot].tolist():
            token_id = constraint.eos_id
        constraint.consume(token_id)

    def _penalize(self, scores: torch.Tensor, index: torch.Tensor) -> _Edit:
        """Apply repetition, frequency and presence penalties in place on each row's seen tokens
        only. Returns `(rows, positions, raw values)` to restore the scores."""
        all_counts, all_seen = self._penalty_tables()
        width = int(self.seen_len[index].max())
        seen = all_seen[index, :width]  # [n, width]; padding repeats a real id
        counts = all_counts[index[:, None], seen]
        raw = scores.gather(1, seen)
        values = raw
        repetition = self.repetition[index][:, None]
        # Like transformers: divide positive scores by the penalty, multiply negative ones.
        values = torch.where(values > 0, values / repetition, values * repetition)
        values = values - self.frequency[index][:, None] * counts
        values = values - self.presence[index][:, None] * (counts > 0)
        scores.scatter_(1, seen, values)
        rows = torch.arange(len(index))[:, None].expand_as(seen)
        return rows, seen, raw

    def _observe(self, index: torch.Tensor, ids: torch.Tensor) -> None:
        """Count the chosen tokens; record the ones a row had not seen yet."""
        counts, seen = self._penalty_tables()
        new = counts[index, ids] == 0
        counts[index, ids] += 1
        if bool(new.any()):
            rows = index[new]
            seen[rows, self.seen_len[rows]] = ids[new]
            self.seen_len[rows] += 1

    def _sample(self, scores: torch.Tensor, index: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Draw one token per row from the warped distribution. scores: `[m, vocab]`.

        Rows that truncate (top-k, top-p or min-p, without typical-p) draw among their largest
        logits in descending order, the same order whatever their batch mates ask for; the
        others draw over the whole vocabulary."""
        uniform = torch.stack([torch.rand((), generator=self.generators[s]) for s in slots])
        temperature = self.temperature[index]
        top_k, top_p, min_p = self.top_k[index], self.top_p[index], self.min_p[index]
        typical_p = self.typical_p[index]
        ids = torch.empty(len(slots), dtype=torch.long)
        truncated = ((top_k > 0) | (top_p < 1) | (min_p > 0)) & (typical_p >= 1)
        full = (~truncated).nonzero()[:, 0]
        rows = truncated.nonzero()[:, 0]
        vocab = scores.shape[-1]
        # Each row's candidates: its top-k when that is at most CANDIDATES, else CANDIDATES (or
        # its larger top-k). A row's own parameters decide, never its batch mates'.
        own = (top_k > 0) & (top_k <= CANDIDATES)
        need = torch.where(own, top_k, top_k.clamp(min=CANDIDATES)).clamp_(max=vocab)
        pending = [(rows[need[rows] == k], k) for k in need[rows].unique().tolist()]
        while pending:
            rows, k = pending.pop()
            # Index rows only when they are a subset: `scores[rows]` copies `[m, vocab]`.
            subset = scores if rows.numel() == len(slots) else scores[rows]
            values, candidates = _topk(subset, k)  # [r, k], descending
            keep = _keep(subset, values, temperature[rows], top_k[rows], top_p[rows], min_p[rows])
            covered = ~keep[:, -1] | ((top_k[rows] > 0) & (top_k[rows] <= k)) | (k == vocab)
            scaled = values / temperature[rows][:, None]
            weights = torch.exp(scaled - scaled[:, :1]) * keep
            picked = candidates.gather(1, _invert(weights.cumsum_(dim=-1), uniform[rows])[:, None])
            ids[rows] = picked[:, 0]
            if not bool(covered.all()):  # the rest again, over the whole sorted vocabulary
                pending.append((rows[~covered], vocab))
        if full.numel():
            subset = scores if full.numel() == len(slots) else scores[full]
            warped = subset / temperature[full][:, None]
            limited = (top_k[full] > 0) | (top_p[full] < 1) | (min_p[full] > 0)
            for row in limited.nonzero()[:, 0].tolist():
                warped[row] = truncate(
                    warped[row : row + 1],
                    top_k[full][row : row + 1],
                    top_p[full][row : row + 1],
                    min_p[full][row : row + 1],
                )[0]
            typical = (typical_p[full] < 1).nonzero()[:, 0]
            if typical.numel():
                warped[typical] = _typical(warped[typical], typical_p[full][typical])
            cdf = torch.softmax(warped, dim=-1).cumsum_(dim=-1)
            ids[full] = _invert(cdf, uniform[full])
        return ids


BLOCK = 256
"""Width of the blocks of a row that `_argmax` and `_logsumexp` first reduce: torch's CPU
`argmax` over a long row is not vectorised, its `amax` over short blocks is."""
GROUPS = 32
"""`_topk` first takes the maximum over `GROUPS` strided slices of a row."""


def _block_max(scores: torch.Tensor) -> torch.Tensor | None:
    """`[n, vocab / BLOCK]` maxima of each row's blocks, or None where the row does not split
    into whole blocks (then the reductions below take torch's own path)."""
    n, vocab = scores.shape
    if vocab % BLOCK or vocab < 4 * BLOCK or not scores.is_contiguous():
        return None
    return scores.view(n, vocab // BLOCK, BLOCK).amax(dim=-1)


def _argmax(scores: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """`[n]` index of each row's largest value, the first one on ties (as `argmax`): the first
    block holding the row's maximum, then the maximum within it. `blocks`: `_block_max(scores)`
    when already known."""
    if blocks is None:
        blocks = _block_max(scores)
        if blocks is None:
            return scores.argmax(dim=-1)
    n = len(scores)
    best = blocks.argmax(dim=-1)  # [n]
    within = scores.view(n, -1, BLOCK)[torch.arange(n), best].argmax(dim=-1)
    return best * BLOCK + within


def _logsumexp(scores: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
    """`[n, 1]` log of the sum of exp over each row, with the row maxima from `blocks`."""
    if blocks is None:
        return torch.logsumexp(scores, dim=-1, keepdim=True)
    top = blocks.amax(dim=-1, keepdim=True)  # [n, 1]
    if not bool(torch.isfinite(top).all()):
        return torch.logsumexp(scores, dim=-1, keepdim=True)
    return (scores - top).exp_().sum(dim=-1, keepdim=True).log_() + top


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k)` (`[n, k]` values, descending, and their indices) in two passes: the
    maxima of `GROUPS` strided slices of each row point to the `k` columns that can hold the
    top k, and only their `GROUPS x k` entries are ranked. The same values; equal values may
    come in another order than `topk`'s."""
    n, vocab = scores.shape
    if vocab % GROUPS or GROUPS * k * 4 > vocab or not scores.is_contiguous():
        return scores.topk(k, dim=-1)
    width = vocab // GROUPS
    columns = scores.view(n, GROUPS, width).amax(dim=1)  # [n, width]
    best = columns.topk(k, dim=-1).indices  # [n, k]
    offsets = torch.arange(GROUPS)[None, :, None] * width
    candidates = (offsets + best[:, None, :]).view(n, GROUPS * k)
    values, order = scores.gather(1, candidates).topk(k, dim=-1)
    return values, candidates.gather(1, order)


_Edit = tuple[int | torch.Tensor, torch.Tensor, torch.Tensor]
"""(rows, positions, raw values) of an in-place change to a step's logits."""


def _keep(
    scores: torch.Tensor,
    values: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """The one truncation rule: which of each row's largest logits survive top-k, then top-p,
    then min-p (as `transformers`' warpers in that order). scores: `[m, vocab]` raw logits;
    values: `[m, k]` the largest of them, descending. Returns `[m, k]` bool, a prefix per row
    (the first candidate is always kept).

    Top-p's probabilities are normalised over the top-k set when a row has a top-k, else over
    the whole vocabulary; min-p keeps what is at least `min_p` times as likely as the best."""
    k = values.shape[-1]
    scaled = values / temperature[:, None]
    in_top_k = (top_k[:, None] <= 0) | (torch.arange(k)[None, :] < top_k[:, None])
    kept = scaled.masked_fill(~in_top_k, float("-inf"))
    norm = torch.logsumexp(kept, dim=-1)
    whole = (top_k <= 0) & (top_p < 1)
    if bool(whole.any()):
        norm[whole] = torch.logsumexp(scores[whole] / temperature[whole][:, None], dim=-1)
    probs = torch.exp(kept - norm[:, None])
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely candidates
    keep = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
    keep &= scaled >= scaled[:, :1] + torch.log(min_p)[:, None]  # log(0) = -inf keeps all
    keep[:, 0] = True
    return keep


def truncate(
    scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """`scores` `[m, vocab]` (already divided by the temperature) with every token outside each
    row's top-k / top-p / min-p set at -inf: `_keep` over a full sort."""
    values, order = scores.sort(dim=-1, descending=True)
    keep = _keep(scores, values, torch.ones(len(scores)), top_k, top_p, min_p)
    mask = torch.zeros_like(keep).scatter_(1, order, keep)
    return scores.masked_fill(~mask, float("-inf"))


_BITS = torch.bitwise_left_shift(
    torch.ones(32, dtype=torch.int32), torch.arange(32, dtype=torch.int32)
)
"""`[32]` int32 with bit i set in entry i (entry 31 is the sign bit)."""


def unpack_bits(bitmask: torch.Tensor, vocab: int, unset: bool = False) -> torch.Tensor:
    """`[n, words]` int32 bitmask (token id t is bit t % 32 of word t // 32) -> `[n, vocab]`
    bool: the set bits, or with `unset` the bits that are not set."""
    words = bitmask[:, :, None] & _BITS  # [n, words, 32]
    bits = words == 0 if unset else words != 0
    return bits.view(len(bitmask), -1)[:, :vocab]


def _invert(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's unnormalised cumulative distribution `[m, width]`."""
    target = (uniform * cdf[:, -1])[:, None]
    index = torch.searchsorted(cdf, target, right=True)[:, 0]
    return index.clamp_(max=cdf.shape[-1] - 1)


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical filtering (as transformers' `TypicalLogitsWarper`). scores: `[m, vocab]`."""
    log_probs = torch.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    entropy = -(torch.nan_to_num(log_probs) * probs).sum(dim=-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=-1).clamp_(max=scores.shape[-1] - 1)
    limit = sorted_shifted.gather(1, last[:, None])
    remove = shifted > limit
    return scores.masked_fill(remove, float("-inf"))
