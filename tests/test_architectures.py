"""Tiny random models of other architectures through prefill and decode, against `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from handler.generation.request import GenerationRequest
from tests.conftest import PROMPTS, reference_greedy, start_engine
from tests.tiny_models import TINY_ENGINE, tiny_model


@pytest.mark.parametrize("compile", ["eager", "compiled"])
@pytest.mark.parametrize("architecture", ["gpt2", "qwen2", "mistral", "llama"])
def test_tiny_model_matches_generate(
    architecture: str, compile: str, tmp_path: Path, tokenizer, compile_cache: Path
) -> None:
    """Each architecture through `transformers`' step and through the compiled step (GPT-2 is
    outside the compiled family: it falls back to `transformers`' step and says why)."""
    directory = tiny_model(compile_cache.parent, architecture, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    engine = start_engine(
        directory,
        **TINY_ENGINE,
        TORCH_COMPILE=str(compile == "compiled").lower(),
        TORCH_COMPILE_CACHE=str(compile_cache),
    )
    try:
        assert type(engine.backend.model).__name__ == type(model).__name__
        shape = engine.backend.shape
        if compile == "eager":
            assert shape.compiled_step is None
        elif architecture == "gpt2":
            assert shape.compiled_step is None and "gpt2" in (shape.eager_reason or "")
        else:
            assert shape.compiled_step is not None, shape.eager_reason
        jobs = [(tokenizer(p).input_ids, 10 + 3 * i) for i, p in enumerate(PROMPTS[:5])]
        expected = [reference_greedy(model, ids, n) for ids, n in jobs]
        handles = [engine.generator.submit(GenerationRequest(ids, n)) for ids, n in jobs]
        for handle, want in zip(handles, expected):
            tokens, _ = handle.result(timeout=120)
            assert [t.token.id for t in tokens] == want
    finally:
        engine.generator.stop()
