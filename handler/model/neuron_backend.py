"""`ModelBackend` over a loaded optimum-neuron 0.4.x `NeuronModelForCausalLM`.

The compiled model owns a KV cache of `batch_size` rows and is driven through one call,
`model(input_ids, position_ids=, seq_ids=, sampling_params=)`; it picks its graph from the input
shape. A context encoding (prefill) runs when `input_ids` is wider than one token and the
smallest position is 0: the runtime right-pads each row to `max_context_length` with position 1,
runs the rows one at a time (continuous batching) and returns, per row, the output at the index
of the row's largest position id only (`[n, 1, vocab]` logits, or `[n]` token ids with on-device
sampling). A token generation (decode) runs for `[n, 1]` inputs; its KV write goes to row `i` of
the cache for input row `i` once the runtime has sorted the rows and padded them to the full batch
with copies of the first row. Read in optimum-neuron v0.4.5:
`optimum/neuron/models/inference/backend/modules/decoder/modeling_decoder.py` (`forward` of
`NxDDecoderModelForCausalLM` and `NxDModelForCausalLM`), `.../decoder/decoder_wrappers.py`,
`.../kvcache/kv_cache_manager.py`, `.../generation/sampling.py` and `optimum/neuron/vllm/`.

Two consequences shape this backend:

- Prefill rows are padded up to `max_context_length` with position 0, never with continuing
  positions, so that the largest position is the last prompt token. Padding only to the longest
  prompt is not enough: the runtime's own padding (position 1) would win over a one-token
  prompt's position 0 and the model would answer from a padding token. The padding repeats the
  row's first token: a one-token prompt then has every position 0, and whichever of the equal
  maxima the device's `torch.max` picks, that index holds the prompt's token at position 0,
  attending (causally) only to copies of itself, so it gives the prompt's own answer. (The
  context encoding writes the whole padded slab into the row's KV cache; decode overwrites the
  positions after the prompt before it reads them.)
- Decode always passes every cache row, in seq_id order: rows that are not being decoded get a
  filler token at the last position `sequence_length - 1`, which a row always writes itself
  before reading it. The runtime's own batch padding would instead write the first row's position
  into the other rows, corrupting any live row that is not in the call.

Only the last prompt position comes back, so prompt log-probabilities (`decoder_input_details`)
are unavailable: `PrefillOutput.prompt_logits` rows are always None with 0.4.x models. They are
returned only if a model gives back all positions (`[n, L, vocab]`).

With `neuron_config.on_device_sampling` the model returns token ids chosen on the device from
`sampling_params` `[n, 3]` = (top_k, top_p, temperature) per row. This backend then returns
logits-shaped rows that are -inf except 0.0 at the chosen id (see `handler.model.base`). Seeds,
repetition/frequency/presence penalties, typical_p and log-probabilities (top_n_tokens) are
unavailable in that mode; a request without top_k samples among the `max_topk` (256 by default)
most likely tokens, the limit the model was compiled with, and larger top_k values are clamped to
it, as optimum-neuron's vLLM plugin does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from handler.errors import ConfigError
from handler.model.base import ModelShape, PrefillOutput
from handler.model.params import SamplingParams

logger = logging.getLogger(__name__)

GREEDY = (1.0, 1.0, 1.0)
"""(top_k, top_p, temperature) that makes the on-device sampler take the argmax."""


def dtype_name(dtype: torch.dtype | str | None) -> str:
    """`torch.bfloat16` -> `bfloat16`. None means float32, as the Neuron runtime assumes."""
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


class NeuronBackend:
    """`ModelBackend` for an optimum-neuron causal LM exported with continuous batching."""

    def __init__(self, model: Any) -> None:
        """`model`: a loaded `NeuronModelForCausalLM` (or anything with its `neuron_config`,
        `config` and forward contract). Loading and exporting happen elsewhere."""
        self.model = model
        neuron_config = model.neuron_config
        self.batch_size = int(neuron_config.batch_size)
        self.sequence_length = int(neuron_config.sequence_length)
        self.max_context_length = int(
            getattr(neuron_config, "max_context_length", None) or self.sequence_length
        )
        self.on_device_sampling = bool(getattr(neuron_config, "on_device_sampling", False))
        if self.batch_size > 1 and not getattr(neuron_config, "continuous_batching", True):
            raise ConfigError(
                f"The Neuron model was compiled for batch size {self.batch_size} without "
                "continuous batching: each prefill would overwrite every slot. Export it again "
                "with continuous batching (batch_size > 1 enables it by default)"
            )
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(text_config.vocab_size)
        pad = getattr(text_config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else 0
        max_topk = int(getattr(neuron_config, "max_topk", 0) or 0)
        self.top_k_limit = max_topk if self.on_device_sampling and max_topk > 0 else self.vocab_size
        """What "no top_k" becomes, and the largest top_k the model accepts."""
        self.sampling_params = torch.tensor([GREEDY] * self.batch_size, dtype=torch.float32)
        """`[batch_size, 3]` (top_k, top_p, temperature) of each slot's request. The model takes
        the rows of the call even without on-device sampling (they are inputs of its graphs)."""
        self.shape = ModelShape(
            batch_size=self.batch_size,
            sequence_length=self.sequence_length,
            vocab_size=self.vocab_size,
            device="neuron",
            dtype=dtype_name(getattr(neuron_config, "torch_dtype", None)),
            on_device_sampling=self.on_device_sampling,
            prompt_logprobs=False,  # the compiled prefill returns the last position only
            max_top_k=self.top_k_limit if self.on_device_sampling else None,
        )
        logger.info(
            "Neuron model: %d slots of %d tokens (prefill up to %d), tp_degree %s, %s, %s",
            self.batch_size,
            self.sequence_length,
            self.max_context_length,
            getattr(neuron_config, "tp_degree", "?"),
            self.shape.dtype,
            "on-device sampling" if self.on_device_sampling else "host sampling",
        )

    def sampling_row(self, params: SamplingParams) -> tuple[float, float, float]:
        """(top_k, top_p, temperature) for the on-device sampler; greedy is top_k 1."""
        if not params.sampling:
            return GREEDY
        top_k = params.top_k if params.top_k > 0 else self.top_k_limit
        return float(min(top_k, self.top_k_limit)), params.top_p, params.temperature

    def assign(self, slot: int, params: SamplingParams) -> None:
        """Record the sampling parameters of the request admitted into `slot`."""
        self.sampling_params[slot] = torch.tensor(self.sampling_row(params))

    def _check_rows(self, seq_ids: list[int]) -> None:
        if len(set(seq_ids)) != len(seq_ids) or not all(0 <= s < self.batch_size for s in seq_ids):
            raise ValueError(
                f"seq_ids must be distinct slots in [0, {self.batch_size}), got {seq_ids}"
            )

    def _forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """One model call; rows sorted by seq_id. input_ids, position_ids: `[n, width]` int64;
        seq_ids: `[n]` int64. Returns the model output (logits or token ids) on the CPU."""
        output = self.model(
            input_ids,
            position_ids=position_ids,
            seq_ids=seq_ids,
            sampling_params=self.sampling_params[seq_ids],
        )
        if output.shape[0] != input_ids.shape[0]:
            raise RuntimeError(
                f"The Neuron model returned {output.shape[0]} rows for {input_ids.shape[0]}"
            )
        return output.cpu()

    def _chosen(self, ids: torch.Tensor) -> torch.Tensor:
        """On-device sampling: token ids `[n]` or `[n, 1]` -> `[n, vocab]` float32 rows, -inf
        except 0.0 at the chosen id."""
        ids = ids.reshape(-1).long()
        rows = torch.full((ids.shape[0], self.vocab_size), float("-inf"))
        return rows.scatter_(1, ids[:, None], 0.0)

    def _last_logits(self, output: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits of each row's last position -> `[n, vocab]` float32.

        output: `[n, vocab]`, `[n, 1, vocab]` (what 0.4.x returns) or `[n, L, vocab]` (every
        position), where `last`: `[n]` is each row's last valid index."""
        if output.dim() == 3:
            output = output[:, 0] if output.shape[1] == 1 else output[torch.arange(len(last)), last]
        return output[:, : self.vocab_size].float()

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: list[list[int]],
        seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
    ) -> PrefillOutput:
        """Fill rows `seq_ids` with the prompts. Returns `[n, vocab]` logits in the caller's
        order; `prompt_logits` rows stay None unless the model returns every position."""
        self._check_rows(seq_ids)
        n = len(input_ids)
        longest = max(len(ids) for ids in input_ids)
        if longest > self.max_context_length:
            raise ValueError(
                f"A prompt of {longest} tokens exceeds the model's compiled context length "
                f"{self.max_context_length}"
            )
        order = sorted(range(n), key=lambda i: seq_ids[i])
        tokens = torch.empty((n, self.max_context_length), dtype=torch.long)
        positions = torch.zeros((n, self.max_context_length), dtype=torch.long)
        for row, i in enumerate(order):
            length = len(input_ids[i])
            tokens[row] = input_ids[i][0]  # padding: the first token at position 0 (docstring)
            tokens[row, :length] = torch.tensor(input_ids[i], dtype=torch.long)
            positions[row, :length] = torch.arange(length)
        lengths = torch.tensor([len(input_ids[i]) for i in order])
        output = self._forward(tokens, positions, torch.tensor([seq_ids[i] for i in order]))
        restore = torch.tensor(order).argsort()
        prompt_logits: list[torch.Tensor | None] = [None] * n
        if self.on_device_sampling:
            return PrefillOutput(self._chosen(output)[restore], prompt_logits)
        logits = self._last_logits(output, lengths - 1)[restore]
        if output.dim() == 3 and output.shape[1] > 1:
            for row, i in enumerate(order):
                if want_prompt_logits and want_prompt_logits[i]:
                    prompt_logits[i] = output[row, : int(lengths[row]), : self.vocab_size].float()
        return PrefillOutput(logits, prompt_logits)

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: list[int]
    ) -> torch.Tensor:
        """Advance rows `seq_ids` by one token. input_ids, position_ids: `[n]`; returns
        `[n, vocab]` float32 in the caller's order. The model sees all `batch_size` rows in
        seq_id order, filler rows writing only the last position (module docstring)."""
        self._check_rows(seq_ids)
        rows = torch.tensor(seq_ids, dtype=torch.long)
        tokens = torch.full((self.batch_size, 1), self.pad_token_id, dtype=torch.long)
        positions = torch.full((self.batch_size, 1), self.sequence_length - 1, dtype=torch.long)
        tokens[rows, 0] = input_ids.reshape(-1).long().cpu()
        positions[rows, 0] = position_ids.reshape(-1).long().cpu()
        output = self._forward(tokens, positions, torch.arange(self.batch_size))
        if self.on_device_sampling:
            return self._chosen(output)[rows]
        return self._last_logits(output, torch.zeros(self.batch_size, dtype=torch.long))[rows]
