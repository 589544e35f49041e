"""The torch backend's slot cache: rows are independent and only named rows are computed."""

from __future__ import annotations

import pytest
import torch

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
        assert shapes[-1] == (3, max(len(p) for p in prompts))
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
