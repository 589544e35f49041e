"""Token selection, batched over slots with per-row parameters.

Producing logits is the model's job; choosing the next token is this module's. One `select`
call handles every active slot with tensor operations over `[n, vocab]`, in TGI's order:
repetition penalty, frequency/presence penalties, temperature, top-k, top-p, typical-p, then a
greedy argmax or a draw from the row's own seeded `torch.Generator`.

Top-k and top-p only need each row's threshold value, found on the row's `CANDIDATES` largest
logits (`topk`) instead of a full-vocabulary sort; a row whose nucleus is wider than that falls
back to an exact sort. Sampling draws one uniform number per row and inverts the cumulative
distribution in vocabulary order, so the draw depends only on the row's own generator and
distribution: a seeded request gives the same tokens alone or in a full batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """Per-request token choice parameters (TGI generate parameters)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    top_n_tokens: int = 0
    """Alternatives reported with each token (their log-probabilities)."""

    @property
    def sampling(self) -> bool:
        """TGI samples when asked, or when any distribution warper is set."""
        return (
            self.do_sample
            or self.temperature != 1.0
            or self.top_k > 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
        )

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass
class Selection:
    """Chosen tokens for `n` rows."""

    ids: list[int]
    logprobs: list[float]
    """Log-probability of each chosen token under the model's distribution."""
    top: list[list[tuple[int, float]]]
    """Per row, its `top_n_tokens` most likely tokens with their log-probabilities."""


class TokenSelector:
    """Holds per-slot parameters, generators and token counts; selects tokens for a step."""

    def __init__(self, batch_size: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.params: list[SamplingParams | None] = [None] * batch_size
        self.generators: list[torch.Generator | None] = [None] * batch_size
        self.temperature = torch.ones(batch_size)
        self.top_k = torch.zeros(batch_size, dtype=torch.long)
        self.top_p = torch.ones(batch_size)
        self.typical_p = torch.ones(batch_size)
        self.repetition = torch.ones(batch_size)
        self.frequency = torch.zeros(batch_size)
        self.presence = torch.zeros(batch_size)
        self.counts: torch.Tensor | None = None
        """`[batch_size, vocab]` occurrences of each token in prompt + output, allocated on first
        use of a penalty."""

    def assign(self, slot: int, params: SamplingParams, prompt_ids: list[int]) -> int | None:
        """Set up a slot for a request; return the seed used when it samples."""
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
        self.typical_p[slot] = params.typical_p
        self.repetition[slot] = params.repetition_penalty
        self.frequency[slot] = params.frequency_penalty
        self.presence[slot] = params.presence_penalty
        if params.penalized:
            if self.counts is None:
                self.counts = torch.zeros(len(self.params), self.vocab_size)
            prompt = torch.tensor(prompt_ids, dtype=torch.long).clamp_(0, self.vocab_size - 1)
            self.counts[slot] = torch.bincount(prompt, minlength=self.vocab_size)[: self.vocab_size]
        return seed

    def release(self, slot: int) -> None:
        self.params[slot] = None
        self.generators[slot] = None

    def select(self, logits: torch.Tensor, slots: list[int]) -> Selection:
        """Choose one token per row. logits: `[n, vocab]` float32, row i belongs to `slots[i]`."""
        params = [self.params[s] for s in slots]
        index = torch.tensor(slots, dtype=torch.long)
        logits = logits[:, : self.vocab_size].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = self._penalize(logits, index, params)
        sampled_rows = [i for i, p in enumerate(params) if p.sampling]
        if len(sampled_rows) == len(params):
            ids = self._sample(scores, index, slots)
        else:
            ids = scores.argmax(dim=-1)
            if sampled_rows:
                rows = torch.tensor(sampled_rows)
                ids[rows] = self._sample(
                    scores[rows], index[rows], [slots[i] for i in sampled_rows]
                )
        if self.counts is not None and any(p.penalized for p in params):
            self.counts[index, ids] += 1
        chosen = logprobs.gather(1, ids[:, None])[:, 0]
        top: list[list[tuple[int, float]]] = [[] for _ in params]
        top_n = max(p.top_n_tokens for p in params)
        if top_n:
            values, indices = logprobs.topk(top_n, dim=-1)
            values, indices = values.tolist(), indices.tolist()
            for i, p in enumerate(params):
                n = p.top_n_tokens
                top[i] = list(zip(indices[i][:n], values[i][:n]))
        return Selection(ids=ids.tolist(), logprobs=chosen.tolist(), top=top)

    def _penalize(
        self, logits: torch.Tensor, index: torch.Tensor, params: list[SamplingParams]
    ) -> torch.Tensor:
        if self.counts is None or not any(p.penalized for p in params):
            return logits
        counts = self.counts[index]
        seen = counts > 0
        repetition = self.repetition[index][:, None]
        # Like transformers: divide positive scores by the penalty, multiply negative ones.
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
        logits = logits - self.frequency[index][:, None] * counts
        return logits - self.presence[index][:, None] * seen

    def _sample(self, scores: torch.Tensor, index: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Draw one token per row from the warped distribution. scores: `[m, vocab]`."""
        scores = scores / self.temperature[index][:, None]
        top_k = self.top_k[index]
        top_p = self.top_p[index]
        typical_p = self.typical_p[index]
        if bool((top_k > 0).any() | (top_p < 1).any()):
            scores = self._truncate(scores, top_k, top_p)
        typical_rows = (typical_p < 1).nonzero()[:, 0]
        if typical_rows.numel():
            scores[typical_rows] = _typical(scores[typical_rows], typical_p[typical_rows])
        cdf = torch.softmax(scores, dim=-1).cumsum_(dim=-1)
        uniform = torch.stack([torch.rand((), generator=self.generators[s]) for s in slots])
        ids = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        return ids.clamp_(max=scores.shape[-1] - 1)

    def _truncate(
        self, scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
    ) -> torch.Tensor:
        """Mask tokens outside each row's top-k and then top-p set. scores: `[m, vocab]`."""
        vocab = scores.shape[-1]
        k = min(vocab, max(CANDIDATES, int(top_k.max())))
        values = scores.topk(k, dim=-1).values  # [m, k], descending
        rank = torch.arange(k)[None, :]
        in_top_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        kept = values.masked_fill(~in_top_k, float("-inf"))
        # Probabilities after top-k: normalised over the top-k set, or the whole vocabulary.
        full_norm = torch.logsumexp(scores, dim=-1)
        topk_norm = torch.logsumexp(kept, dim=-1)
        norm = torch.where(top_k > 0, topk_norm, full_norm)
        probs = torch.exp(kept - norm[:, None])
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely candidates
        keep = (before < top_p[:, None]) & in_top_k
        keep[:, 0] = True
        last = keep.sum(dim=-1) - 1
        threshold = values.gather(1, last[:, None])
        # A row whose nucleus may reach past the candidates needs an exact full sort.
        covered = (
            (before[:, -1] + probs[:, -1] >= top_p) | ((top_k > 0) & (top_k <= k)) | (top_p >= 1)
        )
        out = scores.masked_fill(scores < threshold, float("-inf"))
        for row in (~covered).nonzero()[:, 0].tolist():
            out[row] = _exact_truncate(scores[row], int(top_k[row]), float(top_p[row]))
        return out


def _exact_truncate(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p on one row `[vocab]` with a full sort (rare fallback)."""
    if top_k > 0:
        threshold = scores.topk(min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if top_p < 1:
        values, order = scores.sort(descending=True)
        probs = values.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        remove = before >= top_p
        remove[0] = False
        scores = scores.clone()
        scores[order[remove]] = float("-inf")
    return scores


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
