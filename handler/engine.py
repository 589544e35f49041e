"""Assemble a running generator from settings and a local model directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from handler.config import Settings
from handler.errors import ConfigError
from handler.generation.generator import Generator, eos_token_ids
from handler.model.base import ModelBackend
from handler.model.torch_backend import TorchBackend

logger = logging.getLogger(__name__)


@dataclass
class Engine:
    settings: Settings
    tokenizer: PreTrainedTokenizerBase
    backend: ModelBackend
    generator: Generator


def torch_device(requested: str) -> str:
    """`auto` means CUDA when available, else CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("SERVING_DEVICE=cuda but no CUDA device is available: use cpu or auto")
    return requested


def torch_dtype(settings: Settings, device: str) -> str:
    """The auto-cast type, else fp32 on CPU (exact reference numerics) and bf16 on CUDA."""
    return settings.auto_cast_type or ("fp32" if device == "cpu" else "bf16")


def build_torch_engine(settings: Settings, model_path: str | Path, start: bool = True) -> Engine:
    """Load tokenizer and model with the torch backend and start the scheduler thread."""
    device = torch_device(settings.device)
    dtype = torch_dtype(settings, device)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=settings.trust_remote_code
    )
    backend = TorchBackend.from_pretrained(
        model_path,
        batch_size=settings.max_batch_size,
        sequence_length=settings.max_total_tokens,
        dtype=dtype,
        device=device,
        trust_remote_code=settings.trust_remote_code,
    )
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation_config = None
    generator = Generator(
        backend,
        tokenizer,
        eos_token_ids=eos_token_ids(tokenizer, generation_config),
        max_concurrent_requests=settings.max_concurrent_requests,
        max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
    )
    logger.info(
        "torch backend on %s (%s), %d slots of %d tokens",
        device,
        dtype,
        settings.max_batch_size,
        settings.max_total_tokens,
    )
    if start:
        generator.start()
    return Engine(settings, tokenizer, backend, generator)
