"""Incremental detokenization that never emits a broken UTF-8 character.

Byte-level tokenizers split emoji and CJK characters across tokens; decoding a partial sequence
yields U+FFFD. Text is held back while the decoded tail ends with an incomplete character, and a
few preceding tokens are decoded along with the new ones so that tokenizers that drop a leading
space at the start of a sequence still produce it. Special tokens produce no text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text pieces."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        """A fast tokenizer's `tokenizers.Tokenizer`: decoding through it directly is what
        `decode` does for a fast tokenizer, less a quarter of the cost per token."""
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.prefix_text = self._decode(self.ids)

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return str(self.backend.decode(ids, skip_special_tokens=True))
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add a generated token; return the new printable text (possibly empty)."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(self.prefix_text) and not text.endswith(REPLACEMENT):
            piece = text[len(self.prefix_text) :]
            # The decoded prefix only changes when the offsets move: keep it instead of decoding
            # it again at every token.
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            return piece
        return ""
