"""Batched token selection against `transformers` logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from handler.generation import sampling
from handler.generation.sampling import TokenSelector
from handler.model.params import SamplingParams

VOCAB = 1000


def reference_support(logits: torch.Tensor, prompt: list[int], p: SamplingParams) -> set[int]:
    """Tokens left with non-zero probability by the transformers processors (TGI's order)."""
    ids = torch.tensor([prompt])
    scores = logits[None].clone()
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    if p.typical_p < 1:
        scores = TypicalLogitsWarper(p.typical_p)(ids, scores)
    return set(torch.isfinite(scores[0]).nonzero()[:, 0].tolist())


PARAMS = [
    SamplingParams(do_sample=True, top_k=20),
    SamplingParams(do_sample=True, top_p=0.8),
    SamplingParams(do_sample=True, temperature=0.5, top_k=50, top_p=0.9),
    SamplingParams(do_sample=True, temperature=1.5, top_p=0.95),
    SamplingParams(do_sample=True, top_p=0.999),
    SamplingParams(do_sample=True, typical_p=0.7),
    SamplingParams(do_sample=True, repetition_penalty=1.3, top_k=10),
    SamplingParams(do_sample=True, min_p=0.1),
    SamplingParams(do_sample=True, min_p=0.001),
    SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, min_p=0.05),
    SamplingParams(do_sample=True, top_k=40, min_p=0.2, typical_p=0.9),
]


@pytest.mark.parametrize("params", PARAMS)
def test_samples_stay_in_the_reference_support(params: SamplingParams, monkeypatch) -> None:
    monkeypatch.setattr(sampling, "CANDIDATES", 64)  # exercise the exact-sort fallback too
    torch.manual_seed(0)
    logits = torch.randn(8, VOCAB) * 3
    prompts = [torch.randint(0, VOCAB, (12,)).tolist() for _ in range(8)]
    selector = TokenSelector(8, VOCAB)
    for slot in range(8):
        selector.assign(slot, params, prompts[slot])
    support = [reference_support(logits[i], prompts[i], params) for i in range(8)]
    seen: list[set[int]] = [set() for _ in range(8)]
    for _ in range(200):
        if params.penalized:  # keep the penalty counts at the prompt's, as the reference sees them
            for slot in range(8):
                selector.assign(slot, params, prompts[slot])
        selection = selector.select(logits.clone(), list(range(8)))
        for i, token in enumerate(selection.ids):
            seen[i].add(token)
    for i in range(8):
        assert seen[i] <= support[i]
        if len(support[i]) <= 20:
            assert len(seen[i]) > 1 or len(support[i]) == 1


def test_truncation_mask_equals_reference(monkeypatch) -> None:
    monkeypatch.setattr(sampling, "CANDIDATES", 64)
    torch.manual_seed(1)
    logits = torch.randn(8, VOCAB) * torch.tensor([0.5, 1, 2, 4, 8, 1, 0.5, 3])[:, None]
    cases = [(0, 0.9, 0), (30, 1.0, 0), (30, 0.7, 0), (0, 0.999, 0), (5, 0.5, 0), (0, 0.3, 0)]
    cases += [(0, 1.0, 0.05), (20, 0.95, 0.1)]
    top_k = torch.tensor([k for k, _, _ in cases])
    top_p = torch.tensor([p for _, p, _ in cases])
    min_p = torch.tensor([m for _, _, m in cases])
    masked = sampling.truncate(logits.clone(), top_k, top_p, min_p)
    for i, (k, p, m) in enumerate(cases):
        params = SamplingParams(do_sample=True, top_k=k, top_p=p, min_p=m)
        assert set(torch.isfinite(masked[i]).nonzero()[:, 0].tolist()) == reference_support(
            logits[i], [0], params
        )


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 7]))
    selector = TokenSelector(1, 10)
    selector.assign(0, SamplingParams(do_sample=True, seed=3), [0])
    counts = torch.zeros(10)
    for _ in range(3000):
        counts[selector.select(logits.clone(), [0]).ids[0]] += 1
    assert torch.allclose(counts[:3] / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_greedy_rows_and_penalties_in_one_batch() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [1.0, 3.0, 2.0, -1.0], [1.0, 3.0, 2.9, -1.0]])
    selector = TokenSelector(3, 4)
    selector.assign(0, SamplingParams(), [1])
    selector.assign(1, SamplingParams(repetition_penalty=2.0), [1])  # 3.0 -> 1.5 < 2.0
    selector.assign(2, SamplingParams(frequency_penalty=0.5, presence_penalty=0.0), [1, 1])
    selection = selector.select(logits, [0, 1, 2])
    assert selection.ids == [1, 2, 2]  # row 2: 3.0 - 0.5 * 2 = 2.0 < 2.9
    # Log-probabilities are the model's, before penalties.
    assert selection.logprobs[1] == pytest.approx(torch.log_softmax(logits[1], -1)[2].item())
    # The chosen token now counts for the penalties of the next step.
    assert selector.counts[1, 2] == 1 and selector.counts[2, 1] == 2


