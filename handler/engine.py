"""Assemble a running generator from settings: find the model, load it, warm it up."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from handler.config import Settings
from handler.errors import ConfigError
from handler.generation.generator import Generator, eos_token_ids
from handler.generation.request import GenerationRequest
from handler.model.base import ModelBackend
from handler.model.torch_backend import TorchBackend

logger = logging.getLogger(__name__)


@dataclass
class Engine:
    settings: Settings
    tokenizer: PreTrainedTokenizerBase
    backend: ModelBackend
    generator: Generator
    model_id: str
    """What `/info` and `/v1/models` report: the configured id, else the directory name."""
    device: str
    dtype: str


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


def build_torch_engine(
    settings: Settings,
    model_path: str | Path,
    start: bool = True,
    on_step: Callable[[str, int, float], None] | None = None,
) -> Engine:
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
        on_step=on_step,
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
    model_id = settings.model_id or Path(model_path).name
    return Engine(settings, tokenizer, backend, generator, model_id, device, dtype)


def resolve_model(settings: Settings) -> Path:
    """The model directory: `--model-id` as a local directory or hub id, else the bundled
    SmolLM2 test model. Hub ids are downloaded (or found in the cache) with `huggingface_hub`."""
    if settings.model_id is None:
        from handler.testing.smollm2 import ensure_model

        return ensure_model()
    local = Path(settings.model_id)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                settings.model_id,
                revision=settings.revision,
                token=settings.hf_token,
                cache_dir=settings.hub_cache,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise ConfigError(
            f"Could not get model {settings.model_id!r} from the Hugging Face hub "
            f"({type(exc).__name__}): check the id, HF_TOKEN for gated models, and network access"
        ) from None


def warm_up(engine: Engine) -> None:
    """Run one prefill and one decode step so that the first request pays no lazy start-up."""
    token = engine.tokenizer.eos_token_id or 0
    warm = GenerationRequest([token], max_new_tokens=2, ignore_eos=True, request_id="warm-up")
    engine.generator.submit(warm).result(timeout=600)


def load_engine(
    settings: Settings,
    report: Callable[[str], None],
    on_step: Callable[[str, int, float], None] | None = None,
) -> Engine:
    """Resolve, load and warm up, reporting each stage (`downloading`, `loading`, `warming_up`)
    for the health checks."""
    report("downloading")
    path = resolve_model(settings)
    report("loading")
    engine = build_torch_engine(settings, path, on_step=on_step)
    report("warming_up")
    warm_up(engine)
    return engine
