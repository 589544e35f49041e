"""The torch backend's slot cache: rows are independent and only named rows are computed."""

from __future__ import annotations

import pytest
import torch

from handler.model import torch_backend
from handler.model.torch_backend import TorchBackend
from tests.conftest import PROMPTS, reference_greedy

pytestmark = pytest.mark.slow


def test_insert_computes_only_new_rows_and_keeps_others(reference_model, tokenizer) -> None:
    backend = TorchBackend(reference_model, batch_size=4, sequence_length=256)
    shapes: list[tuple[int, ...]] = []
    hook = backend.decoder.embed_tokens.register_forward_hook(
        lambda module, args, output: shapes.append(tuple(args[0].shape))
    )
    try:
        prompts = [tokenizer(p).input_ids for p in PROMPTS[:3]]
        # Rows given out of order with a hole (row 1 stays empty).
        rows = [3, 0, 2]
        out = backend.prefill(prompts, rows)
        # The three prompts are packed end to end into one sequence: no padding is computed.
        assert shapes == [(1, sum(len(p) for p in prompts))]
        tokens = [[t] for t in out.logits.argmax(-1).tolist()]
        positions = [len(p) for p in prompts]
        late = tokenizer(PROMPTS[3]).input_ids
        late_tokens: list[int] = []
        for step in range(12):
            if step == 4:  # a request joins row 1 between decode steps
                shapes.clear()
                late_tokens = [int(backend.prefill([late], [1]).logits.argmax())]
                assert shapes == [(1, len(late))]  # nobody else's cache was recomputed
            ids = [t[-1] for t in tokens] + late_tokens[-1:]
            seq = rows + ([1] if late_tokens else [])
            pos = positions + ([len(late) + len(late_tokens) - 1] if late_tokens else [])
            logits = backend.decode(torch.tensor(ids), torch.tensor(pos), seq)
            assert shapes[-1][1] == 1
            chosen = logits.argmax(-1).tolist()
            for i in range(3):
                tokens[i].append(chosen[i])
                positions[i] += 1
            if late_tokens:
                late_tokens.append(chosen[3])
    finally:
        hook.remove()
    for prompt, got in zip(prompts, tokens):
        want = reference_greedy(reference_model, prompt, len(got))
        assert got[: len(want)] == want
    want = reference_greedy(reference_model, late, len(late_tokens))
    assert late_tokens[: len(want)] == want


