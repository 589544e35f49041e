"""Torch implementation of `ModelBackend` on top of `transformers` causal LMs (CPU or CUDA).

The KV cache is a `transformers` `Cache` subclass with one static tensor per layer of shape
`[batch_size, kv_heads, sequence_length, head_dim]`. Writes go to each row's own positions; the
attention of a step covers only `max(filled length)` positions of the rows it runs, never the
capacity (a `StaticCache` attends to every position, several times slower on CPU).

A prefill packs its prompts end to end into one sequence, with positions restarting at each
prompt, instead of padding every prompt to the longest: the model's linear layers then compute
exactly the prompts' tokens (less than half the time of padded prompts of mixed lengths,
`benchmarks/results/engine.md`). Only the attention splits the pack again: prompts of similar
length are attended together, each padded at its end to the longest of its group and causal, so
that no `[T, T]` block-diagonal mask is built or attended through (about half the attention
time). Packs hold at most `PACK_TOKENS` tokens; a longer prompt runs
alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import threading
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from handler.model.base import ModelShape, PrefillOutput
from handler.model.compiled import CompiledDecode, decode_mask
from handler.model.params import SamplingParams

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

PACK_TOKENS = 512
"""Most prompt tokens one prefill forward packs together (unless a single prompt is longer)."""


@dataclass(frozen=True)
class _PromptGroup:
    """Packed prompts attended together, each padded at its end to the group's longest `L`:
    with a causal mask, a prompt's own positions never see the padding behind them."""

    index: torch.Tensor
    """`[g, L]` positions in the packed prompts; padding repeats the prompt's last position."""
    valid: torch.Tensor
    """`[g, L]` true on the prompts' own positions."""
    dest: torch.Tensor
    """`index[valid]`: where the group's outputs go back in the pack."""
    mask: torch.Tensor | None
    """Additive `[1, 1, L, L]` causal sliding-window mask; None: plain causal."""


@dataclass(frozen=True)
class _PrefillStep:
    """Prompts packed end to end in one sequence."""

    segments: list[tuple[int, int, int]]
    """`(row, start, length)` of each prompt packed in the sequence."""
    groups: list[_PromptGroup]
    """How the attention splits the packed prompts (see `_group_lengths`)."""


@dataclass(frozen=True)
class _DecodeStep:
    """A batch of one query per row over a contiguous slice of rows."""

    rows: slice
    """The contiguous slice of rows the queries cover."""
    write_rows: torch.Tensor
    """`[n]` row indices to write, `write_pos`: `[n]` their positions."""
    write_pos: torch.Tensor
    kv_len: int
    """Number of cached positions the attention covers."""
    mask: torch.Tensor | None
    """Additive `[n, 1, 1, kv_len]` mask of the queries over their rows; None: the rows are
    uniform (dense, same position) and `transformers` builds the causal mask itself."""

    def store(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        new_keys: torch.Tensor,
        new_values: torch.Tensor,
    ) -> None:
        """Write the queries' states `[n, kv_heads, head_dim]` into a layer's cache at each
        row's position."""
        keys[self.write_rows, :, self.write_pos] = new_keys.to(keys.dtype)
        values[self.write_rows, :, self.write_pos] = new_values.to(values.dtype)


@dataclass(frozen=True)
class _MixedStep:
    """One sequence holding the decode queries of `decode.rows` first, then the packed prompts
    of `prefill`."""

    decode: _DecodeStep
    prefill: _PrefillStep
    cache: SlotKVCache
    """The cache whose rows the decode queries attend to."""


@dataclass(frozen=True)
class _ExtendStep:
    """One prompt's tokens from `start` on, in row `row`, whose positions before `start` the row
    already holds: they attend to those and, causally, to each other."""

    row: int
    start: int
    length: int


_Step = _PrefillStep | _DecodeStep | _MixedStep | _ExtendStep
"""How the current forward call maps onto cache rows and positions."""


_active = threading.local()
"""`_active.step`: the packed prefill or mixed step the calling thread's forward is running, for
the attention."""


def _bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """`(start, end)` of each of `lengths` laid end to end."""
    ends = list(accumulate(lengths))
    return [(end - n, end) for n, end in zip(lengths, ends)]


