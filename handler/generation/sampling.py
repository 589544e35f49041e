"""Token selection, batched over slots with per-row parameters.

Producing logits is the model's job; choosing the next token is this module's. One `select`
call handles every active slot with tensor operations over `[n, vocab]`, in TGI's order:
repetition penalty, frequency/presence penalties, temperature, top-k, top-p, typical-p, then a
greedy argmax or a draw from the row's own seeded `torch.Generator`.

Full-vocabulary passes are what cost, so there are few of them: penalties touch only the tokens
a row has seen (gathered from a `[batch, sequence_length]` table of seen ids), log-probabilities
come from one `logsumexp`, and a row with top-k or top-p samples among its `CANDIDATES` largest
logits (`topk`) instead of sorting the vocabulary; a row whose nucleus is wider than that falls
back to an exact full sort. Sampling draws one uniform number per row and inverts the row's
cumulative distribution, so the draw depends only on the row's own generator and distribution:
a seeded request gives the same tokens alone or in a full batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from handler.generation.request import SamplingParams

__all__ = ["CANDIDATES", "SamplingParams", "Selection", "TokenSelector"]

CANDIDATES = 256


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

    def __init__(self, batch_size: int, vocab_size: int, sequence_length: int = 4096) -> None:
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
        self.sequence_length = sequence_length
        self.counts: torch.Tensor | None = None
        """`[batch_size, vocab]` occurrences of each token in prompt + output, allocated on first
        use of a penalty."""
        self.seen: torch.Tensor | None = None
        """`[batch_size, sequence_length]` distinct token ids each row has seen (first
        `seen_len[row]` entries; the rest repeat the first one)."""
        self.seen_len = torch.zeros(batch_size, dtype=torch.long)

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
                batch = len(self.params)
                self.counts = torch.zeros(batch, self.vocab_size)
                self.seen = torch.zeros(batch, self.sequence_length + 1, dtype=torch.long)
            prompt = torch.tensor(prompt_ids, dtype=torch.long).clamp_(0, self.vocab_size - 1)
            self.counts[slot] = torch.bincount(prompt, minlength=self.vocab_size)[: self.vocab_size]
            distinct = prompt.unique()
            self.seen[slot] = distinct[0]
            self.seen[slot, : distinct.numel()] = distinct
            self.seen_len[slot] = distinct.numel()
        return seed

    def release(self, slot: int) -> None:
        self.params[slot] = None
        self.generators[slot] = None

    @torch.inference_mode()
    def select(self, logits: torch.Tensor, slots: list[int]) -> Selection:
        """Choose one token per row. logits: `[n, vocab]` float32, row i belongs to `slots[i]`."""
        params = [self.params[s] for s in slots]
        index = torch.tensor(slots, dtype=torch.long)
        logits = logits[:, : self.vocab_size].float()
        normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)  # [n, 1]
        penalized = self.counts is not None and any(p.penalized for p in params)
        # Penalties are applied in place on the seen positions and undone afterwards: cheaper
        # than copying `[n, vocab]`, and the log-probabilities below need the raw logits.
        restore = self._penalize(logits, index) if penalized else None
        sampled_rows = [i for i, p in enumerate(params) if p.sampling]
        if len(sampled_rows) == len(params):
            ids = self._sample(logits, index, slots)
        else:
            ids = logits.argmax(dim=-1)
            if sampled_rows:
                rows = torch.tensor(sampled_rows)
                ids[rows] = self._sample(
                    logits[rows], index[rows], [slots[i] for i in sampled_rows]
                )
        if restore is not None:
            logits.scatter_(1, *restore)
            self._observe(index, ids)
        chosen = (logits.gather(1, ids[:, None]) - normalizer)[:, 0]
        top: list[list[tuple[int, float]]] = [[] for _ in params]
        top_n = max(p.top_n_tokens for p in params)
        if top_n:
            values, indices = logits.topk(top_n, dim=-1)
            values, indices = (values - normalizer).tolist(), indices.tolist()
            for i, p in enumerate(params):
                n = p.top_n_tokens
                top[i] = list(zip(indices[i][:n], values[i][:n]))
        return Selection(ids=ids.tolist(), logprobs=chosen.tolist(), top=top)

    def _penalize(
        self, scores: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply repetition, frequency and presence penalties in place on each row's seen tokens
        only. Returns `(positions, raw values)` to restore the scores with `scatter_`."""
        width = int(self.seen_len[index].max())
        seen = self.seen[index, :width]  # [n, width]; padding repeats a real id
        counts = self.counts[index[:, None], seen]
        raw = scores.gather(1, seen)
        values = raw
        repetition = self.repetition[index][:, None]
        # Like transformers: divide positive scores by the penalty, multiply negative ones.
        values = torch.where(values > 0, values / repetition, values * repetition)
        values = values - self.frequency[index][:, None] * counts
        values = values - self.presence[index][:, None] * (counts > 0)
        scores.scatter_(1, seen, values)
        return seen, raw

    def _observe(self, index: torch.Tensor, ids: torch.Tensor) -> None:
        """Count the chosen tokens; record the ones a row had not seen yet."""
        new = self.counts[index, ids] == 0
        self.counts[index, ids] += 1
        if bool(new.any()):
            rows = index[new]
            self.seen[rows, self.seen_len[rows]] = ids[new]
            self.seen_len[rows] += 1

    def _sample(self, scores: torch.Tensor, index: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Draw one token per row from the warped distribution. scores: `[m, vocab]`."""
        uniform = torch.stack([torch.rand((), generator=self.generators[s]) for s in slots])
        temperature = self.temperature[index]
        top_k, top_p, typical_p = self.top_k[index], self.top_p[index], self.typical_p[index]
        ids = torch.empty(len(slots), dtype=torch.long)
        truncated = ((top_k > 0) | (top_p < 1)) & (typical_p >= 1)
        full = (~truncated).nonzero()[:, 0]
        rows = truncated.nonzero()[:, 0]
        if rows.numel():
            # Index rows only when they are a subset: `scores[rows]` copies `[m, vocab]`.
            subset = scores if rows.numel() == len(slots) else scores[rows]
            picked, covered = self._sample_candidates(
                subset, temperature[rows], top_k[rows], top_p[rows], uniform[rows]
            )
            ids[rows] = picked
            full = torch.cat([full, rows[~covered]])
        if full.numel():
            subset = scores if full.numel() == len(slots) else scores[full]
            warped = subset / temperature[full][:, None]
            if bool(((top_k[full] > 0) | (top_p[full] < 1)).any()):
                warped = self._truncate(warped, top_k[full], top_p[full])
            typical = (typical_p[full] < 1).nonzero()[:, 0]
            if typical.numel():
                warped[typical] = _typical(warped[typical], typical_p[full][typical])
            cdf = torch.softmax(warped, dim=-1).cumsum_(dim=-1)
            ids[full] = _invert(cdf, uniform[full])
        return ids

    def _sample_candidates(
        self,
        scores: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        uniform: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k/top-p sampling among each row's largest logits. scores: `[m, vocab]`.

        Returns the chosen ids `[m]` and whether each row's kept set fit in the candidates.
        """
        vocab = scores.shape[-1]
        # Rows with a top-k need only their k largest; rows with top-p alone need a margin.
        widest = int(top_k.max()) if bool((top_k > 0).all()) else max(CANDIDATES, int(top_k.max()))
        k = min(vocab, widest)
        values, candidates = scores.topk(k, dim=-1)  # [m, k], descending
        values = values / temperature[:, None]
        rank = torch.arange(k)[None, :]
        in_top_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        kept = values.masked_fill(~in_top_k, float("-inf"))
        # Probabilities after top-k: normalised over the top-k set, else over the vocabulary.
        norm = torch.logsumexp(kept, dim=-1)
        whole = (top_k <= 0) & (top_p < 1)
        if bool(whole.any()):
            scaled = scores[whole] / temperature[whole][:, None]
            norm[whole] = torch.logsumexp(scaled, dim=-1)
        probs = torch.exp(kept - norm[:, None])
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely candidates
        keep = (before < top_p[:, None]) & in_top_k
        keep[:, 0] = True
        covered = (top_k > 0) | (before[:, -1] + probs[:, -1] >= top_p)
        cdf = (probs * keep).cumsum_(dim=-1)
        return candidates.gather(1, _invert(cdf, uniform)[:, None])[:, 0], covered

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


def _invert(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's unnormalised cumulative distribution `[m, width]`."""
    target = (uniform * cdf[:, -1])[:, None]
    index = torch.searchsorted(cdf, target, right=True)[:, 0]
    return index.clamp_(max=cdf.shape[-1] - 1)


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