def test_prompts_split_into_packs_match_reference(reference_model, tokenizer, monkeypatch) -> None:
    """Prompts beyond `PACK_TOKENS` go to further packs; a longer prompt runs alone."""
    monkeypatch.setattr(torch_backend, "PACK_TOKENS", 20)
    backend = TorchBackend(reference_model, batch_size=4, sequence_length=256)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:4]]
    lengths = [len(p) for p in prompts]
    shapes: list[tuple[int, ...]] = []
    hook = backend.decoder.embed_tokens.register_forward_hook(
        lambda module, args, output: shapes.append(tuple(args[0].shape))
    )
    try:
        out = backend.prefill(prompts, [2, 0, 3, 1], [False, True, False, False])
    finally:
        hook.remove()
    packs = torch_backend._packs(lengths, 20)
    assert len(packs) > 1 and any(len(pack) > 1 for pack in packs), (lengths, packs)
    assert shapes == [(1, sum(lengths[i] for i in pack)) for pack in packs]
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            want = reference_model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(out.logits[i], want[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            out.prompt_logits[1],
            reference_model(torch.tensor([prompts[1]])).logits[0],
            atol=1e-4,
            rtol=1e-4,
        )
    assert [x is None for x in out.prompt_logits] == [True, False, True, True]


def test_pack_bounds() -> None:
    assert torch_backend._packs([5, 5, 3, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    assert torch_backend._packs([], 10) == []
    assert torch_backend._bounds([3, 1, 2]) == [(0, 3), (3, 4), (4, 6)]


def test_prompt_logits_for_every_position(reference_model, tokenizer) -> None:
    backend = TorchBackend(reference_model, batch_size=2, sequence_length=128)
    short, long = tokenizer(PROMPTS[0]).input_ids, tokenizer(PROMPTS[4]).input_ids
    out = backend.prefill([short, long], [1, 0], [True, False])
    assert out.prompt_logits[1] is None
    with torch.inference_mode():
        want = reference_model(torch.tensor([short])).logits[0]
    assert out.prompt_logits[0].shape == (len(short), want.shape[-1])
    assert torch.allclose(out.prompt_logits[0], want, atol=1e-3)
    assert torch.allclose(out.logits[0], want[-1], atol=1e-3)


def test_slot_attention_equals_sdpa_with_grouped_heads() -> None:
    """The grouped-head path gives what `transformers`' `sdpa` gives after copying heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(4, 9, 1, 16, generator=generator)
    key, value = (torch.randn(4, 3, 40, 16, generator=generator) for _ in range(2))
    valid = torch.tensor([40, 7, 23, 1])
    allowed = torch.arange(40)[None, None, None, :] < valid[:, None, None, None]
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    got, _ = torch_backend.slot_sdpa_forward(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == (4, 1, 9, 16)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Row 3 sees only position 0: its output is that position's value, head by head.
    torch.testing.assert_close(got[3, 0], value[3, :, 0].repeat_interleave(3, dim=0))


def test_attention_groups_pad_at_most_twice() -> None:
    lengths = [5, 1, 12, 7, 30, 16, 2]
    groups = torch_backend._group_lengths(lengths)
    assert groups == [[4, 5], [2, 3], [0], [6, 1]]
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert all(2 * lengths[i] >= max(lengths[j] for j in group) for i in group)
    assert torch_backend._group_lengths([]) == []


@pytest.mark.parametrize("window", [None, 6])
def test_packed_prompts_attend_to_themselves_only(window: int | None) -> None:
    """The packed attention equals attending to each prompt alone, causally (and within the
    sliding window): padding inside a group and the other prompts are never seen."""
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    lengths = [5, 1, 12, 7, 30, 16, 2]
    bounds = torch_backend._bounds(lengths)
    groups = [
        torch_backend._prompt_group([bounds[i] for i in g], window, torch.float32, "cpu")
        for g in torch_backend._group_lengths(lengths)
    ]
    step = torch_backend._PrefillStep(segments=[(0, s, e - s) for s, e in bounds], groups=groups)
    generator = torch.Generator().manual_seed(0)
    total = sum(lengths)
    query = torch.randn(1, 9, total, 16, generator=generator)
    key, value = (torch.randn(1, 3, total, 16, generator=generator) for _ in range(2))
    got = torch_backend._packed_attention(module, query, key, value, step, scaling=0.25)
    assert got.shape == (1, total, 9, 16)
    for start, end in bounds:
        q = query[0, :, start:end].double()
        k, v = (t[0, :, start:end].double().repeat_interleave(3, dim=0) for t in (key, value))
        pos = torch.arange(end - start)
        allowed = pos[None, :] <= pos[:, None]
        if window is not None:
            allowed &= pos[None, :] > pos[:, None] - window
        scores = (q @ k.transpose(1, 2) * 0.25).masked_fill(~allowed, float("-inf"))
        want = (scores.softmax(-1) @ v).transpose(0, 1)  # [length, heads, head_dim]
        torch.testing.assert_close(got[0, start:end].double(), want, atol=1e-5, rtol=1e-5)


def test_a_mixed_step_decodes_and_prefills_in_one_forward(reference_model, tokenizer) -> None:
    """Rows 3, 0, 2 decode while a prompt joins row 1 in the same forward; every row then
    continues as `generate` does alone."""
    backend = TorchBackend(reference_model, batch_size=4, sequence_length=256)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:3]]
    rows = [3, 0, 2]
    tokens = [[t] for t in backend.prefill(prompts, rows).logits.argmax(-1).tolist()]
    positions = [len(p) for p in prompts]
    late = tokenizer(PROMPTS[4]).input_ids
    shapes: list[tuple[int, ...]] = []
    hook = backend.decoder.embed_tokens.register_forward_hook(
        lambda module, args, output: shapes.append(tuple(args[0].shape))
    )
    try:
        ids = torch.tensor([t[-1] for t in tokens])
        logits, output = backend.mixed(ids, torch.tensor(positions), rows, [late], [1], [True])
    finally:
        hook.remove()
    # One forward: the decode queries of rows 0..3 (row 1 a placeholder), then the prompt.
    assert shapes == [(1, 4 + len(late))]
    with torch.inference_mode():
        want = reference_model(torch.tensor([late])).logits[0]
    torch.testing.assert_close(output.prompt_logits[0], want, atol=1e-4, rtol=1e-4)
    late_tokens = [int(output.logits[0].argmax())]
    for i, chosen in enumerate(logits.argmax(-1).tolist()):
        tokens[i].append(chosen)
        positions[i] += 1
    for _ in range(8):
        ids = [t[-1] for t in tokens] + late_tokens[-1:]
        pos = [*positions, len(late) + len(late_tokens) - 1]
        chosen = backend.decode(torch.tensor(ids), torch.tensor(pos), [*rows, 1]).argmax(-1)
        for i in range(3):
            tokens[i].append(int(chosen[i]))
            positions[i] += 1
        late_tokens.append(int(chosen[3]))
    # The reference stops at EOS: compare up to there.
    for prompt, got in zip(prompts, tokens):
        want = reference_greedy(reference_model, prompt, len(got))
        assert got[: len(want)] == want
    want = reference_greedy(reference_model, late, len(late_tokens))
    assert late_tokens[: len(want)] == want
