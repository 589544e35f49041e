"""`NeuronBackend` over `FakeNeuronModel` (the optimum-neuron forward contract with real SmolLM2
logits) against `transformers`: greedy tokens alone and in a busy batch, rows out of seq_id
order, on-device sampling, and the contract checks of the fake itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from handler.errors import ConfigError
from handler.generation.generator import Generator, eos_token_ids
from handler.generation.request import GenerationRequest
from handler.model.neuron_backend import NeuronBackend
from handler.model.params import SamplingParams
from handler.testing.fake_neuron import (
    CONTEXT_ENCODING,
    TOKEN_GENERATION,
    FakeNeuronModel,
    ForwardContractError,
    device_sample,
)
from tests.conftest import PROMPTS, reference_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_model(smollm2_dir: Path) -> PreTrainedModel:
    """The model the fakes compute with (fp32), separate from the reference model."""
    return AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@contextmanager
def neuron_generator(
    torch_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 4,
    on_device_sampling: bool = False,
) -> Iterator[tuple[Generator, FakeNeuronModel]]:
    fake = FakeNeuronModel(torch_model, batch_size, 96, on_device_sampling=on_device_sampling)
    generator = Generator(
        NeuronBackend(fake),
        tokenizer,
        eos_token_ids=eos_token_ids(tokenizer, torch_model.generation_config),
    )
    generator.start()
    try:
        yield generator, fake
    finally:
        generator.stop()


def tokens_of(generator: Generator, request: GenerationRequest) -> list[int]:
    tokens, _ = generator.submit(request).result(timeout=120)
    return [t.token.id for t in tokens]


def reference_last_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """`[vocab]` logits of the last position of `ids` alone."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_shape_comes_from_the_neuron_config(torch_model: PreTrainedModel) -> None:
    fake = FakeNeuronModel(torch_model, 4, 96, on_device_sampling=True)
    shape = NeuronBackend(fake).shape
    assert (shape.batch_size, shape.sequence_length, shape.vocab_size) == (4, 96, 49152)
    assert (shape.device, shape.dtype, shape.on_device_sampling) == ("neuron", "float32", True)
    assert not NeuronBackend(FakeNeuronModel(torch_model, 2, 32)).shape.on_device_sampling
    fake.neuron_config.continuous_batching = False
    with pytest.raises(ConfigError, match="continuous batching"):
        NeuronBackend(fake)


def test_greedy_matches_transformers_alone(
    torch_model: PreTrainedModel, reference_model, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = [tokenizer(p).input_ids for p in (PROMPTS[0], PROMPTS[2], PROMPTS[6])]
    prompts.append([tokenizer.bos_token_id])  # one token: the runtime's padding must not answer
    with neuron_generator(torch_model, tokenizer) as (generator, _):
        for i, prompt_ids in enumerate(prompts):
            max_new = 8 + 2 * i
            expected = reference_greedy(reference_model, prompt_ids, max_new)
            assert tokens_of(generator, GenerationRequest(prompt_ids, max_new)) == expected


def test_greedy_matches_transformers_in_busy_batch(
    torch_model: PreTrainedModel, reference_model, tokenizer: PreTrainedTokenizerBase
) -> None:
    """8 requests of mixed prompt lengths and budgets through 4 slots at once."""
    jobs = [(tokenizer(PROMPTS[i]).input_ids, 6 + (i * 3) % 10) for i in range(7)]
    jobs.insert(2, ([tokenizer.bos_token_id], 9))
    expected = [reference_greedy(reference_model, ids, n) for ids, n in jobs]
    with neuron_generator(torch_model, tokenizer) as (generator, fake):
        handles = [generator.submit(GenerationRequest(ids, n)) for ids, n in jobs]
        assert generator.in_flight > 4
        for handle, want in zip(handles, expected):
            tokens, _ = handle.result(timeout=120)
            assert [t.token.id for t in tokens] == want
    prefills = [call for call in fake.calls if call.graph == CONTEXT_ENCODING]
    decodes = [call for call in fake.calls if call.graph == TOKEN_GENERATION]
    assert any(len(call.seq_ids) > 1 for call in prefills)
    assert all(call.seq_ids == [0, 1, 2, 3] for call in decodes)
    assert len(fake.calls) == len(prefills) + len(decodes)


def test_rows_out_of_seq_id_order_come_back_in_callers_order(
    torch_model: PreTrainedModel, reference_model, tokenizer: PreTrainedTokenizerBase
) -> None:
    fake = FakeNeuronModel(torch_model, 4, 64)
    backend = NeuronBackend(fake)
    prompts = [
        tokenizer(PROMPTS[1]).input_ids,  # slot 3
        [tokenizer.bos_token_id],  # slot 0
        tokenizer(PROMPTS[4]).input_ids,  # slot 2
    ]
    slots = [3, 0, 2]
    output = backend.prefill(prompts, slots, [True, False, False])
    assert output.logits.shape == (3, 49152) and output.logits.dtype == torch.float32
    assert output.prompt_logits == [None, None, None]  # 0.4.x returns the last position only
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(
            output.logits[row], reference_last_logits(reference_model, ids), atol=1e-3, rtol=0
        )
    call = fake.calls[-1]
    assert call.seq_ids == [0, 2, 3] and call.input_ids.shape == (3, 64)
    assert call.position_ids[0].tolist() == [0] * 64  # the one-token prompt of slot 0
    length = len(prompts[2])
    assert call.position_ids[1].tolist() == [*range(length), *[0] * (64 - length)]

    sequences = [[*ids, int(output.logits[row].argmax())] for row, ids in enumerate(prompts)]
    by_slot = dict(zip(slots, sequences))
    for order in ([2, 3, 0], [0, 3], [3]):
        last = torch.tensor([by_slot[s][-1] for s in order])
        positions = torch.tensor([len(by_slot[s]) - 1 for s in order])
        logits = backend.decode(last, positions, order)
        assert logits.shape == (len(order), 49152)
        for row, slot in enumerate(order):
            torch.testing.assert_close(
                logits[row],
                reference_last_logits(reference_model, by_slot[slot]),
                atol=1e-3,
                rtol=0,
            )
            by_slot[slot] = [*by_slot[slot], int(logits[row].argmax())]
    # Slot 2 was left out of the last two steps: decoding the others did not touch its row.
    last = torch.tensor([by_slot[2][-1]])
    logits = backend.decode(last, torch.tensor([len(by_slot[2]) - 1]), [2])
    torch.testing.assert_close(
        logits[0], reference_last_logits(reference_model, by_slot[2]), atol=1e-3, rtol=0
    )


def test_on_device_sampling(
    torch_model: PreTrainedModel, reference_model, tokenizer: PreTrainedTokenizerBase
) -> None:
    greedy = tokenizer(PROMPTS[0]).input_ids
    top_1 = tokenizer(PROMPTS[3]).input_ids
    sampled = tokenizer(PROMPTS[5]).input_ids
    with neuron_generator(torch_model, tokenizer, on_device_sampling=True) as (generator, fake):
        handles = [
            generator.submit(GenerationRequest(greedy, 10, SamplingParams())),
            generator.submit(
                GenerationRequest(
                    top_1, 10, SamplingParams(do_sample=True, top_k=1, temperature=0.7)
                )
            ),
            generator.submit(
                GenerationRequest(
                    sampled, 10, SamplingParams(do_sample=True, top_p=0.9, temperature=0.8)
                )
            ),
        ]
        results = [handle.result(timeout=120) for handle in handles]
    for (tokens, _), prompt_ids in zip(results[:2], (greedy, top_1)):
        assert [t.token.id for t in tokens] == reference_greedy(reference_model, prompt_ids, 10)
    for tokens, final in results:
        assert all(t.token.logprob is None and t.top_tokens == [] for t in tokens)
        assert final.seed is None
        assert all(0 <= t.token.id < 49152 for t in tokens)
    rows = {}
    for call in fake.calls:
        if call.graph == CONTEXT_ENCODING:
            for row, seq_id in enumerate(call.seq_ids):
                rows[seq_id] = call.sampling_params[row].tolist()
    # Greedy is top_k 1; no top_k samples among the compiled max_topk (256) candidates.
    assert {tuple(round(v, 4) for v in row) for row in rows.values()} == {
        (1.0, 1.0, 1.0),
        (1.0, 1.0, 0.7),
        (256.0, 0.9, 0.8),
    }


def test_fake_refuses_what_the_compiled_model_would_not_take(torch_model: PreTrainedModel) -> None:
    fake = FakeNeuronModel(torch_model, 4, 32, on_device_sampling=True)
    ids = torch.tensor([[1, 504, 2390, 0], [1, 19556, 28, 957]])
    positions = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 3]])
    greedy = torch.ones(2, 3)

    def call(**changes: object) -> torch.Tensor:
        kwargs = {"position_ids": positions, "seq_ids": torch.tensor([0, 2])}
        kwargs["sampling_params"] = greedy
        kwargs.update(changes)
        return fake(kwargs.pop("input_ids", ids), **kwargs)

    assert call().shape == (2,) and call().dtype == torch.int32  # token ids, as on the device
    with pytest.raises(ForwardContractError, match="sorted by seq_id"):
        call(seq_ids=torch.tensor([2, 0]))
    with pytest.raises(ForwardContractError, match="sampling_params"):
        call(sampling_params=None)
    with pytest.raises(ForwardContractError, match="int32 or int64"):
        call(input_ids=ids.float())
    with pytest.raises(ValueError, match="top-k"):
        call(sampling_params=torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    # A one-token prompt padded only to the longest prompt: the runtime pads positions with 1
    # up to max_context_length, and the row would be answered from that padding.
    with pytest.raises(ForwardContractError, match="padding"):
        call(seq_ids=torch.tensor([1, 3]), position_ids=torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3]]))
    with pytest.raises(ForwardContractError, match="no compiled graph"):
        call(seq_ids=torch.tensor([1, 3]), position_ids=positions + 5)


