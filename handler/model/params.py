"""What a model backend knows of a request's token choice: its sampling parameters.

The model layer and the generation layer above it both read them; they live here, with the model
interface, so that imports point one way (generation -> model).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request token choice parameters (TGI generate parameters)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    min_p: float = 0.0
    """0: off. Keep tokens at least `min_p` times as likely as the most likely one."""
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    top_n_tokens: int = 0
    """Alternatives reported with each token (their log-probabilities)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, value) pairs added to the logits before anything else (OpenAI `logit_bias`)."""
    min_tokens: int = 0
    """Tokens generated before an end token (EOS, `stop_token_ids`) or stop sequence may end it."""
    logprobs: bool = True
    """Report each chosen token's log-probability (TGI always does; OpenAI when `logprobs` is
    asked for). Without it the token selector skips the normaliser, a full pass over the row."""

    @property
    def sampling(self) -> bool:
        """TGI samples when asked, or when any distribution warper is set."""
        return (
            self.do_sample
            or self.temperature != 1.0
            or self.top_k > 0
            or self.top_p < 1.0
            or self.min_p > 0.0
            or self.typical_p < 1.0
        )

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )
