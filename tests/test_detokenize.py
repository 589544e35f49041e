"""Incremental detokenization of multi-byte characters split across tokens."""

from __future__ import annotations

import pytest

from handler.generation.detokenize import IncrementalDetokenizer

TEXTS = [
    "Hello 😀 world 🎉🎉",
    "日本の首都は東京です。",
    "Mixed: naïve café 中文 👩‍👩‍👧 done",
    " leading space",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_never_break_characters_and_join_to_text(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids) or text.isascii() or "ï" in text
    prompt = tokenizer("Say:", add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_special_tokens_produce_no_text(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer.push(tokenizer.eos_token_id) == ""
    assert detokenizer.push(tokenizer("Hi", add_special_tokens=False).input_ids[0]) == "Hi"
