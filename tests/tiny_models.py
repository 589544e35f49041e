"""Tiny random models of other architectures (two layers, random weights, SmolLM2's tokenizer),
saved once per machine next to the compile cache: their compiled packages are found again on the
next run (a package's key holds the model files' sizes and times)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

TINY_ENGINE = {"MAX_BATCH_SIZE": "3", "MAX_TOTAL_TOKENS": "64", "MAX_INPUT_TOKENS": "40"}
"""The shape of the tiny models' engines (and of the packages `compile_cache` builds for them)."""

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


def tiny_model(root: Path, architecture: str, tokenizer, name: str | None = None) -> Path:
    """The directory of `architecture`'s tiny model (weights from seed 0) under `root`,
    `tiny-models/<name or architecture>`, saved there when missing."""
    directory = root / "tiny-models" / (name or architecture)
    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        config = configs(len(tokenizer))[architecture]
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model.generation_config.eos_token_id = 2
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory
