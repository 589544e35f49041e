"""Shared fixtures: the bundled SmolLM2 model, a reference `transformers` model, engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from handler.config import read_settings
from handler.engine import Engine, build_torch_engine
from handler.testing.smollm2 import ensure_model

PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog and then",
    "1, 2, 3, 4,",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a five year old child in simple words, please:",
    "def fibonacci(n):",
    "日本の首都は",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reference_model(smollm2_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa").eval()


def start_engine(model_dir: Path, **env: str) -> Engine:
    environ = {"MAX_BATCH_SIZE": "4", "MAX_TOTAL_TOKENS": "512", **env}
    return build_torch_engine(read_settings([], environ), model_dir)


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Iterator[Engine]:
    """A running generator with 4 slots of 512 tokens on SmolLM2."""
    running = start_engine(smollm2_dir)
    yield running
    running.generator.stop()


def reference_greedy(
    model: AutoModelForCausalLM, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """`transformers` greedy generation for one prompt alone (stops at the model's EOS)."""
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
    return output[0, len(prompt_ids) :].tolist()