def test_seeded_rows_do_not_depend_on_neighbours() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, VOCAB)
    params = SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=99)
    alone = TokenSelector(1, VOCAB)
    alone.assign(0, params, [1, 2])
    crowd = TokenSelector(5, VOCAB)
    for slot in range(5):
        crowd.assign(slot, params if slot == 3 else SamplingParams(do_sample=True, top_k=5), [1, 2])
    for _ in range(20):
        a = alone.select(logits[3:4].clone(), [0]).ids[0]
        b = crowd.select(logits.clone(), list(range(5))).ids[3]
        assert a == b


def test_logit_bias_moves_greedy_and_sampled_choices_but_not_logprobs() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]] * 3)
    selector = TokenSelector(3, 4)
    selector.assign(0, SamplingParams(logit_bias=((1, -100.0),)), [0])
    selector.assign(1, SamplingParams(logit_bias=((3, 5.0),)), [0])
    selector.assign(2, SamplingParams(do_sample=True, seed=1, logit_bias=((0, 100.0),)), [0])
    selection = selector.select(logits.clone(), [0, 1, 2])
    assert selection.ids == [2, 3, 0]
    raw = torch.log_softmax(logits[0], -1)
    assert selection.logprobs == pytest.approx([raw[2].item(), raw[3].item(), raw[0].item()])


def test_end_tokens_are_banned_for_min_tokens_steps() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])  # 1 is the end token, 3 a stop token id
    selector = TokenSelector(1, 4)
    selector.assign(0, SamplingParams(min_tokens=2), [0], end_ids=frozenset({1, 3}))
    chosen = [selector.select(logits.clone(), [0]).ids[0] for _ in range(3)]
    assert chosen == [2, 2, 1]
    # Without end tokens to ban (ignore_eos and no stop ids) nothing is banned.
    selector.assign(0, SamplingParams(min_tokens=2), [0])
    assert selector.select(logits.clone(), [0]).ids == [1]


def test_min_p_keeps_what_is_at_least_min_p_times_the_best() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    selector = TokenSelector(1, 5)
    selector.assign(0, SamplingParams(do_sample=True, seed=5, min_p=0.3), [0])
    seen = {selector.select(probs.log(), [0]).ids[0] for _ in range(300)}
    assert seen == {0, 1, 2}  # 0.15 >= 0.3 * 0.4 > 0.1


def test_blocked_reductions_agree_with_torch() -> None:
    """`_argmax` (first index on ties), `_topk` (the same values) and `_logsumexp` over rows that
    split into blocks give what torch's own reductions give."""
    from handler.generation.sampling import _argmax, _block_max, _logsumexp, _topk

    chooser = torch.Generator().manual_seed(0)
    for vocab in (49_152, 128_256, 1_000):
        scores = torch.randn(6, vocab, generator=chooser)
        scores[1] = scores[1].round()  # many ties, the maximum among them
        scores[2, 5] = scores[2, vocab - 7] = scores[2].max() + 1  # a tie for the maximum
        scores[3] = float("-inf")
        scores[3, vocab - 1] = 0.0
        scores[4] = scores[4].to(torch.bfloat16).float()  # bf16 logits: ties everywhere
        assert torch.equal(_argmax(scores), scores.argmax(dim=-1))
        assert torch.equal(_argmax(scores, _block_max(scores)), scores.argmax(dim=-1))
        for k in (1, 50, 256):
            values, ids = _topk(scores, k)
            assert torch.equal(values, scores.topk(k, dim=-1).values)
            assert torch.equal(scores.gather(1, ids), values)
            assert all(len(set(row)) == k for row in ids.tolist())
        expected = torch.logsumexp(scores, dim=-1, keepdim=True)
        torch.testing.assert_close(_logsumexp(scores, _block_max(scores)), expected)
