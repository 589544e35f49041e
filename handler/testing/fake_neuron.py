"""A stand-in for an optimum-neuron 0.4.x `NeuronModelForCausalLM`, at the model boundary only.

`FakeNeuronModel` answers `model(input_ids, position_ids=, seq_ids=, sampling_params=)` the way
the compiled model does (optimum-neuron v0.4.5, `NxDModelForCausalLM.forward`, its decoder
wrappers, `NxDDecoderModelForCausalLM.forward`, the KV cache manager and the `Sampler`), with
real logits from a `transformers` model on the CPU and one KV cache row per seq_id:

- it picks the graph as the real model does: context encoding when the input is wider than one
  token and the smallest position is 0, else token generation of exactly one token;
- context encoding pads the input to `max_context_length` with the pad token and position 1
  (`CONTEXT_POSITION_PAD`) like the runtime, writes the whole padded slab into the row's KV
  cache (as `KVCacheManager.update_cache` does), and answers from the index of each row's
  largest position: the device's `torch.max` over equal maxima is not specified, so ties go to
  the last index by default (`tie_break`), and the answer is computed at that index with the
  positions given, over the padded slab with a causal mask, as the device computes it;
- token generation pads a partial batch with copies of the first row into the missing seq_ids,
  so that those rows get the same KV write at the first row's position as on the device;
- host-sampling outputs are `[n, 1, padded_vocab]` float32 logits, the vocabulary padded to a
  multiple of `tp_degree` (`ColumnParallelLinear(pad=True)`) with the float32 minimum in the
  padding (`mask_padded_logits`); with on-device sampling, `[n]` token ids in int32 (the dtype
  the compiled graphs compute in; their int64 inputs are converted to int32 too), chosen by
  `device_sample`, a transcription of the `Sampler`: over the whole batch of the graph (the
  runtime's padding rows included), top-k among `max_topk` candidates, temperature, top-p with
  the batch-wide floor `max(min(cumsum), top_p)`, and one uniform draw per row.

It also checks what the device would not: rows sorted by seq_id (`shuffle_check`), integer
dtypes, shapes, `sampling_params` present and valid, prompts within the compiled context, and a
prefill whose answer would come from the runtime's own padding. A broken contract raises
`ForwardContractError`; every call is logged in `calls`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel

from handler.model.torch_backend import TorchBackend

CONTEXT_ENCODING = "context_encoding"
TOKEN_GENERATION = "token_generation"
INTEGER_DTYPES = (torch.int32, torch.int64)
CONTEXT_POSITION_PAD = 1
"""The position the runtime pads context encoding inputs with (`decoder_wrappers.py`)."""
DEFAULT_PAD_TOKEN_ID = 0
"""The pad token the runtime uses when the model config has none (`decoder_wrappers.py`)."""
IGNORED_LOGIT = -3000.0
"""What the on-device sampler writes over the logits it discards (not -inf)."""
TOKEN_ID_DTYPE = torch.int32
"""The dtype of the token ids the compiled graphs return with on-device sampling."""


class ForwardContractError(AssertionError):
    """The caller broke the forward contract of the compiled model."""


@dataclass
class FakeNeuronConfig:
    """The attributes of optimum-neuron's `NxDNeuronConfig` that serving reads."""

    batch_size: int
    sequence_length: int
    tp_degree: int = 1
    torch_dtype: torch.dtype = torch.float32
    on_device_sampling: bool = False
    max_topk: int = 256
    continuous_batching: bool = True
    max_context_length: int | None = None
    """None: `sequence_length`."""
    speculation_length: int = 0
    output_logits: bool = False
    max_batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        if self.max_context_length is None:
            self.max_context_length = self.sequence_length
        self.max_batch_size = self.batch_size


@dataclass
class ForwardCall:
    """What one forward call received (tensors as given, on the CPU)."""

    graph: str
    seq_ids: list[int]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sampling_params: torch.Tensor


