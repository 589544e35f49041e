"""The torch backend's compiled decode step: a lean forward of the Llama family, compiled ahead of
time with inductor (AOTInductor) and cached on disk.

`transformers`' modelling code run op by op spends most of a small model's decode step between
its matrix products. The same step written as one graph (fused q/k/v and gate/up projections,
fp32 attention over the slot cache, no per-layer Python) and compiled by inductor with its weights
frozen (pre-packed for oneDNN's AMX/AVX-512 kernels on CPU) spends it in the products: the
figures are in `benchmarks/results/compile.md` and `e2e.md` (`make bench`).

Shapes. One graph serves every step: the batch rows `b` (slots `0 .. b-1`, the highest decoded
slot's included; rows not being decoded are padding) and the cache length `L` (keys before the
current token) are symbolic, `1 <= b <= slots` and `1 <= L < sequence_length`; everything else
(slots, sequence length, dtype, the weights) is fixed in the package. The graph reads the cache
and returns the new keys and values, `[layers, 2, b, kv_heads, head_dim]`; the backend writes
them with one indexed copy, so the compiled code mutates nothing.

Attention. On CPU the graph calls `cpu_ops`' C++ operator, in which each row reads only its own
cached keys; inductor's own loops (`LeanDecode._attend`, also CUDA's) run over the longest row's
length under a mask. Served at 32 clients on AMD EPYC the operator took the step from 52-56 to
42-45 ms (513 and 496 -> 667 and 618 tok/s, two A/B pairs).

With `QUANTIZE=int8` the products read weight-only int8 weights (one scale per output channel,
through aten's int8 kernel): half the weight bytes, but that kernel is no match for oneDNN's
pre-packed bf16 ones. SmolLM2 bf16 on AMD EPYC, bare step over 100 cached positions: 12.0 ms
against 13.5 at one row, 18.0 against 13.4 at 4, 51.4 against 25.5 at 16.

Packages are built in a child process (`python -m handler.model.compiled`) so that the server's
own process never holds the compiler's memory, and a compiler crash costs only the compiled path.
They are kept under `compile_root(settings)` by a key of everything the generated code depends
on; a restart loads the package in well under a second. Architectures outside the family, and
any failure to build or load, leave the backend on `transformers`' step (logged, and `/info`
says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch._inductor import aoti_load_package

from handler.model import cpu_ops

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

FAMILY = ("llama", "mistral", "qwen2")
"""`model_type`s whose decoder layer is the one written here (Llama's, with optional biases)."""

PACKAGE_FORMAT = 2
"""Bump when the graph's inputs or outputs change (the source hash covers the rest)."""

BUILD_TIMEOUT = 1800.0
"""Seconds a package build may take before the backend gives up and runs eager."""


def uncovered(config: Any) -> str | None:
    """Why the compiled step cannot run this model (None: it can)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY:
        return f"architecture {model_type!r} is not in the compiled family {', '.join(FAMILY)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the compiled step has silu)"
    kinds = set(getattr(config, "layer_types", None) or [])
    if len(kinds) > 1:
        return "layers with different attention windows"
    return None


def _sliding_window(config: Any) -> int | None:
    """The window every layer attends through, or None."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    return window if kinds == {"sliding_attention"} else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in fp32, the scale applied in the input's type."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, -1)
    return torch.cat([-b, a], -1)


def _frozen(*parts: torch.Tensor) -> torch.nn.Parameter:
    """`parts` (concatenated when several: one product instead of each) as a frozen parameter."""
    t = parts[0] if len(parts) == 1 else torch.cat([p.detach() for p in parts])
    return torch.nn.Parameter(t.detach(), requires_grad=False)


def _frozen_bias(*parts: torch.Tensor | None) -> torch.nn.Parameter | None:
    """`_frozen(*parts)` of biases, or None where any of them is None."""
    present = [p for p in parts if p is not None]
    return _frozen(*present) if len(present) == len(parts) else None


def _weights(
    quantize: str | None, *parts: torch.Tensor
) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None]:
    """A linear's weight `[out, in]` (`parts` concatenated) and, quantized to int8, its scales
    `[out]` in the weight's dtype: `weight ~ int8 * scale[:, None]`, symmetric per output
    channel. Without `quantize`: the weight as it is and None."""
    weight = _frozen(*parts)
    if quantize is None:
        return weight, None
    w = weight.detach().float()
    # The scale in the weight's dtype first, so that the int8 values round against the scale
    # the product multiplies by.
    scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(weight.dtype).tiny).to(weight.dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return _frozen(q), _frozen(scale)


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x [n, in] @ weight.T (+ bias)`; an int8 weight (`scale` given) through aten's weight-only
    int8 product (dequantized inside the kernel)."""
    if scale is None:
        return F.linear(x, weight, bias)
    y = torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    return y if bias is None else y + bias


class _LeanLayer(torch.nn.Module):
    """One decoder layer's weights, q/k/v and gate/up concatenated; biases are None where the
    model has none, scales are None unless the weights are int8 (`_weights`)."""

    qkv: torch.nn.Parameter
    qkv_scale: torch.nn.Parameter | None
    qkv_bias: torch.nn.Parameter | None
    o: torch.nn.Parameter
    o_scale: torch.nn.Parameter | None
    o_bias: torch.nn.Parameter | None
    gate_up: torch.nn.Parameter
    gate_up_scale: torch.nn.Parameter | None
    gate_up_bias: torch.nn.Parameter | None
    down: torch.nn.Parameter
    down_scale: torch.nn.Parameter | None
    down_bias: torch.nn.Parameter | None
    norm1: torch.nn.Parameter
    norm2: torch.nn.Parameter


class LeanDecode(torch.nn.Module):
    """One decode step of a Llama-family decoder over a slot KV cache, as one traceable graph.

    The weights are the model's own, with q/k/v and gate/up concatenated (one product each).
    """

    cos: torch.Tensor
    """`[sequence_length, head_dim]` fp32 rotary tables (buffers)."""
    sin: torch.Tensor

    def __init__(
        self,
        model: PreTrainedModel,
        sequence_length: int,
        quantize: str | None = None,
        attention: str = "inductor",
    ) -> None:
        """`sequence_length`: positions per cache row (the rotary tables' length); `quantize`:
        `int8` for weight-only int8 products (the embedding table stays as it is);
        `attention`: `fused` for the C++ operator of `cpu_ops` (loaded first), `inductor` for
        the masked attention written here."""
        super().__init__()
        config = model.config
        self.fused = attention == "fused"
        self.window: int = _sliding_window(config) or 0
        decoder = model.model
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps: float = config.rms_norm_eps
        self.intermediate: int = config.intermediate_size
        self.scaling = self.head_dim**-0.5
        self.embed = _frozen(decoder.embed_tokens.weight)
        self.norm = _frozen(decoder.norm.weight)
        self.head, self.head_scale = _weights(quantize, model.get_output_embeddings().weight)
        self.layers = torch.nn.ModuleList()
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            lean = _LeanLayer()
            lean.qkv, lean.qkv_scale = _weights(
                quantize, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
            )
            lean.qkv_bias = _frozen_bias(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
            lean.o, lean.o_scale = _weights(quantize, attn.o_proj.weight)
            lean.o_bias = _frozen_bias(attn.o_proj.bias)
            lean.gate_up, lean.gate_up_scale = _weights(
                quantize, mlp.gate_proj.weight, mlp.up_proj.weight
            )
            lean.gate_up_bias = _frozen_bias(mlp.gate_proj.bias, mlp.up_proj.bias)
            lean.down, lean.down_scale = _weights(quantize, mlp.down_proj.weight)
            lean.down_bias = _frozen_bias(mlp.down_proj.bias)
            lean.norm1 = _frozen(layer.input_layernorm.weight)
            lean.norm2 = _frozen(layer.post_attention_layernorm.weight)
            self.layers.append(lean)
        # The model's own rotary embedding (any rope scaling), for every position, in fp32.
        positions = torch.arange(sequence_length)
        probe = torch.zeros(1, dtype=torch.float32, device=self.embed.device)
        with torch.no_grad():
            cos, sin = decoder.rotary_emb(probe, positions[None].to(probe.device))
        self.register_buffer("cos", cos[0].float(), persistent=False)
        self.register_buffer("sin", sin[0].float(), persistent=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, positions `[b]`; mask `[b, L]` additive fp32 over each row's cached keys
        (0 where the row attends, -inf elsewhere); cache `[layers, 2, slots, kv_heads, S,
        head_dim]` -> logits `[b, vocab]` in the model's dtype and the step's keys and values
        `[layers, 2, b, kv_heads, head_dim]` (the caller stores them at `positions`).

        The logits stay in the model's dtype: widening them is exact, and the caller does it on
        the rows it keeps, in 0.14 ms at 32 rows of SmolLM2 on CPU, where the graph's own copy
        cost 0.7 ms of the step and the caller's gather of fp32 rows 1.0 ms more."""
        b, length = tokens.shape[0], mask.shape[1]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions][:, None, :].to(x.dtype)  # [b, 1, head_dim]
        sin = self.sin[positions][:, None, :].to(x.dtype)
        new: list[torch.Tensor] = []
        for i, layer in enumerate(cast("Iterable[_LeanLayer]", self.layers)):
            h = _rms_norm(x, layer.norm1, self.eps)
            qkv = _linear(h, layer.qkv, layer.qkv_scale, layer.qkv_bias)
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
            q = q.view(b, heads, head_dim)
            k = k.view(b, kv_heads, head_dim)
            v = v.view(b, kv_heads, head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new.append(torch.stack([k, v]))
            if self.fused:
                attended = torch.ops.hfns.decode_attention(
                    q, k, v, cache, i, positions, self.window, self.scaling
                ).reshape(b, heads * head_dim)
            else:
                keys = cache[i, 0, :b, :, :length]  # [b, kv_heads, L, head_dim]
                values = cache[i, 1, :b, :, :length]
                attended = self._attend(q, k, v, keys, values, mask)
            x = x + _linear(attended, layer.o, layer.o_scale, layer.o_bias)
            h = _rms_norm(x, layer.norm2, self.eps)
            gate, up = _linear(h, layer.gate_up, layer.gate_up_scale, layer.gate_up_bias).split(
                [self.intermediate, self.intermediate], -1
            )
            x = x + _linear(F.silu(gate) * up, layer.down, layer.down_scale, layer.down_bias)
        x = _rms_norm(x, self.norm, self.eps)
        return _linear(x, self.head, self.head_scale), torch.stack(new)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention in fp32 over a row's cached keys and its current one (not stored yet):
        softmax over [cached..., current]. q `[b, heads, head_dim]`; k and v `[b, kv_heads,
        head_dim]`, the step's own; keys and values `[b, kv_heads, L, head_dim]`, the cached
        ones; mask `[b, L]` additive -> `[b, heads * head_dim]`.

        Written as products and sums rather than matrix products: inductor fuses each into one
        loop that reads the cache in its own type, several times faster than a batched product
        over a few rows (and the way on CUDA; on CPU `cpu_ops`' operator is faster still)."""
        b, kv_heads, head_dim = q.shape[0], self.kv_heads, self.head_dim
        group = self.heads // kv_heads
        qg = q.view(b, kv_heads, group, head_dim).float() * self.scaling
        bias = mask[:, None, None, :]  # [b, 1, 1, L]
        scores = (qg[:, :, :, None, :] * keys[:, :, None].float()).sum(-1) + bias
        own = (qg * k.float()[:, :, None, :]).sum(-1, keepdim=True)  # [b, kv_heads, group, 1]
        top = torch.maximum(scores.amax(-1, keepdim=True), own)
        weights, own_weight = (scores - top).exp(), (own - top).exp()
        total = weights.sum(-1, keepdim=True) + own_weight
        mixed = (weights[..., None] * values[:, :, None].float()).sum(-2)
        out = (mixed + own_weight * v.float()[:, :, None, :]) / total
        return out.to(q.dtype).reshape(b, self.heads * head_dim)


def decode_mask(
    positions: torch.Tensor, length: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """Additive fp32 `[b, length]`: row r attends to the cached keys before `positions[r]` (and
    inside the window)."""
    keys = torch.arange(length, device=device)[None, :]
    query = positions[:, None]
    allowed = keys < query
    if sliding_window is not None:
        allowed &= keys > query - sliding_window
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


@dataclass(frozen=True)
class PackageSpec:
    """Everything a package's generated code depends on."""

    model_path: str
    dtype: str
    device: str
    slots: int
    sequence_length: int
    quantize: str | None = None
    """`int8`: weight-only int8 products (`LeanDecode`)."""
    attention: str = "inductor"
    """`fused`: `cpu_ops`' operator, where it serves the model (`prepare` falls back to
    `inductor`, the graph's own masked attention, elsewhere)."""

    def key(self) -> str:
        """Directory name under the compile root: the model's fingerprint and the spec."""
        digest = hashlib.sha256()
        for part in (
            PACKAGE_FORMAT,
            Path(__file__).read_bytes(),
            torch.__version__,
            _transformers_version(),
            _model_fingerprint(Path(self.model_path)),
            self.dtype,
            self.device,
            self.slots,
            self.sequence_length,
            self.quantize,
            _isa(self.device),
            self.attention,
            cpu_ops.SOURCE.read_bytes() if self.attention == "fused" else b"",
        ):
            digest.update(repr(part).encode() if not isinstance(part, bytes) else part)
        name = Path(self.model_path).name or "model"
        weights = f"{self.dtype}-{self.quantize}" if self.quantize else self.dtype
        if self.attention == "fused":
            weights += "-fused"
        return f"{name}-{weights}-{self.slots}x{self.sequence_length}-{digest.hexdigest()[:16]}"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _model_fingerprint(path: Path) -> str:
    """Changes when the directory's files (names, sizes, times) or its config change."""
    digest = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            if entry.is_file():
                stat = entry.stat()
                digest.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _isa(device: str) -> str:
    """The instruction set the generated code targets."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
    amx = torch.cpu._is_amx_tile_supported()
    return f"{torch.backends.cpu.get_cpu_capability()}{'+amx' if amx else ''}"


def build_package(spec: PackageSpec, out: Path) -> None:
    """Export the lean step of the model at `spec.model_path` and compile it to `out`."""
    from transformers import AutoModelForCausalLM

    from handler.model.torch_backend import TORCH_DTYPES

    dtype = TORCH_DTYPES[spec.dtype]
    # The ignore: `transformers` wraps `to` with `functools.wraps`, whose type hides the bound
    # `self` from mypy (it reads the device as `self`).
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype)
    model = model.to(spec.device)  # type: ignore[arg-type]
    reason = uncovered(model.config)
    if reason:
        raise ValueError(reason)
    if spec.attention == "fused" and not hasattr(torch.ops.hfns, "decode_attention"):
        raise RuntimeError(f"{cpu_ops.OPERATOR} is not loaded (cpu_ops.load)")
    step = LeanDecode(model.eval(), spec.sequence_length, spec.quantize, spec.attention).eval()
    del model
    cache = torch.zeros(
        (len(step.layers), 2, spec.slots, step.kv_heads, spec.sequence_length, step.head_dim),
        dtype=dtype,
        device=spec.device,
    )
    b = min(3, spec.slots)
    length = min(17, spec.sequence_length - 1)
    example = (
        torch.zeros(b, dtype=torch.long, device=spec.device),
        torch.full((b,), length, dtype=torch.long, device=spec.device),
        torch.zeros(b, length, device=spec.device),
        cache,
    )
    rows = torch.export.Dim("rows", min=1, max=spec.slots) if spec.slots > 1 else None
    keys = torch.export.Dim("keys", min=1, max=spec.sequence_length - 1)
    dims = (
        ({0: rows}, {0: rows}, {0: rows, 1: keys}, None) if rows else (None, None, {1: keys}, None)
    )
    with torch.inference_mode():
        program = torch.export.export(step, example, dynamic_shapes=dims)
        # Inside inference mode: inductor freezes the weights (and pre-packs them for oneDNN)
        # only where gradients are off; outside it the products run unpacked, about half as fast.
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(out), inductor_configs={"freezing": True}
        )


class CompiledDecode:
    """A loaded package: `__call__(tokens, positions, mask, cache)` as `LeanDecode.forward`."""

    def __init__(self, package: Path, spec: PackageSpec) -> None:
        self.package = package
        self.spec = spec
        before = _mapped_libraries()
        self._run = aoti_load_package(str(package))
        self.libraries = _mapped_libraries() - before
        """The shared libraries loading the package mapped (its generated code)."""
        self.released = _release_constant_pages(self.libraries)
        """Bytes of those libraries' pages dropped after the load (`_release_constant_pages`)."""
        if spec.device == "cpu":
            _remove_extraction(self.libraries)
        logger.info("released %.0f MiB of the step's library pages", self.released / 2**20)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, new = self._run(tokens, positions, mask, cache)
        return logits, new


def _mapped_libraries() -> set[str]:
    """Paths of the shared libraries this process maps (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split(maxsplit=5)[5] for line in lines if line.endswith(".so")}


def _release_constant_pages(libraries: set[str]) -> int:
    """Drop the resident pages of `libraries`' large read-only mappings; return the bytes.

    AOTInductor copies a package's weights out of its shared library into tensors when it loads
    it, and the library's pages that held them stay resident (as much again as the weights)
    though they are never read again. A clean private file mapping can always be dropped: a
    page read later is read from the file again. Mappings with modified (anonymous) pages, such
    as relocated data, are left alone."""
    if not libraries or not sys.platform.startswith("linux"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madv_dontneed = 4
    released = 0
    mapping: tuple[int, int, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            writable_or_exec = fields[1][1] == "w" or fields[1][2] == "x"
            keep = path not in libraries or writable_or_exec or end - start < 2**20
            mapping = None if keep else (start, end, path)
        elif fields[0] == "Anonymous:" and mapping is not None and fields[1] == "0":
            start, end, _ = mapping
            if (
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), madv_dontneed)
                == 0
            ):
                released += end - start
            mapping = None
    return released


def _remove_extraction(libraries: set[str]) -> None:
    """Delete the directory the loader extracted the package to (`aotinductor_*` in the
    temporary directory), once its libraries are mapped: they stay usable, and the loader would
    only delete it in its destructor, which a process killed, or exiting with the scheduler
    thread still holding the step, never runs. Each such start left a copy behind (315 MB for
    SmolLM2 in bf16, 625 in fp32): 35 GB in /tmp after a day of tests and benchmarks here. CPU
    only: on CUDA the kernels' binaries are read from there at their first launch."""
    for library in libraries:
        for parent in Path(library).parents:
            if parent.name.startswith("aotinductor_"):
                shutil.rmtree(parent, ignore_errors=True)
                break


def compile_root(compile_cache: str | None, hub_cache: str | None) -> Path:
    """Where packages are kept: the `compile_cache` setting, else `compiled-steps` in the hub
    cache (`/data` in the image), else in `~/.cache/huggingface/hub`."""
    if compile_cache:
        return Path(compile_cache)
    root = Path(hub_cache) if hub_cache else Path.home() / ".cache" / "huggingface" / "hub"
    return root / "compiled-steps"


@dataclass(frozen=True)
class Prepared:
    """The outcome of `prepare`: a loaded step, or why the backend stays eager."""

    step: CompiledDecode | None
    reason: str | None = None
    built_seconds: float | None = None
    """Seconds spent building the package at this start (None: it was on disk)."""


def package_for(
    spec: PackageSpec, root: Path, config: Any
) -> tuple[PackageSpec, Path, float | None]:
    """The package for `spec` under `root`, built first (in a child process) when it is
    missing: the spec it serves (`_choose_attention` may fall back to inductor's attention), its
    path, and the seconds its build took (None: it was on disk). Raises where the build fails."""
    spec, ops = _choose_attention(spec, root, config)
    directory = root / spec.key()
    package = directory / "decode.pt2"
    if package.is_file():
        return spec, package, None
    started = time.monotonic()
    _build_in_child(spec, directory, package, ops)
    built = time.monotonic() - started
    logger.info("compiled the decode step in %.1f s: %s", built, package)
    return spec, package, built


def prepare(spec: PackageSpec, root: Path, config: Any) -> Prepared:
    """Load the package for `spec` from `root`, building it first (in a child process) when it
    is missing. Never raises: a failure is the reason the backend stays eager."""
    reason = uncovered(config)
    if reason:
        return Prepared(None, reason)
    built = None
    try:
        spec, package, built = package_for(spec, root, config)
        started = time.monotonic()
        step = CompiledDecode(package, spec)
        logger.info("loaded the compiled decode step in %.2f s", time.monotonic() - started)
        return Prepared(step, None, built)
    except Exception as exc:  # any failure leaves the eager step
        return Prepared(None, f"compiling the decode step failed: {exc}", built)


def _choose_attention(
    spec: PackageSpec, root: Path, config: Any
) -> tuple[PackageSpec, Path | None]:
    """For a `fused` spec: the spec and the library's path where `cpu_ops` serves the model
    here and its library builds and loads, else the spec with inductor's attention."""
    if spec.attention != "fused":
        return spec, None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    reason = cpu_ops.supported(head_dim, heads, kv_heads, spec.device)
    if reason is None:
        try:
            return spec, cpu_ops.ensure(root)
        except Exception as exc:  # the step keeps inductor's attention
            reason = str(exc)
    logger.warning("the compiled step attends with inductor's loops: %s", reason)
    return dataclasses.replace(spec, attention="inductor"), None


def _build_in_child(spec: PackageSpec, directory: Path, package: Path, ops: Path | None) -> None:
    """Build into a temporary file in `directory`, then rename: a package is whole or absent.
    `ops`: the operator library the child loads first (a `fused` spec)."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"decode.{os.getpid()}.partial.pt2"
    env = dict(os.environ)
    # Inductor's own cache (generated C++, compiled kernels) next to the packages.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory.parent / "inductor"))
    command = [
        sys.executable,
        "-m",
        "handler.model.compiled",
        "--spec",
        json.dumps(spec.__dict__),
        "--out",
        str(partial),
        *(["--ops", str(ops)] if ops else []),
    ]
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the build exited with {result.returncode}: {tail[0]}")
        partial.replace(package)
    finally:
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a compiled decode-step package.")
    parser.add_argument("--spec", required=True, help="PackageSpec fields as JSON")
    parser.add_argument("--out", required=True, help="package file to write")
    parser.add_argument("--ops", help="the cpu_ops library to load first")
    args = parser.parse_args(argv)
    if args.ops:
        cpu_ops.load(Path(args.ops))
    logging.basicConfig(level=logging.WARNING)
    # The build yields the cores to the serving process, whose health checks must stay answered.
    os.nice(10)
    build_package(PackageSpec(**json.loads(args.spec)), Path(args.out))


if __name__ == "__main__":
    main()
