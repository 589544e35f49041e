"""Grammar-constrained decoding: which tokens a request may choose next.

A request that must follow a JSON schema, a regex, a choice of strings or a Lark grammar
carries a `Constraint`: an llguidance matcher compiled in the request thread (so an invalid
schema is a 422 before anything is queued, and compiling never stalls the scheduler thread),
then advanced one token at a time by the token selector on the scheduler thread. Each step the
selector asks every constrained row for its allowed set, as a bitmask (`[words]` int32, one bit
per token id), computed for all rows at once by llguidance's thread pool with the GIL released,
on a worker thread while the model runs the step's forward (`TokenSelector.prepare`).

llguidance reads the tokenizer's own vocabulary (`GrammarCompiler`, built once per tokenizer,
about 0.3 s for a 49k vocabulary). Its end-of-sequence token stands for every token that ends
the request (EOS ids, `stop_token_ids`): the selector allows them exactly when the grammar may
end, and a grammar that cannot go on ends the request (`Constraint.finished`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance

from handler.errors import ValidationError

if TYPE_CHECKING:
    import torch
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerBase

__all__ = ["Constraint", "GrammarCompiler", "compiler_for", "fill_masks"]

JSON_STYLE: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""JSON is written as `json.dumps` writes it by default: no free whitespace, so that a small
model cannot fill its budget with newlines inside an object (vLLM's `disable_any_whitespace`).
`guided_whitespace_pattern` replaces this with flexible whitespace of that pattern."""


class Constraint:
    """One request's grammar state. Only the scheduler thread touches it once it is queued."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int, description: str) -> None:
        self.matcher = matcher
        self.eos_id = eos_id
        """llguidance's end token: allowed when the grammar may end."""
        self.description = description
        """What the request asked for (`json schema`, `regex`...), for messages and logs."""

    @property
    def finished(self) -> bool:
        """The grammar takes no more tokens (it ended, or the model left it: see `failed`)."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()

    def consume(self, token_id: int) -> None:
        """Advance past the chosen token (an end token counts as llguidance's EOS)."""
        self.matcher.consume_token(token_id)

    def copy(self) -> Constraint:
        """An independent copy in the same state (one per choice of an `n` > 1 request)."""
        return Constraint(self.matcher.deep_copy(), self.eos_id, self.description)


class GrammarCompiler:
    """Compiles grammars against one tokenizer's vocabulary."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        """`vocab_size`: the width of the model's logits (at least the tokenizer's)."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValidationError(
                "structured output needs an end-of-sequence token and this model's tokenizer "
                "has none"
            )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValidationError(
                "structured output needs a fast (`tokenizers`) tokenizer, and this model has a "
                "slow one"
            )
        self.vocab_size = vocab_size
        self.eos_id = int(eos)
        self.tokenizer = llguidance.LLTokenizer(
            _llguidance_json(backend.to_str()), n_vocab=vocab_size, eos_token=self.eos_id
        )
        probe = 'Grammar {"a": [1, -2.5e3]} héllo 日本\n\t x'
        ids = tokenizer(probe, add_special_tokens=False).input_ids
        self.faithful = self.tokenizer.decode_bytes(ids) == probe.encode()
        """llguidance reads the vocabulary's bytes as the tokenizer decodes them."""

    def json_schema(
        self, schema: Any, name: str, whitespace_pattern: str | None = None
    ) -> Constraint:
        """A JSON value valid against `schema` (a dict, or `True` for any JSON value)."""
        if schema is True or schema == {}:
            schema = {}
        elif not isinstance(schema, dict):
            raise ValidationError(f"`{name}` must be a JSON schema (an object)")
        style: JsonCompileOptions = JSON_STYLE
        if whitespace_pattern is not None:
            style = {"whitespace_flexible": True, "whitespace_pattern": whitespace_pattern}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=style)
        except ValueError as exc:
            raise ValidationError(f"`{name}` is not a valid JSON schema: {exc}") from None
        return self.compile(grammar, name, "JSON schema")

    def regex(self, pattern: str, name: str) -> Constraint:
        """Text that the regex matches in full."""
        return self.compile(llguidance.LLMatcher.grammar_from_regex(pattern), name, "regex")

    def choice(self, choices: Sequence[str], name: str) -> Constraint:
        """Exactly one of the strings."""
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValidationError(f"`{name}` must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(c) for c in choices)
        return self.compile(llguidance.LLMatcher.grammar_from_lark(lark), name, "choice")

    def lark(self, text: str, name: str) -> Constraint:
        """A Lark grammar (llguidance's dialect); GBNF (llama.cpp) is converted to it."""
        try:
            grammar = llguidance.grammar_from("grammar", text)
        except ValueError as exc:
            raise ValidationError(f"`{name}` is not a valid grammar: {exc}") from None
        return self.compile(grammar, name, "grammar")

    def compile(self, grammar: str, name: str, kind: str) -> Constraint:
        """A matcher for an llguidance grammar; a 422 naming `name` when it does not compile."""
        if not self.faithful:
            raise ValidationError(
                f"`{name}` is not available for this model: llguidance does not read its "
                "tokenizer's vocabulary as the tokenizer decodes it"
            )
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValidationError(f"`{name}` is not a valid {kind}: {_first_line(matcher)}")
        return Constraint(matcher, self.eos_id, kind)


_executor: llguidance.LLExecutor | None = None


def fill_masks(constraints: Sequence[Constraint], bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` (`[n, words]` int32, contiguous, on the CPU) := the tokens
    `constraints[i]` allows next, one bit per token id. Rows run in parallel on llguidance's
    thread pool, without the GIL."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    matchers = [(c.matcher, i) for i, c in enumerate(constraints)]
    words = bitmask.shape[1]
    _executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(bitmask))


def _first_line(matcher: llguidance.LLMatcher) -> str:
    """llguidance's message, without the grammar dump that may follow it."""
    message = matcher.get_error().strip()
    return message if len(message) <= 300 else message[:297] + "..."


def _llguidance_json(tokenizer_json: str) -> str:
    """The tokenizer as llguidance should read it. Some converted tokenizers (GGUF exports such
    as the bundled SmolLM2) wrap a byte-level decoder in a `Sequence` with `ByteFallback`;
    llguidance then takes the `Ġ` of byte-level tokens for literal characters. The byte-level
    decoder alone decodes them as the tokenizer does."""
    document = json.loads(tokenizer_json)
    decoder = document.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        levels = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if levels:
            document["decoder"] = levels[0]
            return json.dumps(document)
    return tokenizer_json


_compilers: dict[int, tuple[PreTrainedTokenizerBase, GrammarCompiler]] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> GrammarCompiler:
    """The compiler of a loaded tokenizer, built on first use (once per tokenizer)."""
    key = id(tokenizer)
    with _compilers_lock:
        held = _compilers.get(key)
        if held is None or held[0] is not tokenizer or held[1].vocab_size != vocab_size:
            held = (tokenizer, GrammarCompiler(tokenizer, vocab_size))
            _compilers[key] = held
        return held[1]
