"""A stand-in for an optimum-neuron 0.4.x `NeuronModelForCausalLM`, at the model boundary only.

`FakeNeuronModel` answers `model(input_ids, position_ids=, seq_ids=, sampling_params=)` the way
the compiled model does (optimum-neuron v0.4.5, `NxDModelForCausalLM.forward`, its decoder
wrappers and `NxDDecoderModelForCausalLM.forward`), with real logits from a `transformers` model
on the CPU and one KV cache row per seq_id:

- it picks the graph as the real model does: context encoding when the input is wider than one
  token and the smallest position is 0, else token generation of exactly one token;
- context encoding pads positions to `max_context_length` with 1 like the runtime, and answers
  from the index of each row's largest position (the first one when several are equal);
- token generation pads a partial batch with copies of the first row into the missing seq_ids,
  so that those rows get the same KV write at the first row's position as on the device;
- outputs are `[n, 1, vocab]` float32 logits, or `[n]` int64 token ids with on-device sampling
  (greedy where top_k is 1, else top-k among `max_topk` candidates, temperature, top-p and a draw
  with `torch.multinomial`).

It also checks what the device would not: rows sorted by seq_id (`shuffle_check`), integer
dtypes, shapes, `sampling_params` present and valid, prompts within the compiled context, and a
prefill whose answer would come from a padding position or from positions that are not
`0..len-1`. A broken contract raises `ForwardContractError`; every call is logged in `calls`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from handler.model.torch_backend import TorchBackend

CONTEXT_ENCODING = "context_encoding"
TOKEN_GENERATION = "token_generation"
INTEGER_DTYPES = (torch.int32, torch.int64)
IGNORED_LOGIT = -3000.0
"""What the on-device sampler writes over the logits it discards (not -inf)."""


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
    ) -> None:
        self.config = torch_model.config
        self.neuron_config = FakeNeuronConfig(
            batch_size=batch_size,
            sequence_length=sequence_length,
            torch_dtype=next(torch_model.parameters()).dtype,
            on_device_sampling=on_device_sampling,
            max_topk=max_topk,
            continuous_batching=batch_size > 1,
            max_context_length=max_context_length,
        )
        self.shuffle_check = shuffle_check
        self.rows = TorchBackend(torch_model, batch_size, sequence_length)
        """One KV cache row per seq_id; it computes the logits."""
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[ForwardCall] = []

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        seq_ids: torch.LongTensor | None = None,
        sampling_params: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids: `[n, width]`; seq_ids: `[n]`; sampling_params: `[n, 3]`
        (top_k, top_p, temperature). Returns `[n, 1, vocab]` float32 logits, or `[n]` int64
        token ids with on-device sampling."""
        if output_attentions or output_hidden_states or return_dict:
            raise ValueError("output_attentions, output_hidden_states and return_dict are refused")
        self._check_inputs(input_ids, position_ids, seq_ids, sampling_params)
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
        if prefill:
            logits = self._context_encoding(input_ids, position_ids, seq_ids)
        else:
            logits = self._token_generation(input_ids, position_ids, seq_ids)
        if self.neuron_config.on_device_sampling:
            return self._sample(logits, sampling_params.cpu().float())
        return logits[:, None, :]

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor | None,
        sampling_params: torch.Tensor | None,
    ) -> None:
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
        require(
            isinstance(seq_ids, torch.Tensor) and seq_ids.shape == (n,),
            f"seq_ids must be a [{n}] tensor",
        )
        require(seq_ids.dtype in INTEGER_DTYPES, f"seq_ids must be int32 or int64: {seq_ids.dtype}")
        ids = seq_ids.tolist()
        require(n <= config.max_batch_size, f"{n} rows exceed batch size {config.max_batch_size}")
        require(
            len(set(ids)) == n and all(0 <= s < config.batch_size for s in ids),
            f"seq_ids must be distinct rows in [0, {config.batch_size}): {ids}",
        )
        if self.shuffle_check:
            require(ids == sorted(ids), f"rows must be sorted by seq_id: {ids}")
        require(
            isinstance(sampling_params, torch.Tensor)
            and sampling_params.shape == (n, 3)
            and sampling_params.is_floating_point(),
            f"sampling_params must be a float [{n}, 3] tensor (it is an input of every graph)",
        )
        if config.on_device_sampling:
            _validate_sampling_params(sampling_params.float(), config.max_topk)

    def _context_encoding(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """Prefill; returns `[n, vocab]` logits at each row's largest position."""
        width = input_ids.shape[1]
        context = self.neuron_config.max_context_length
        if width > context:
            raise ForwardContractError(f"{width} tokens exceed max_context_length {context}")
        # The runtime pads to the compiled width with position 1, then gathers at the argmax.
        padded = torch.nn.functional.pad(position_ids, (0, context - width), value=1)
        gathered = padded.max(dim=1).indices.tolist()
        prompts = []
        for row, index in enumerate(gathered):
            if index >= width:
                raise ForwardContractError(
                    f"row {row} (seq_id {int(seq_ids[row])}) would be answered from the runtime's "
                    f"padding at index {index}: pad with position 0 up to max_context_length"
                )
            if position_ids[row, : index + 1].tolist() != list(range(index + 1)):
                raise ForwardContractError(
                    f"row {row}: positions up to the answered index {index} must be 0..{index}"
                )
            prompts.append(input_ids[row, : index + 1].tolist())
        return self.rows.prefill(prompts, seq_ids.tolist()).logits

    def _token_generation(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """Decode one token per row; returns `[n, vocab]` logits."""
        n, width = input_ids.shape
        if width != 1:
            raise ForwardContractError(
                f"a {width}-token input not starting at position 0 has no compiled graph"
            )
        batch = self.neuron_config.batch_size
        present = set(seq_ids.tolist())
        missing = torch.tensor([s for s in range(batch) if s not in present], dtype=torch.long)
        # The runtime fills a partial batch with the first row's token and position.
        tokens = torch.cat([input_ids[:, 0], input_ids[0, 0].repeat(len(missing))])
        positions = torch.cat([position_ids[:, 0], position_ids[0, 0].repeat(len(missing))])
        rows = torch.cat([seq_ids, missing]).tolist()
        return self.rows.decode(tokens, positions, rows)[:n]

    def _sample(self, logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """On-device sampling of `[n, vocab]` logits with `[n, 3]` params -> `[n]` int64 ids."""
        top_k, top_p, temperature = params[:, 0].long(), params[:, 1], params[:, 2]
        ids = logits.argmax(dim=-1)
        max_topk = self.neuron_config.max_topk
        width = min(max_topk, logits.shape[-1]) if max_topk > 0 else logits.shape[-1]
        for row in (top_k != 1).nonzero()[:, 0].tolist():
            values, candidates = logits[row].topk(width)
            values = values.masked_fill(torch.arange(width) >= top_k[row], IGNORED_LOGIT)
            values = values / temperature[row]
            probs = values.softmax(dim=-1)
            if top_p[row] < 1:
                outside = probs.cumsum(dim=-1) > top_p[row]
                outside[0] = False
                probs = values.masked_fill(outside, IGNORED_LOGIT).softmax(dim=-1)
            ids[row] = candidates[torch.multinomial(probs, 1, generator=self.generator)[0]]
        return ids


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