def _packs(lengths: list[int], limit: int) -> list[list[int]]:
    """Split prompt indices, in order, into packs of at most `limit` tokens (or one prompt)."""
    packs: list[list[int]] = []
    size = limit
    for i, n in enumerate(lengths):
        if size + n > limit:
            packs.append([])
            size = 0
        packs[-1].append(i)
        size += n
    return packs


def _group_lengths(lengths: list[int]) -> list[list[int]]:
    """Split prompt indices into attention groups, longest first: a prompt joins the current
    group while it is at least half as long as the group's longest, so padding at most doubles
    a group's rows (and the attention of the short prompts is not paid at the long one's
    square)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and 2 * lengths[i] >= lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive float mask of boolean `allowed` (works with the sdpa and eager attention)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def _prompt_group(
    bounds: list[tuple[int, int]],
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> _PromptGroup:
    """The attention group of the packed prompts at `bounds` (`(start, end)` each)."""
    longest = max(end - start for start, end in bounds)
    steps = torch.arange(longest)
    index = torch.stack([(start + steps).clamp(max=end - 1) for start, end in bounds])
    valid = torch.stack([steps < end - start for start, end in bounds])
    mask = None
    if sliding_window is not None and longest > sliding_window:
        allowed = (steps[None, :] <= steps[:, None]) & (
            steps[None, :] > steps[:, None] - sliding_window
        )
        mask = _additive(allowed[None, None].to(device), dtype)
    index, valid = index.to(device), valid.to(device)
    return _PromptGroup(index=index, valid=valid, dest=index[valid], mask=mask)


SLOT_ATTENTION = "slot_sdpa"
"""`sdpa`, with two CPU paths that `transformers`' own `sdpa` does not take (see below)."""