def padded_vocab(vocab_size: int, tp_degree: int) -> int:
    """The lm_head's output width: the vocabulary padded to a multiple of `tp_degree`."""
    return -(-vocab_size // tp_degree) * tp_degree


def device_sample(
    logits: torch.Tensor, params: torch.Tensor, max_topk: int, uniform: torch.Tensor
) -> torch.Tensor:
    """optimum-neuron's `Sampler._multinomial_sample`, line by line (its CPU path).

    logits: `[b, vocab]` float32, the whole batch of the graph; params: `[b, 3]` (top_k, top_p,
    temperature); uniform: `[b, 1]` draws in [0, 1). Returns `[b]` int64 token ids. The
    conditions on temperature and top-p hold for the batch, and the top-p threshold of every row
    is raised to the smallest cumulative probability of the batch, as on the device.
    """
    dim = logits.dim() - 1
    batch_size = logits.shape[0]
    top_k = params[:, 0].reshape(batch_size, 1)
    top_p = params[:, 1].reshape(batch_size, 1)
    temperature = params[:, 2].reshape(batch_size, 1)
    if max_topk > 0:
        values, indices = torch.topk(logits, k=max_topk, dim=dim)
    else:
        values, indices = torch.sort(logits, dim=dim, descending=True)
    rank = torch.arange(values.shape[-1]).broadcast_to(*values.shape)
    values = values.masked_fill(rank >= top_k, IGNORED_LOGIT)
    if torch.any(temperature != 1.0):
        values = values / temperature
    if torch.any(top_p < 1.0):
        cumsum = values.softmax(dim=dim).cumsum(dim=dim)
        top_p = torch.max(torch.min(cumsum), top_p)
        outside = (cumsum > top_p).index_fill_(dim, torch.tensor([0]), False)
        values = values.masked_fill(outside, IGNORED_LOGIT)
    cumsum = values.softmax(dim=dim).cumsum(dim=dim)
    counts = (uniform > cumsum).sum(dim=dim).unsqueeze(dim)
    # A draw above the last cumulative sum (rounding) would index past the candidates; the
    # device's gather clamps, as here.
    counts = counts.clamp(max=values.shape[-1] - 1)
    return torch.gather(indices, dim=dim, index=counts).flatten()


class FakeNeuronModel:
    """A compiled causal LM with continuous batching, emulated on a `transformers` model."""

    def __init__(
        self,
        torch_model: PreTrainedModel,
        batch_size: int,
        sequence_length: int,
        on_device_sampling: bool = False,
        shuffle_check: bool = True,
        max_context_length: int | None = None,
        max_topk: int = 256,
        seed: int = 0,
        tp_degree: int = 1,
        tie_break: Literal["first", "last"] = "last",
    ) -> None:
        """`tie_break`: which of equal largest positions the context encoding answers from."""
        self.config = torch_model.config
        self.neuron_config = FakeNeuronConfig(
            batch_size=batch_size,
            sequence_length=sequence_length,
            tp_degree=tp_degree,
            torch_dtype=next(torch_model.parameters()).dtype,
            on_device_sampling=on_device_sampling,
            max_topk=max_topk,
            continuous_batching=batch_size > 1,
            max_context_length=max_context_length,
        )
        self.shuffle_check = shuffle_check
        self.tie_break = tie_break
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else DEFAULT_PAD_TOKEN_ID
        self.vocab_size = int(torch_model.get_output_embeddings().weight.shape[0])
        self.model = torch_model
        self.rows = TorchBackend(torch_model, batch_size, sequence_length)
        """One KV cache row per seq_id; it computes the decode logits."""
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[ForwardCall] = []

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
        sampling_params: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids: `[n, width]`; seq_ids: `[n]`; sampling_params: `[n, 3]`
        (top_k, top_p, temperature). Returns `[n, 1, padded_vocab]` float32 logits, or `[n]`
        int32 token ids with on-device sampling."""
        if output_attentions or output_hidden_states or return_dict:
            raise ValueError("output_attentions, output_hidden_states and return_dict are refused")
        seq_ids, sampling_params = self._check_inputs(
            input_ids, position_ids, seq_ids, sampling_params
        )
        width = input_ids.shape[1]
        prefill = width > 1 and int(position_ids.min()) == 0
        self.calls.append(
            ForwardCall(
                CONTEXT_ENCODING if prefill else TOKEN_GENERATION,
                seq_ids.tolist(),
                input_ids.cpu().clone(),
                position_ids.cpu().clone(),
                sampling_params.cpu().clone(),
            )
        )
        input_ids, position_ids, seq_ids = (
            t.cpu().long() for t in (input_ids, position_ids, seq_ids)
        )
        params = sampling_params.cpu().float()
        if prefill:
            logits = self._pad_vocab(self._context_encoding(input_ids, position_ids, seq_ids))
            if self.neuron_config.on_device_sampling:
                # Continuous batching encodes the rows one at a time: one sampler batch each.
                ids = [
                    self._sample(logits[row : row + 1], params[row : row + 1])
                    for row in range(len(logits))
                ]
                return torch.cat(ids)
        else:
            n = input_ids.shape[0]
            logits, params = self._token_generation(input_ids, position_ids, seq_ids, params)
            logits = self._pad_vocab(logits)
            if self.neuron_config.on_device_sampling:
                return self._sample(logits, params)[:n]
            logits = logits[:n]
        return logits[:, None, :]

    __call__ = forward

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor | None,
        sampling_params: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raise `ForwardContractError` where the call breaks the contract; return `seq_ids` and
        `sampling_params`, which it requires."""

        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ForwardContractError(message)

        config = self.neuron_config
        require(
            isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2,
            "input_ids must be a [n, width] tensor",
        )
        require(
            isinstance(position_ids, torch.Tensor) and position_ids.shape == input_ids.shape,
            f"position_ids must be shaped like input_ids {tuple(input_ids.shape)}",
        )
        require(
            input_ids.dtype in INTEGER_DTYPES and position_ids.dtype in INTEGER_DTYPES,
            f"input_ids and position_ids must be int32 or int64, got {input_ids.dtype} "
            f"and {position_ids.dtype}",
        )
        n = input_ids.shape[0]
        if not (isinstance(seq_ids, torch.Tensor) and seq_ids.shape == (n,)):
            raise ForwardContractError(f"seq_ids must be a [{n}] tensor")
        require(seq_ids.dtype in INTEGER_DTYPES, f"seq_ids must be int32 or int64: {seq_ids.dtype}")
        ids = seq_ids.tolist()
        require(n <= config.max_batch_size, f"{n} rows exceed batch size {config.max_batch_size}")
        require(
            len(set(ids)) == n and all(0 <= s < config.batch_size for s in ids),
            f"seq_ids must be distinct rows in [0, {config.batch_size}): {ids}",
        )
        if self.shuffle_check:
            require(ids == sorted(ids), f"rows must be sorted by seq_id: {ids}")
        if not (
            isinstance(sampling_params, torch.Tensor)
            and sampling_params.shape == (n, 3)
            and sampling_params.is_floating_point()
        ):
            raise ForwardContractError(
                f"sampling_params must be a float [{n}, 3] tensor (it is an input of every graph)"
            )
        if config.on_device_sampling:
            _validate_sampling_params(sampling_params.float(), config.max_topk)
        return seq_ids, sampling_params

    def _answered_index(self, positions: torch.Tensor) -> int:
        """The index of the largest of `positions` `[width]`, equal maxima broken per
        `tie_break`."""
        largest = positions.max()
        candidates = (positions == largest).nonzero()[:, 0]
        return int(candidates[0] if self.tie_break == "first" else candidates[-1])

    def _context_encoding(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """Prefill; returns `[n, vocab]` logits at each row's answered index."""
        width = input_ids.shape[1]
        context = self.neuron_config.max_context_length
        assert context is not None, "FakeNeuronConfig defaults it to sequence_length"
        if width > context:
            raise ForwardContractError(f"{width} tokens exceed max_context_length {context}")
        # The runtime pads to the compiled width, then answers from the largest position.
        pad = context - width
        tokens = torch.nn.functional.pad(input_ids, (0, pad), value=self.pad_token_id)
        positions = torch.nn.functional.pad(position_ids, (0, pad), value=CONTEXT_POSITION_PAD)
        logits = []
        for row in range(len(tokens)):
            index = self._answered_index(positions[row])
            if index >= width:
                raise ForwardContractError(
                    f"row {row} (seq_id {int(seq_ids[row])}) would be answered from the runtime's "
                    f"padding at index {index}: pad with position 0 up to max_context_length"
                )
            logits.append(self._logits_at(tokens[row, : index + 1], positions[row, : index + 1]))
        # The KV cache manager writes the whole padded slab of each row (`dynamic_update_slice`).
        # The cache rows here compute it with positions 0..context-1: identical to the device's
        # for a prompt at positions 0..L-1, other values (garbage on both) after it.
        self.rows.prefill(tokens.tolist(), seq_ids.tolist())
        return torch.stack(logits)

    def _logits_at(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`[vocab]` logits of the last of `tokens` `[k]` at `positions` `[k]`, attending causally
        to the ones before it: what the device computes at that index of the slab."""
        # An explicit causal mask, as the device's: given positions that restart at 0 and no
        # mask, `transformers` would take the row for packed sequences and split its attention.
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        output = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=causal[None, None],
            use_cache=False,
            logits_to_keep=1,
        )
        return output.logits[0, -1].float()

    def _token_generation(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token per row of the batch the runtime pads the call to. Returns
        `[batch_size, vocab]` logits and `[batch_size, 3]` sampling params, the call's rows
        first."""
        width = input_ids.shape[1]
        if width != 1:
            raise ForwardContractError(
                f"a {width}-token input not starting at position 0 has no compiled graph"
            )
        batch = self.neuron_config.batch_size
        present = set(seq_ids.tolist())
        missing = torch.tensor([s for s in range(batch) if s not in present], dtype=torch.long)
        # The runtime fills a partial batch with the first row's token, position and params.
        tokens = torch.cat([input_ids[:, 0], input_ids[0, 0].repeat(len(missing))])
        positions = torch.cat([position_ids[:, 0], position_ids[0, 0].repeat(len(missing))])
        params = torch.cat([params, params[:1].repeat(len(missing), 1)])
        rows = torch.cat([seq_ids, missing]).tolist()
        return self.rows.decode(tokens, positions, rows), params

    def _pad_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """`[b, vocab]` -> `[b, padded_vocab]`, the padding at the float32 minimum."""
        width = padded_vocab(logits.shape[-1], self.neuron_config.tp_degree)
        return torch.nn.functional.pad(
            logits, (0, width - logits.shape[-1]), value=torch.finfo(torch.float32).min
        )

    def _sample(self, logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """On-device sampling of one graph's batch: `[b, padded_vocab]` -> `[b]` int32 ids."""
        uniform = torch.rand((logits.shape[0], 1), generator=self.generator)
        ids = device_sample(logits, params, self.neuron_config.max_topk, uniform)
        return ids.to(TOKEN_ID_DTYPE)


def _validate_sampling_params(params: torch.Tensor, max_topk: int) -> None:
    """The checks optimum-neuron runs on `sampling_params` with on-device sampling (it raises
    ValueError too)."""
    top_k, top_p, temperature = params[:, 0], params[:, 1], params[:, 2]
    if not bool(((top_k == -1) | ((top_k > 0) & (top_k <= max_topk))).all()):
        raise ValueError(f"top-k must be -1 or in (0, {max_topk}]: {top_k.tolist()}")
    if not torch.equal(top_k, top_k.floor()):
        raise ValueError(f"top-k must be integers: {top_k.tolist()}")
    if not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError(f"top-p must be in (0, 1]: {top_p.tolist()}")
    if not bool((temperature > 0).all()):
        raise ValueError(f"temperature must be > 0: {temperature.tolist()}")
