"""Assemble a running generator from settings: find the model, load it, warm it up."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from handler.config import Settings
from handler.errors import ConfigError
from handler.generation.generator import Generator, eos_token_ids
from handler.generation.request import GenerationRequest
from handler.model import compiled
from handler.model.base import ModelBackend
from handler.model.resolve import ResolvedModel, choose_backend, resolve_model
from handler.model.threads import release_pool
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
    backend_name: str = "torch"
    model_sha: str | None = None
    """The hub commit the model was fetched at (`/info` `model_sha`); None for a local
    directory."""


def torch_device(requested: str) -> str:
    """`auto` means CUDA when available, else CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("SERVING_DEVICE=cuda but no CUDA device is available: use cpu or auto")
    return requested


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def torch_dtype(settings: Settings, device: str) -> str:
    """The auto-cast type; else bf16 on CUDA and on CPUs with native bf16 matrix units, as on
    Neuron, and fp32 on other CPUs (where bf16 is emulated and slower).

    On a 2-core AVX512-BF16 CPU, SmolLM2-135M decodes 2-3x faster in bf16 than in fp32
    (`make bench`); greedy answers match `transformers` in the same dtype (tests/test_bf16.py).
    """
    if settings.auto_cast_type:
        return settings.auto_cast_type
    if device != "cpu" or cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def assemble(
    settings: Settings,
    backend: ModelBackend,
    tokenizer_path: str | Path,
    *,
    model_id: str,
    backend_name: str,
    model_sha: str | None = None,
    start: bool = True,
    on_step: Callable[[str, int, float], None] | None = None,
) -> Engine:
    """Tokenizer, EOS ids and the generator around a loaded backend; starts the scheduler."""
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path, trust_remote_code=settings.trust_remote_code
    )
    try:
        generation_config = GenerationConfig.from_pretrained(tokenizer_path)
    except OSError:
        generation_config = None
    generator = Generator(
        backend,
        tokenizer,
        eos_token_ids=eos_token_ids(tokenizer, generation_config),
        max_concurrent_requests=settings.max_concurrent_requests,
        max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
        on_step=on_step,
        max_waiting_tokens=settings.max_waiting_tokens,
        waiting_served_ratio=settings.waiting_served_ratio,
        prefix_caching=settings.prefix_caching,
    )
    shape = backend.shape
    logger.info(
        "%s backend on %s (%s), %d slots of %d tokens, prompt prefix reuse %s",
        backend_name,
        shape.device,
        shape.dtype,
        shape.batch_size,
        shape.sequence_length,
        "on" if generator.prefix_caching else "off",
    )
    if start:
        generator.start()
    return Engine(
        settings,
        tokenizer,
        backend,
        generator,
        model_id,
        shape.device,
        shape.dtype,
        backend_name,
        model_sha,
    )


def build_torch_engine(
    settings: Settings,
    model_path: str | Path,
    start: bool = True,
    on_step: Callable[[str, int, float], None] | None = None,
    model_id: str | None = None,
    report: Callable[[str], None] = lambda stage: None,
    model_sha: str | None = None,
) -> Engine:
    """Load the model with the torch backend, compile its decode step (or load the compiled
    step from the cache) unless `torch_compile` is off, and start the scheduler thread.
    `model_id` and `model_sha` are what `/info` reports (default: the directory name, none)."""
    device = torch_device(settings.device)
    if settings.quantize and device != "cpu":
        raise ConfigError(
            f"QUANTIZE={settings.quantize} is the torch backend's on CPU, not {device}"
        )
    dtype = torch_dtype(settings, device)
    backend = TorchBackend.from_pretrained(
        model_path,
        batch_size=settings.max_batch_size,
        sequence_length=settings.max_total_tokens,
        dtype=dtype,
        device=device,
        trust_remote_code=settings.trust_remote_code,
    )
    if settings.torch_compile:
        report("compiling")
        spec = compiled.PackageSpec(
            str(Path(model_path).resolve()),
            dtype,
            device,
            settings.max_batch_size,
            settings.max_total_tokens,
            settings.quantize,
            "fused" if settings.fused_attention else "inductor",
        )
        root = compiled.compile_root(settings.compile_cache, settings.hub_cache)
        prepared = compiled.prepare(spec, root, backend.model.config)
        reason = prepared.reason
        if reason and settings.quantize:
            reason += f"; QUANTIZE={settings.quantize} quantizes the compiled step only: the "
            reason += f"weights stay {dtype}"
        backend.use_compiled(prepared.step, reason)
    else:
        backend.use_compiled(None, "the compiled step is off (TORCH_COMPILE=false)")
    if settings.prefix_caching:
        rows = settings.prefix_cache_rows
        backend.keep_prefixes(settings.max_batch_size if rows is None else rows)
    return assemble(
        settings,
        backend,
        model_path,
        model_id=model_id or Path(model_path).name,
        backend_name="torch",
        model_sha=model_sha,
        start=start,
        on_step=on_step,
    )


def build_neuron_engine(
    settings: Settings,
    model: ResolvedModel,
    report: Callable[[str], None],
    environ: Mapping[str, str],
    on_step: Callable[[str, int, float], None] | None = None,
) -> Engine:
    """Load an exported Neuron model, or export one (in a separate process), then serve it.

    The compiled shapes replace the settings' defaults (`Settings.with_compiled`); a setting
    that contradicts them stops start-up naming both values. `environ`: the process
    environment, which an export process inherits."""
    from handler.model import neuron_cores, neuron_loader
    from handler.model.neuron_backend import NeuronBackend

    cores = neuron_cores.available_cores(
        settings.neuron_rt_num_cores, settings.neuron_rt_visible_cores
    )
    # An exported model is loaded from the snapshot `resolve_model` fetched: optimum-neuron's
    # `load_weights` looks for pre-sharded weights (`checkpoint/`) in a local directory only, and
    # for a hub id without `checkpoint_id` raises "Checkpoint file not found". A standard hub
    # model is exported from its id (the export keeps a reference to its weights, not a copy).
    from_hub = model.revision is not None and not (model.path / "neuron_config.json").is_file()
    source = model.model_id if from_hub else model.path
    report("compiling")
    prepared = neuron_loader.prepare_neuron_model(
        settings,
        source,
        model.revision if from_hub else None,
        cores_available=cores,
        environ=environ,
        visible_cores_spec=settings.neuron_rt_visible_cores,
    )
    settings = settings.with_compiled(prepared.shape)
    report("loading")
    neuron_model = neuron_loader.load_neuron_model(
        prepared.model, revision=prepared.revision, token=settings.hf_token
    )
    return assemble(
        settings,
        NeuronBackend(neuron_model),
        model.path,
        model_id=model.model_id,
        backend_name="neuron",
        model_sha=model.revision,
        on_step=on_step,
    )


def warm_up(engine: Engine) -> None:
    """Run one prefill and one decode step so that the first request pays no lazy start-up."""
    token = engine.tokenizer.eos_token_id or 0
    warm = GenerationRequest([token], max_new_tokens=2, ignore_eos=True, request_id="warm-up")
    engine.generator.submit(warm).result(timeout=600)


def load_engine(
    settings: Settings,
    report: Callable[[str], None],
    on_step: Callable[[str, int, float], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Engine:
    """Resolve, load and warm up, reporting each stage (`downloading`, `compiling`, `loading`,
    `warming_up`) for the health checks.

    `settings` are the process's, read once; an exported model's compiled shapes are applied to
    them, not read again. `environ`: the process environment, for a Neuron export process.
    """
    report("downloading")
    model = resolve_model(settings)
    choice = choose_backend(settings)
    if choice.name == "neuron":
        engine = build_neuron_engine(settings, model, report, environ or {}, on_step)
    else:
        report("loading")
        engine = build_torch_engine(
            settings,
            model.path,
            on_step=on_step,
            model_id=model.model_id,
            report=report,
            model_sha=model.revision,
        )
    report("warming_up")
    warm_up(engine)
    # The scheduler thread runs the model from here on; this thread's OpenMP pool (from
    # loading) would slow its steps (`handler/model/threads.py`).
    release_pool()
    return engine