@pytest.mark.parametrize("tie_break", ["first", "last"])
def test_one_token_prompt_whichever_equal_position_the_device_answers_from(
    torch_model: PreTrainedModel, reference_model, tie_break: str
) -> None:
    """A one-token prompt has every position 0: the device's `torch.max` may answer from any
    index. The padding repeats the prompt's token, so every index gives the prompt's answer."""
    fake = FakeNeuronModel(torch_model, 2, 48, tie_break=tie_break)
    backend = NeuronBackend(fake)
    for token in (1, 504):
        output = backend.prefill([[token]], [1])
        torch.testing.assert_close(
            output.logits[0], reference_last_logits(reference_model, [token]), atol=1e-3, rtol=0
        )
        following = int(output.logits[0].argmax())
        logits = backend.decode(torch.tensor([following]), torch.tensor([1]), [1])
        torch.testing.assert_close(
            logits[0],
            reference_last_logits(reference_model, [token, following]),
            atol=1e-3,
            rtol=0,
        )


def test_host_sampling_logits_are_padded_to_a_multiple_of_tp_degree(
    torch_model: PreTrainedModel, reference_model, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The compiled lm_head pads the vocabulary to a multiple of tp_degree and writes the
    float32 minimum there; the backend returns the model's vocabulary only."""
    fake = FakeNeuronModel(torch_model, 2, 32, tp_degree=5)  # 49152 -> 49155
    ids = tokenizer(PROMPTS[0]).input_ids
    raw = fake(
        torch.tensor([ids + [ids[0]] * (32 - len(ids))]),
        position_ids=torch.tensor([[*range(len(ids)), *[0] * (32 - len(ids))]]),
        seq_ids=torch.tensor([0]),
        sampling_params=torch.ones(1, 3),
    )
    assert raw.shape == (1, 1, 49155) and raw.dtype == torch.float32
    assert bool((raw[0, 0, 49152:] == torch.finfo(torch.float32).min).all())
    backend = NeuronBackend(FakeNeuronModel(torch_model, 2, 32, tp_degree=5))
    logits = backend.prefill([ids], [0]).logits
    assert logits.shape == (1, 49152)
    torch.testing.assert_close(
        logits[0], reference_last_logits(reference_model, ids), atol=1e-3, rtol=0
    )


def test_context_encoding_writes_the_whole_padded_slab(torch_model: PreTrainedModel) -> None:
    """As the KV cache manager does (`dynamic_update_slice` of `max_context_length`
    positions): the positions after the prompt hold the padding's states, which decode must
    overwrite before it reads them."""
    fake = FakeNeuronModel(torch_model, 2, 40, max_context_length=24)
    NeuronBackend(fake).prefill([[1, 504, 2390]], [1])
    keys = fake.rows.cache.keys[0]
    assert bool((keys[1, :, :24] != 0).any(dim=-1).all())  # every slab position written
    assert bool((keys[1, :, 24:] == 0).all()) and bool((keys[0] == 0).all())


def test_on_device_sampler_takes_the_argmax_for_top_k_1_and_stays_in_top_k() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    params = torch.tensor([[1.0, 1.0, 1.0], [5.0, 0.9, 0.7], [1.0, 1.0, 0.3], [3.0, 1.0, 2.0]])
    for seed in range(20):
        uniform = torch.rand((4, 1), generator=torch.Generator().manual_seed(seed))
        ids = device_sample(logits, params, 50, uniform)
        assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
        assert int(ids[1]) in logits[1].topk(5).indices.tolist()
        assert int(ids[3]) in logits[3].topk(3).indices.tolist()