def slot_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query `[n, heads, q, head_dim]`, key/value `[n, kv_heads, k, head_dim]` -> `[n, q, heads,
    head_dim]`. On CPU:

    - Grouped heads stay grouped. With a mask, `transformers`' `sdpa` copies every key/value
      head `heads / kv_heads` times before attention (its GQA path is for masks of None only, the
      CUDA kernels' limit); the CPU kernel takes grouped heads and a mask directly, in half the
      time, with the same result.
    - A bf16/fp16 decode step (one query per row) attends in fp32. The CPU kernel's reduced
      precision path is slow for a single query (several times the upcast path's time, most of
      a 16-row step on 2 cores). The kernel
      computes scores and softmax in fp32 anyway; only its rounding of the probabilities to bf16
      before the value product differs (outputs within one bf16 step; greedy answers equal
      `transformers` in bf16, tests/test_bf16.py).

    Elsewhere this is `sdpa` unchanged.
    """
    step: _PrefillStep | _MixedStep | None = getattr(_active, "step", None)
    if step is not None:
        return _packed_attention(module, query, key, value, step, scaling), None
    if query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    upcast = query.dtype != torch.float32 and query.shape[2] == 1
    if not upcast and (attention_mask is None or not grouped):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    return _attend(query, key, value, mask, scaling, grouped).transpose(1, 2).contiguous(), None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    grouped: bool,
) -> torch.Tensor:
    """`sdpa` over `[n, heads, q, head_dim]` queries, grouped key/value heads kept grouped, a
    single query in reduced precision on CPU computed in fp32; no mask means causal."""
    dtype = query.dtype
    if query.device.type == "cpu" and dtype != torch.float32 and query.shape[2] == 1:
        query, key, value = query.float(), key.float(), value.float()
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=mask is None and query.shape[2] > 1,
        scale=scaling,
        enable_gqa=grouped,
    )
    return out.to(dtype)


def _packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: _PrefillStep | _MixedStep,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of a packed prefill or mixed step: query/key/value `[1, heads, n + T, head_dim]`
    hold `n` decode queries (mixed steps only), then `T` packed prompt tokens ->
    `[1, n + T, heads, head_dim]`. Each decode query attends to its own cache row, each prompt
    token to its own prompt."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    heads, total, head_dim = query.shape[1:]
    out = query.new_empty(total, heads, head_dim)
    if isinstance(step, _MixedStep):
        decode, prefill = step.decode, step.prefill
        n = decode.rows.stop - decode.rows.start
        # `transformers`' attention modules hold their layer's index.
        keys, values = step.cache.stored(cast(int, module.layer_idx))
        decoded = _attend(
            query[0, :, :n].transpose(0, 1)[:, :, None],
            keys[decode.rows, :, : decode.kv_len],
            values[decode.rows, :, : decode.kv_len],
            decode.mask,
            scaling,
            grouped,
        )  # [n, heads, 1, head_dim]
        out[:n] = decoded[:, :, 0]
    else:
        prefill, n = step, 0
    query, key, value = (t[0, :, n:] for t in (query, key, value))  # [heads, T, head_dim]
    for group in prefill.groups:
        group_query, group_key, group_value = (
            t[:, group.index].transpose(0, 1) for t in (query, key, value)
        )
        attended = _attend(
            group_query, group_key, group_value, group.mask, scaling, grouped
        )  # [g, heads, L, head_dim]
        out[n:][group.dest] = attended.transpose(1, 2)[group.valid]
    return out[None]


AttentionInterface.register(SLOT_ATTENTION, slot_sdpa_forward)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose memory, on CPU, is committed page by page as it is first written: an
    anonymous mapping reads as zeros without being touched, so a slot cache sized for every slot's
    longest sequence costs only the positions requests have reached (as llama.cpp's does)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # The tensor keeps the mapping alive (`frombuffer` holds a reference to it).
    return (
        torch.frombuffer(
            mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8
        )
        .view(dtype)
        .view(shape)
    )


class SlotKVCache(Cache):
    """Static per-slot KV storage that attends only to the filled prefix of the rows in a step."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        sequence_length: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: the storage type (default: the model's states' type)."""
        super().__init__(layers=[])
        self.dtype = dtype
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.step: _Step | None = None

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        shape = (self.batch_size, like.shape[1], self.sequence_length, like.shape[3])
        dtype = self.dtype or like.dtype
        self.keys[layer_idx] = torch.zeros(shape, dtype=dtype, device=like.device)
        self.values[layer_idx] = torch.zeros(shape, dtype=dtype, device=like.device)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `[n, kv_heads, q, head_dim]` states; return what this layer's attention reads."""
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states)
        keys, values = self.stored(layer_idx)
        step = self.step
        assert step is not None, "the cache is written only inside a `TorchBackend` step"
        if isinstance(step, _DecodeStep):
            step.store(keys, values, key_states[:, :, 0], value_states[:, :, 0])
            return keys[step.rows, :, : step.kv_len], values[step.rows, :, : step.kv_len]
        if isinstance(step, _ExtendStep):
            end = step.start + step.length
            keys[step.row, :, step.start : end] = key_states[0].to(keys.dtype)
            values[step.row, :, step.start : end] = value_states[0].to(values.dtype)
            held = slice(step.row, step.row + 1)
            return (
                keys[held, :, :end].to(key_states.dtype),
                values[held, :, :end].to(value_states.dtype),
            )
        prefill = step.prefill if isinstance(step, _MixedStep) else step
        # Packed prompts attend only to themselves: their states are stored, never read back.
        for row, start, length in prefill.segments:
            keys[row, :, :length] = key_states[0, :, start : start + length]
            values[row, :, :length] = value_states[0, :, start : start + length]
        if isinstance(step, _MixedStep):
            # The decode queries are the sequence's first positions; the mixed attention reads
            # their rows itself.
            n = step.decode.rows.stop - step.decode.rows.start
            new_keys, new_values = (s[0, :, :n].transpose(0, 1) for s in (key_states, value_states))
            step.decode.store(keys, values, new_keys, new_values)
        return key_states, value_states

    def stored(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values `[batch_size, kv_heads, sequence_length, head_dim]`
        (allocated by its first `update`, which runs before its attention)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        assert keys is not None and values is not None, f"layer {layer_idx} has stored nothing"
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if isinstance(self.step, _ExtendStep):
            return self.step.start
        return self.step.kv_len - 1 if isinstance(self.step, _DecodeStep) else 0

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        if isinstance(self.step, _DecodeStep):
            return self.step.kv_len, 0
        if isinstance(self.step, _ExtendStep):
            return self.step.start + self.step.length, 0
        return cache_position.shape[0], 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.sequence_length

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.num_layers


class TorchBackend:
    """`ModelBackend` for a `transformers` causal LM with a `SlotKVCache`."""

    def __init__(self, model: PreTrainedModel, batch_size: int, sequence_length: int) -> None:
        self.model = model.eval()
        # Packed prompts and mixed steps need the slot attention, which extends `sdpa`; under
        # any other attention each prompt runs alone and prefills never join a decode step.
        self.packed = model.config._attn_implementation in ("sdpa", SLOT_ATTENTION)
        if self.packed:
            model.set_attn_implementation(SLOT_ATTENTION)
        config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        num_layers = config.num_hidden_layers
        # bf16/fp16 decode attends in fp32 on CPU (see `slot_sdpa_forward`): a cache stored in
        # fp32 (exact: the states are converted, not rounded) spares converting every row's keys
        # and values at every layer of every step (449 against 307 us per layer at batch 16
        # over 209 positions), at twice the cache's memory.
        reduced = self.dtype != torch.float32 and self.device.type == "cpu"
        self.kv_dtype = torch.float32 if reduced else self.dtype
        self.cache = SlotKVCache(num_layers, batch_size, sequence_length, self.kv_dtype)
        window = getattr(config, "sliding_window", None)
        self.sliding_window: int | None = (
            window if window and getattr(config, "use_sliding_window", True) else None
        )
        self.compiled: CompiledDecode | None = None
        self.store: torch.Tensor | None = None
        """The `prefix_rows` (`keep_prefixes`), `[layers, 2, rows, kv_heads, S, head_dim]` in
        the cache's dtype, allocated at their first use."""
        self.kv: torch.Tensor | None = None
        """With the compiled step: the whole cache, `[layers, 2, slots, kv_heads, S,
        head_dim]`, whose layers are the `SlotKVCache`'s tensors."""
        self.shape = ModelShape(
            batch_size=batch_size,
            sequence_length=sequence_length,
            vocab_size=self.lm_head.weight.shape[0],
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
            mixed_steps=self.packed,
            prefix_reuse=True,
        )

    def use_compiled(self, step: CompiledDecode | None, reason: str | None = None) -> None:
        """Decode with `step` (a package built for this model, slots and length), or stay on
        `transformers`' step and say why. Call before the first forward.

        The compiled step attends in fp32 inside its graph, so the cache keeps the model's
        dtype (half the memory of the eager step's fp32 cache under bf16 on CPU). Prefills stay
        on `transformers`' packed forward, writing the same cache; mixed steps are off (a
        prefill then runs between two compiled decode steps)."""
        if step is None:
            logger.warning("decode runs eagerly (transformers' modelling code): %s", reason)
            self.shape = dataclasses.replace(self.shape, eager_reason=reason)
            return
        self.cache.dtype = self.kv_dtype = self.dtype
        self.kv = self._rows_tensor(self.cache.batch_size)
        self.cache.keys = list(self.kv[:, 0].unbind(0))
        self.cache.values = list(self.kv[:, 1].unbind(0))
        self.compiled = step
        self.shape = dataclasses.replace(
            self.shape,
            kv_cache_dtype=str(self.dtype).removeprefix("torch."),
            mixed_steps=False,
            compiled_step="inductor (AOT)"
            + (", fused attention" if step.spec.attention == "fused" else "")
            + (f", {step.spec.quantize} weights" if step.spec.quantize else ""),
            eager_reason=None,
        )
        logger.info("decode runs the compiled step (%s)", step.package)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        batch_size: int,
        sequence_length: int,
        dtype: str = "fp32",
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> TorchBackend:
        """Load weights from a local model directory."""
        # The ignore: `transformers` wraps `to` with `functools.wraps`, whose type hides the
        # bound `self` from mypy (it reads the device as `self`).
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=TORCH_DTYPES[dtype],
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        ).to(device)  # type: ignore[arg-type]
        return cls(model, batch_size, sequence_length)

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the decoder; return hidden states `[n, q, hidden]`."""
        out = self.decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            cache_position=cache_position,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _allowed(
        self, query_pos: torch.Tensor, key_len: int, valid_len: torch.Tensor
    ) -> torch.Tensor:
        """Boolean `[n, 1, q, key_len]`: causal, inside each row's filled length and the window."""
        keys = torch.arange(key_len, device=self.device)
        allowed = (keys[None, None, :] <= query_pos[:, :, None]) & (
            keys[None, None, :] < valid_len[:, None, None]
        )
        if self.sliding_window is not None:
            allowed &= keys[None, None, :] > query_pos[:, :, None] - self.sliding_window
        return allowed[:, None]

    def assign(self, slot: int, params: SamplingParams) -> None:
        """Nothing to do: tokens are chosen from the logits on the host."""

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: list[list[int]],
        seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
        cached: list[int] | None = None,
    ) -> PrefillOutput:
        wanted = want_prompt_logits or [False] * len(input_ids)
        held = cached or [0] * len(input_ids)
        fresh = [i for i, n in enumerate(held) if not n]
        logits: list[torch.Tensor | None] = [None] * len(input_ids)
        prompt_logits: list[torch.Tensor | None] = [None] * len(input_ids)
        limit = PACK_TOKENS if self.packed else 0
        for pack in _packs([len(input_ids[i]) for i in fresh], limit):
            pack = [fresh[j] for j in pack]
            hidden = self._prefill_pack([input_ids[i] for i in pack], [seq_ids[i] for i in pack])
            bounds = _bounds([len(input_ids[i]) for i in pack])
            pack_last, pack_logits = self._prompt_outputs(hidden, bounds, [wanted[i] for i in pack])
            for i, row, row_logits in zip(pack, self._logits(pack_last).cpu(), pack_logits):
                logits[i], prompt_logits[i] = row, row_logits
        extended = [i for i, n in enumerate(held) if n]
        if extended:
            rows = self._extend(
                [input_ids[i] for i in extended],
                [seq_ids[i] for i in extended],
                [held[i] for i in extended],
            )
            for i, row in zip(extended, rows):
                logits[i] = row
        return PrefillOutput(
            logits=torch.stack([cast(torch.Tensor, row) for row in logits]),
            prompt_logits=prompt_logits,
        )

    def _extend(
        self, input_ids: list[list[int]], seq_ids: list[int], starts: list[int]
    ) -> torch.Tensor:
        """Prompts whose rows hold their first `starts` positions: compute the rest. Prompts
        with one token left run as one decode step (the compiled one where there is one); the
        others each run a forward of their remaining tokens. Returns `[n, vocab]` fp32 logits of
        the prompts' last positions (on the host)."""
        out: list[torch.Tensor | None] = [None] * len(input_ids)
        single = [
            i for i, (ids, start) in enumerate(zip(input_ids, starts)) if len(ids) - start == 1
        ]
        if single:
            decoded = self.decode(
                torch.tensor([input_ids[i][-1] for i in single]),
                torch.tensor([starts[i] for i in single]),
                [seq_ids[i] for i in single],
            )
            for i, row in zip(single, decoded):
                out[i] = row
        for i, (ids, row, start) in enumerate(zip(input_ids, seq_ids, starts)):
            if out[i] is None:
                out[i] = self._logits(self._extend_one(ids, row, start)).cpu()
        return torch.stack([cast(torch.Tensor, row) for row in out])

    def _extend_one(self, input_ids: list[int], row: int, start: int) -> torch.Tensor:
        """Run `input_ids[start:]` at positions `start ..` of `row`, attending to the row's held
        positions; return the last position's hidden state `[hidden]`."""
        tokens = torch.tensor(input_ids[start:], device=self.device)
        positions = torch.arange(start, len(input_ids), device=self.device)
        allowed = self._allowed(
            positions[None],
            len(input_ids),
            torch.tensor([len(input_ids)], device=self.device),
        )
        self.cache.step = _ExtendStep(row, start, len(tokens))
        _active.step = None
        try:
            hidden = self._forward(
                tokens[None], positions[None], positions, _additive(allowed, self.dtype)
            )
        finally:
            self.cache.step = None
        return hidden[0, -1]

    def keep_prefixes(self, rows: int) -> None:
        """Add `rows` rows that only keep prefixes (`ModelShape.prefix_rows`). Call after
        `use_compiled`, which sets the cache's dtype."""
        self.shape = dataclasses.replace(self.shape, prefix_rows=rows)

    def _rows_tensor(self, rows: int) -> torch.Tensor:
        """Zeroed keys and values for `rows` cache rows, `[layers, 2, rows, kv_heads, S,
        head_dim]` in the cache's dtype, committed as they are written (`_zeros`)."""
        config = self.model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (self.cache.num_layers, 2, rows, config.num_key_value_heads)
        return _zeros((*shape, self.cache.sequence_length, head_dim), self.kv_dtype, self.device)

    def _row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, views of the keys and values `[kv_heads, length, head_dim]` of row
        `row`'s first positions (a slot's, or from `batch_size` on a prefix row's); none
        before the eager cache's first write."""
        slots = self.cache.batch_size
        if row >= slots:
            if self.store is None:
                self.store = self._rows_tensor(self.shape.prefix_rows)
            return [
                (layer[0, row - slots, :, :length], layer[1, row - slots, :, :length])
                for layer in self.store
            ]
        if self.kv is not None:
            return [(layer[0, row, :, :length], layer[1, row, :, :length]) for layer in self.kv]
        pairs = zip(self.cache.keys, self.cache.values)
        return [
            (k[row, :, :length], v[row, :, :length])
            for k, v in pairs
            if k is not None and v is not None
        ]

    @torch.inference_mode()
    def copy_prefix(self, source: int, dest: int, length: int) -> None:
        for (keys, values), (from_keys, from_values) in zip(
            self._row(dest, length), self._row(source, length), strict=True
        ):
            keys.copy_(from_keys)
            values.copy_(from_values)

    def _prompt_outputs(
        self, hidden: torch.Tensor, bounds: list[tuple[int, int]], wanted: list[bool] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """From packed hidden states `[T, hidden]` and each prompt's `(start, end)`: the last
        positions' states `[n, hidden]`, and the logits `[length, vocab]` of every position of
        the prompts whose `wanted` is true (else None)."""
        wanted = wanted or [False] * len(bounds)
        last = torch.stack([hidden[end - 1] for _, end in bounds])
        logits = [
            self._logits(hidden[start:end]).cpu() if want else None
            for (start, end), want in zip(bounds, wanted)
        ]
        return last, logits

    def _prompt_layout(
        self, input_ids: list[list[int]], seq_ids: list[int], offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, _PrefillStep]:
        """Packed prompts: tokens `[T]`, positions `[T]`, and the step writing their segments
        (starting at `offset` in the sequence) with their attention groups."""
        lengths = [len(ids) for ids in input_ids]
        tokens = torch.tensor([t for ids in input_ids for t in ids], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        bounds = _bounds(lengths)
        segments = [
            (row, offset + start, end - start) for row, (start, end) in zip(seq_ids, bounds)
        ]
        groups = [
            _prompt_group([bounds[i] for i in group], self.sliding_window, self.dtype, self.device)
            for group in _group_lengths(lengths)
        ]
        return tokens, positions, _PrefillStep(segments=segments, groups=groups)

    def _prefill_pack(self, input_ids: list[list[int]], seq_ids: list[int]) -> torch.Tensor:
        """Run prompts packed into one sequence; return hidden states `[total_tokens, hidden]`."""
        tokens, positions, step = self._prompt_layout(input_ids, seq_ids)
        packed = torch.arange(len(tokens), device=self.device)
        self.cache.step = _active.step = step
        try:
            hidden = self._forward(tokens[None], positions[None], packed, None)
        finally:
            self.cache.step = _active.step = None
        return hidden[0]

    def _decode_layout(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: list[int],
        masked: bool = False,
    ) -> tuple[_DecodeStep, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """The step over the contiguous row range `[lo, hi)` of `seq_ids`, so that the cache is
        read as a view, never gathered. Rows in the range that are not being decoded are
        padding: they write their last position (which any row writes itself before reading it)
        and attend to position 0 only; their outputs are dropped.

        Returns the step (its `mask` set when `masked`, or when the rows are not all at
        the same position), tokens `[n]`, query positions `[n]`, the index of each of `seq_ids`
        in the range `[m]` and whether the rows are uniform (dense, same position)."""
        lo, hi = min(seq_ids), max(seq_ids) + 1
        n = hi - lo
        index = torch.tensor(seq_ids) - lo
        tokens = torch.zeros(n, dtype=torch.long)
        tokens[index] = input_ids.cpu()
        write_pos = torch.full((n,), self.cache.sequence_length - 1, dtype=torch.long)
        write_pos[index] = position_ids.cpu()
        query_pos = torch.zeros(n, dtype=torch.long)
        query_pos[index] = position_ids.cpu()
        valid = query_pos + 1
        kv_len = int(valid.max())
        uniform = len(seq_ids) == n and bool((write_pos == write_pos[0]).all())
        tokens, write_pos, query_pos, valid = (
            t.to(self.device) for t in (tokens, write_pos, query_pos, valid)
        )
        mask = None
        if masked or not uniform:
            allowed = self._allowed(query_pos[:, None], kv_len, valid)
            mask = _additive(allowed, self.kv_dtype)
        step = _DecodeStep(
            rows=slice(lo, hi),
            write_rows=torch.arange(lo, hi, device=self.device),
            write_pos=write_pos,
            kv_len=kv_len,
            mask=mask,
        )
        return step, tokens, query_pos, index.to(self.device), uniform

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: list[int]
    ) -> torch.Tensor:
        if self.compiled is not None:
            return self._compiled_decode(input_ids, position_ids, seq_ids)
        step, tokens, query_pos, index, uniform = self._decode_layout(
            input_ids, position_ids, seq_ids
        )
        self.cache.step = step
        try:
            hidden = self._forward(
                tokens[:, None],
                query_pos[:, None],
                step.write_pos[:1]
                if uniform
                else torch.tensor([step.kv_len - 1], device=self.device),
                step.mask,
            )
        finally:
            self.cache.step = None
        return self._logits(hidden[index, -1]).cpu()

    def _compiled_decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: list[int]
    ) -> torch.Tensor:
        """The compiled step over rows `0 .. max(seq_ids)`: rows not being decoded are padding
        (token 0 at position 0, attending to nothing cached, written at the last position, which
        a live row always writes itself before reading it). Returns `[n, vocab]` fp32 logits."""
        assert self.compiled is not None and self.kv is not None
        rows = max(seq_ids) + 1
        index = torch.tensor(seq_ids)
        tokens = torch.zeros(rows, dtype=torch.long)
        tokens[index] = input_ids.cpu().long()
        positions = torch.zeros(rows, dtype=torch.long)
        positions[index] = position_ids.cpu().long()
        write = torch.full((rows,), self.cache.sequence_length - 1, dtype=torch.long)
        write[index] = positions[index]
        length = max(1, int(positions.max()))
        tokens, positions, write = (t.to(self.device) for t in (tokens, positions, write))
        mask = decode_mask(positions, length, self.sliding_window, self.device)
        logits, new = self.compiled(tokens, positions, mask, self.kv)
        slots = torch.arange(rows, device=self.device)
        self.kv[:, :, slots, :, write] = new.permute(2, 0, 1, 3, 4)
        if seq_ids != list(range(rows)):  # a full batch in order (the usual case) needs no gather
            logits = logits[index.to(self.device)]
        return logits.float().cpu()

    @torch.inference_mode()
    def mixed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: list[int],
        prompts: list[list[int]],
        prompt_seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
    ) -> tuple[torch.Tensor, PrefillOutput]:
        """A decode step of rows `seq_ids` and the prefill of `prompts` into rows
        `prompt_seq_ids` in one forward: the sequence holds the decode queries, then the packed
        prompts. A prefill then costs the streams its prompt's tokens only, not a forward of its
        own. Prompts beyond `PACK_TOKENS` run as a prefill of their own, then the decode."""
        if sum(len(ids) for ids in prompts) > PACK_TOKENS:
            output = self.prefill(prompts, prompt_seq_ids, want_prompt_logits)
            return self.decode(input_ids, position_ids, seq_ids), output
        decode, tokens, query_pos, index, _ = self._decode_layout(
            input_ids, position_ids, seq_ids, masked=True
        )
        prompt_tokens, prompt_positions, prefill = self._prompt_layout(
            prompts, prompt_seq_ids, offset=len(tokens)
        )
        step = _MixedStep(decode=decode, prefill=prefill, cache=self.cache)
        sequence = torch.cat([tokens, prompt_tokens])[None]
        positions = torch.cat([query_pos, prompt_positions])[None]
        self.cache.step = _active.step = step
        try:
            # Any 4D mask makes `transformers` pass it through untouched; the mixed attention
            # uses the step's own masks.
            hidden = self._forward(
                sequence,
                positions,
                torch.arange(sequence.shape[1], device=self.device),
                decode.mask,
            )[0]
        finally:
            self.cache.step = _active.step = None
        bounds = [(start, start + length) for _, start, length in prefill.segments]
        last, prompt_logits = self._prompt_outputs(hidden, bounds, want_prompt_logits)
        logits = self._logits(torch.cat([hidden[index], last])).cpu()
        return logits[: len(seq_ids)], PrefillOutput(logits[len(seq_ids) :], prompt_logits)
