"""Prompt-prefix reuse: which cache row already holds the start of a new prompt.

A slot's KV row keeps its tokens' keys and values after the request that wrote them ends, until
another request is assigned the slot. A new prompt that starts with tokens some row holds (the
same system prompt, an earlier turn of the same chat, a repeated prompt) needs only its
remaining tokens computed: the held positions are copied into the new request's own row (a copy
of kilobytes per token, nothing next to a forward) and the prefill starts after them. This is
what vLLM's automatic prefix caching and llama.cpp's slot prompt cache do; here the store is the
slot rows themselves, so it costs no memory beyond the cache.

Requests go to the free slot holding their prompt when that adds no row to the decode step,
else to the lowest free slot (the decode step runs rows 0 up to the highest one decoding), so
they keep overwriting the same rows' holdings. Before a slot is overwritten, what it
holds is moved ("parked", `parking_row`) into a prefix row: rows beyond the slots that only keep
prefixes (`ModelShape.prefix_rows`, `PREFIX_CACHE_ROWS`), least recently used first out; without
them, into an idle slot.

Pure functions: no model, no threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MIN_REUSE = 16
"""Fewest held tokens worth a reuse (unless the whole prompt but its last token is held): a
prompt whose prefix is reused runs its own forward instead of joining the packed prefill."""


@dataclass(frozen=True)
class Reuse:
    """Where a new prompt's first `length` tokens are held."""

    source: int
    """The row holding them (the new request's own row when it already does)."""
    length: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens `a` and `b` share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def best_reuse(
    prompt: Sequence[int], target: int, held: Mapping[int, Sequence[int]]
) -> Reuse | None:
    """The row of `held` (row -> the tokens whose keys and values it holds, from position 0)
    sharing the longest prefix with `prompt`, for a request going to row `target`; None when no
    row holds enough (`MIN_REUSE`). At least the prompt's last token is left to compute: its
    logits choose the first new token. Ties go to `target` itself (no copy), then the lowest row."""
    most = len(prompt) - 1
    best: Reuse | None = None
    for row in sorted(held, key=lambda r: (r != target, r)):
        length = min(common_prefix(prompt, held[row]), most)
        if best is None or length > best.length:
            best = Reuse(row, length)
    if best is None or best.length < min(MIN_REUSE, most) or best.length < 1:
        return None
    return best


def parking_row(idle: Mapping[int, Sequence[int]], released: Mapping[int, int]) -> int | None:
    """Where to park a holding among `idle` rows (row -> what it holds; `released[row]`: when
    it was last released, higher is later): a row holding nothing (the highest first: low rows
    are taken first by requests), else the one released longest ago; None without idle rows."""
    if not idle:
        return None
    empty = [row for row, tokens in idle.items() if not tokens]
    if empty:
        return max(empty)
    return min(idle, key=lambda row: (released.get(row, -1), row))
