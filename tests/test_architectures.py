"""Tiny random models of other architectures through prefill and decode, against `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from handler.generation.request import GenerationRequest
from tests.conftest import PROMPTS, reference_greedy, start_engine

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def configs(vocab_size: int) -> dict[str, PretrainedConfig]:
    common = {
        "vocab_size": vocab_size,
        "initializer_range": 0.5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return {
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common),
        "qwen2": Qwen2Config(**SMALL, **common),
        # A sliding window shorter than prompt + output exercises the windowed mask.
        "mistral": MistralConfig(**SMALL, sliding_window=12, **common),
        "llama": LlamaConfig(**SMALL, **common),
    }


@pytest.mark.parametrize("compile", ["eager", "compiled"])
@pytest.mark.parametrize("architecture", ["gpt2", "qwen2", "mistral", "llama"])
def test_tiny_model_matches_generate(
    architecture: str, compile: str, tmp_path: Path, tokenizer, compile_cache: Path
) -> None:
    """Each architecture through `transformers`' step and through the compiled step (GPT-2 is
    outside the compiled family: it falls back to `transformers`' step and says why)."""
    torch.manual_seed(0)
    config = configs(len(tokenizer))[architecture]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = 2
    # One directory per architecture, so that the compiled packages are found again next run
    # (their key holds the files' sizes and times).
    directory = compile_cache.parent / "tiny-models" / architecture
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    engine = start_engine(
        directory,
        MAX_BATCH_SIZE="3",
        MAX_TOTAL_TOKENS="64",
        MAX_INPUT_TOKENS="40",
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
