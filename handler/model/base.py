"""The narrow interface between the generator and a model.

It follows optimum-neuron's continuous-batching forward: the backend owns a static KV cache of
`batch_size` rows ("slots") of `sequence_length` positions. `prefill` fills the rows named by
`seq_ids` from scratch (prompts of different lengths at once) without touching the other rows;
`decode` advances each named row by one token at its own position. Both return float32 logits
for the last position of each row, in the order the rows were given.

A model compiled with on-device sampling (`ModelShape.on_device_sampling`) chooses tokens itself:
the generator tells the backend each slot's sampling parameters with `assign` when it admits a
request, and the "logits" rows it gets back are -inf everywhere except 0.0 at the chosen id, so
that token selection (greedy or sampling) picks exactly that id. No log-probabilities exist then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from handler.model.params import SamplingParams


@dataclass(frozen=True)
class ModelShape:
    """What the generator needs to know about the model it drives."""

    batch_size: int
    """Number of KV cache rows (slots)."""
    sequence_length: int
    """Positions per row: prompt plus generated tokens."""
    vocab_size: int
    """Width of the logits."""
    device: str
    dtype: str
    on_device_sampling: bool = False
    """The model samples on the device and returns token ids, not logits: see the module
    docstring. Seeds, penalties, typical_p and top-n log-probabilities are unavailable."""
    kv_cache_dtype: str | None = None
    """The KV cache's element type when it differs from `dtype`."""
    mixed_steps: bool = False
    """The backend has `mixed`: a decode step and a prefill in one forward (see `MixedBackend`)."""
    prompt_logprobs: bool = True
    """`prefill` can return every prompt position's logits (`PrefillOutput.prompt_logits`), so
    prompt log-probabilities (`decoder_input_details`, `echo` with `logprobs`) can be reported."""
    max_top_k: int | None = None
    """The largest `top_k` the model honours (a compiled on-device sampler's limit); None: any."""
    compiled_step: str | None = None
    """How the torch backend's decode step is compiled (`handler/model/compiled.py`); None:
    `transformers`' modelling code runs op by op."""
    eager_reason: str | None = None
    """Why a torch backend's step is not compiled (None where it is, and on Neuron)."""
    prefix_reuse: bool = False
    """The backend is a `PrefixBackend`: a prompt may start from positions its row already holds
    (`handler/generation/prefix.py`)."""
    prefix_rows: int = 0
    """Rows beyond the slots (`batch_size ..`) that only keep prefixes: `copy_prefix` reads and
    writes them, no request runs in them."""


@dataclass
class PrefillOutput:
    """Result of a prefill over `n` rows."""

    logits: torch.Tensor
    """`[n, vocab]` float32 logits of each row's last prompt position."""
    prompt_logits: list[torch.Tensor | None]
    """Per row, `[prompt_len, vocab]` float32 logits of every prompt position, or None when not
    asked for."""


class ModelBackend(Protocol):
    """A model with a slot-addressed KV cache (see module docstring)."""

    shape: ModelShape

    def prefill(
        self,
        input_ids: list[list[int]],
        seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
    ) -> PrefillOutput:
        """Fill rows `seq_ids` with the given prompts (one list of token ids per row)."""
        ...

    def assign(self, slot: int, params: SamplingParams) -> None:
        """Record the sampling parameters of the request admitted into `slot`, before its
        prefill. Only a backend with on-device sampling uses them."""
        ...

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: list[int]
    ) -> torch.Tensor:
        """Advance rows by one token.

        input_ids: `[n]` last token of each row; position_ids: `[n]` its position (tokens so
        far - 1); returns `[n, vocab]` float32 logits.
        """
        ...


class MixedBackend(ModelBackend, Protocol):
    """A backend that can also run a decode step and a prefill as one forward
    (`ModelShape.mixed_steps`): streams then pause for the new prompts' tokens only."""

    def mixed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: list[int],
        prompts: list[list[int]],
        prompt_seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
    ) -> tuple[torch.Tensor, PrefillOutput]:
        """`decode(input_ids, position_ids, seq_ids)` and `prefill(prompts, prompt_seq_ids,
        want_prompt_logits)` at once: `[n, vocab]` decode logits and the prefill's output."""
        ...


class PrefixBackend(ModelBackend, Protocol):
    """A backend whose prefill can start after positions a row already holds
    (`ModelShape.prefix_reuse`)."""

    def copy_prefix(self, source: int, dest: int, length: int) -> None:
        """Copy positions `0 .. length - 1` of row `source`'s keys and values into row `dest`
        (rows from `batch_size` on are the `prefix_rows`)."""
        ...

    def prefill(
        self,
        input_ids: list[list[int]],
        seq_ids: list[int],
        want_prompt_logits: list[bool] | None = None,
        cached: list[int] | None = None,
    ) -> PrefillOutput:
        """As `ModelBackend.prefill`; `cached[i]`: how many of prompt `i`'s first tokens row
        `seq_ids[i]` already holds (their prompt logits are then not available)."""
        ...
