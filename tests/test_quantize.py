"""Weight-only int8 (`QUANTIZE=int8`, handler/model/compiled.py): SmolLM2's lean step with int8
weights against `transformers` in fp32 by the margin rule, a tiny model's compiled int8 package
against the same step run eagerly, and the settings that refuse it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from handler.config import read_settings
from handler.errors import ConfigError
from handler.generation.request import GenerationRequest
from handler.model import compiled
from handler.model.compiled import LeanDecode, decode_mask
from tests.conftest import PROMPTS, assert_margin_rule, start_engine
from tests.tiny_models import TINY_ENGINE, tiny_model

INT8_STEPS = 8
"""Bound of the margin rule (in bf16 rounding steps): int8 weights move SmolLM2's logits by up
to 3.1 steps over the golden prompts on AMD EPYC (bf16 weights: 1.0)."""

CPU = torch.device("cpu")


def lean_greedy(step: LeanDecode, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens of `step` run eagerly, one position per call (the prompt's too)."""
    total = len(prompt) + n
    cache = torch.zeros(
        len(step.layers), 2, 1, step.kv_heads, total, step.head_dim, dtype=step.embed.dtype
    )
    sequence, out = list(prompt), list[int]()
    with torch.inference_mode():
        for position in range(total - 1):
            at = torch.tensor([position])
            mask = decode_mask(at, max(position, 1), None, CPU)
            logits, new = step(torch.tensor([sequence[position]]), at, mask, cache)
            cache[:, :, 0, :, position] = new[:, :, 0]
            if position >= len(prompt) - 1:
                sequence.append(int(logits[0].argmax()))
                out.append(sequence[-1])
    return out


def test_int8_weights_follow_the_margin_rule(smollm2_dir: Path, reference_model, tokenizer):
    """Each weight is its int8 values times its row's scale, within half a step; the greedy
    answers of the int8 step follow `transformers` in fp32 by the margin rule."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    step = LeanDecode(model, 128, "int8").eval()
    layer = step.layers[0]
    assert layer.qkv.dtype == torch.int8 and layer.qkv_scale is not None
    original = model.model.layers[0].self_attn.o_proj.weight.float()
    restored = layer.o.float() * layer.o_scale.float()[:, None]
    assert ((restored - original).abs() <= layer.o_scale.float()[:, None] * 0.51).all()
    assert step.head.dtype == torch.int8 and step.embed.dtype == torch.bfloat16
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert_margin_rule(reference_model, ids, lean_greedy(step, ids, 24), INT8_STEPS)


def test_the_compiled_int8_step_equals_the_lean_step(compile_cache: Path, tokenizer) -> None:
    """QUANTIZE=int8 builds its own package, which computes what the int8 lean step computes
    eagerly, says so in `/info`'s `compiled_step`, and serves."""
    directory = tiny_model(compile_cache.parent, "llama", tokenizer, name="llama-int8")
    engine = start_engine(
        directory,
        **TINY_ENGINE,
        QUANTIZE="int8",
        TORCH_COMPILE="true",
        TORCH_COMPILE_CACHE=str(compile_cache),
    )
    try:
        backend = engine.backend
        assert backend.compiled is not None, backend.shape.eager_reason
        assert backend.shape.compiled_step == "inductor (AOT), int8 weights"
        assert backend.compiled.spec.quantize == "int8"
        assert "-fp32-int8-3x64-" in backend.compiled.package.parent.name
        lean = LeanDecode(backend.model, 64, "int8").eval()
        generator = torch.Generator().manual_seed(0)
        cache = torch.randn(backend.kv.shape, generator=generator)
        positions = torch.tensor([30, 12, 41])
        tokens = torch.tensor([5, 900, 40000])
        mask = decode_mask(positions, 41, None, CPU)
        with torch.inference_mode():
            got, got_new = backend.compiled(tokens, positions, mask, cache)
            want, want_new = lean(tokens, positions, mask, cache)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale, float((got - want).abs().max())
        assert torch.allclose(got_new, want_new, atol=1e-5)
        ids = tokenizer(PROMPTS[1]).input_ids
        request = GenerationRequest(ids, max_new_tokens=8, ignore_eos=True)
        tokens_out, _ = engine.generator.submit(request).result(timeout=120)
        assert len(tokens_out) == 8
    finally:
        engine.generator.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUANTIZE": "awq"}, "QUANTIZE='awq' is invalid: must be one of int8"),
        ({"QUANTIZE": "int8", "TORCH_COMPILE": "false"}, "which TORCH_COMPILE=False turns off"),
        ({"QUANTIZE": "int8", "SERVING_BACKEND": "neuron"}, "not SERVING_BACKEND=neuron's"),
        ({"QUANTIZE": "int8", "SERVING_DEVICE": "cuda"}, "not SERVING_DEVICE=cuda's"),
    ],
)
def test_quantize_settings_that_cannot_be_honoured_are_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_settings([], env)


def test_quantize_int8_is_read_from_the_flag_or_the_variable() -> None:
    assert read_settings([], {"QUANTIZE": "INT8"}).quantize == "int8"
    assert read_settings([], {"HF_MODEL_QUANTIZE": "int8"}).quantize == "int8"  # TGI on SageMaker
    assert read_settings(["--quantize", "int8"], {}).quantize == "int8"
    assert read_settings([], {}).quantize is None
    spec = compiled.PackageSpec("/nowhere", "bf16", "cpu", 4, 64)
    assert spec.key() != compiled.PackageSpec("/nowhere", "bf16", "cpu", 4, 64, "int8").key()
