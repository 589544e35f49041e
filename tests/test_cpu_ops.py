"""The compiled step's fused attention on CPU (handler/model/cpu_ops.py,
handler/model/decode_attention.cpp) against attention written out in fp64, and its fallback.

The golden tests of the compiled step (tests/test_compiled.py) run SmolLM2 through it end to end;
these cover what SmolLM2 does not: other group sizes and head sizes, sliding windows, padding
rows, refused inputs. Exact equality is asserted nowhere: fp32 within 1e-5 of fp64, bf16 and fp16
within their rounding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from handler.model import compiled, cpu_ops


@pytest.fixture(scope="module")
def operator(compile_cache: Path):
    """`torch.ops.hfns.decode_attention`, built (once per machine) and loaded."""
    reason = cpu_ops.supported(64, 8, 2, "cpu")
    if reason:
        pytest.skip(reason)
    cpu_ops.ensure(compile_cache)
    return torch.ops.hfns.decode_attention


def reference(q, k_new, v_new, cache, layer, positions, window, scale) -> torch.Tensor:
    """Row by row in fp64: each query head over its key head's cached keys in the window before
    its position, then its own key. -> `[b, heads, d]`."""
    b, heads, dim = q.shape
    kv_heads = k_new.shape[1]
    group = heads // kv_heads
    out = torch.empty(b, heads, dim, dtype=torch.float64)
    for row in range(b):
        p = int(positions[row])
        start = max(0, p - window + 1) if window else 0
        for head in range(heads):
            h = head // group
            keys = torch.cat([cache[layer, 0, row, h, start:p], k_new[row, h][None]]).double()
            values = torch.cat([cache[layer, 1, row, h, start:p], v_new[row, h][None]]).double()
            weights = torch.softmax(keys @ q[row, head].double() * scale, dim=0)
            out[row, head] = weights @ values
    return out


def inputs(
    b: int, heads: int, kv_heads: int, dim: int, positions: list[int], dtype: torch.dtype
) -> tuple:
    """A cache of 3 layers and b + 2 slots of 48 positions, the rows' step inputs."""
    generator = torch.Generator().manual_seed(b * 1000 + heads * 10 + dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    cache = randn(3, 2, b + 2, kv_heads, 48, dim)
    return (
        randn(b, heads, dim),
        randn(b, kv_heads, dim),
        randn(b, kv_heads, dim),
        cache,
        torch.tensor(positions, dtype=torch.long),
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 1, 128), (16, 2, 64)]
)
@pytest.mark.parametrize("window", [0, 5])
def test_fp32_follows_attention_in_fp64(operator, heads, kv_heads, dim, window) -> None:
    """Rows of different lengths (one at position 0, a padding row: its own key only), query
    groups of 1 to 8 heads, each supported head size, with and without a sliding window."""
    positions = [0, 1, 7, 30, 47]
    q, k, v, cache, pos = inputs(len(positions), heads, kv_heads, dim, positions, torch.float32)
    got = operator(q, k, v, cache, 2, pos, window, dim**-0.5)
    want = reference(q, k, v, cache, 2, pos, window, dim**-0.5)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_reads_the_cache_in_its_type(operator, dtype) -> None:
    """The cache and the step in bf16 or fp16, fp32 inside: the result is the fp64 attention over
    the same (rounded) inputs, rounded once."""
    positions = [3, 47, 12]
    q, k, v, cache, pos = inputs(len(positions), 9, 3, 64, positions, dtype)
    got = operator(q, k, v, cache, 0, pos, 0, 0.125)
    want = reference(q, k, v, cache, 0, pos, 0, 0.125)
    assert got.dtype == dtype
    tolerance = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


def test_the_graph_attention_and_the_operator_agree(operator) -> None:
    """`LeanDecode._attend` (inductor's attention, over the longest row with a mask) and the
    operator (each row over its own keys) on the same rows, in fp32."""
    positions = [5, 40, 1, 22]
    q, k, v, cache, pos = inputs(len(positions), 9, 3, 64, positions, torch.float32)
    length = max(positions)
    mask = compiled.decode_mask(pos, length, None, torch.device("cpu"))
    step = compiled.LeanDecode.__new__(compiled.LeanDecode)
    step.heads, step.kv_heads, step.head_dim, step.scaling = 9, 3, 64, 0.125
    keys = cache[1, 0, : len(positions), :, :length]
    values = cache[1, 1, : len(positions), :, :length]
    masked = compiled.LeanDecode._attend(step, q, k, v, keys, values, mask)
    fused = operator(q, k, v, cache, 1, pos, 0, 0.125).reshape(len(positions), -1)
    torch.testing.assert_close(fused, masked, rtol=1e-5, atol=1e-5)


def test_inputs_it_cannot_serve_are_refused(operator) -> None:
    """A position outside the cache, mixed dtypes, another head size or a missing layer raise
    before any memory is read."""
    q, k, v, cache, pos = inputs(2, 4, 2, 32, [3, 4], torch.float32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        operator(q, k, v, cache, 0, torch.tensor([3, 48]), 0, 1.0)
    with pytest.raises(RuntimeError, match="dtypes disagree"):
        operator(q.bfloat16(), k, v, cache, 0, pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="no layer"):
        operator(q, k, v, cache, 3, pos, 0, 1.0)
    small = inputs(2, 4, 2, 16, [3, 4], torch.float32)
    if cpu_ops.supported(16, 4, 2, "cpu"):  # 16 is a head size only where vectors are 8 wide
        with pytest.raises(RuntimeError, match="head_dim 16"):
            operator(*small[:4], 0, small[4], 0, 1.0)


def test_what_it_does_not_serve() -> None:
    assert "CPU" in (cpu_ops.supported(64, 9, 3, "cuda:0") or "")
    assert "at most 8" in (cpu_ops.supported(64, 32, 2, "cpu") or "")
    assert "head_dim 48" in (cpu_ops.supported(48, 8, 8, "cpu") or "")


def test_a_library_that_does_not_build_leaves_inductors_attention(
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The step is still compiled, with the graph's own attention, and the log says why."""
    from transformers import AutoConfig

    def broken(root: Path) -> Path:
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpu_ops, "ensure", broken)
    config = AutoConfig.from_pretrained(smollm2_dir)
    spec = compiled.PackageSpec(str(smollm2_dir), "fp32", "cpu", 2, 64, attention="fused")
    with caplog.at_level(logging.WARNING):
        chosen, library = compiled._choose_attention(spec, tmp_path, config)
    assert chosen.attention == "inductor" and library is None
    assert "no C++ compiler here" in caplog.text
    assert chosen.key() != spec.key()
    off = compiled.PackageSpec(str(smollm2_dir), "fp32", "cpu", 2, 64)
    assert compiled._choose_attention(off, tmp_path, config) == (off, None)
