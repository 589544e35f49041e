"""optimum-neuron's entry points, faked only as far as loading goes: `from_pretrained` of an
exported model returns `FakeNeuronModel`, the fake at the model boundary, backed by the real
torch weights so that answers are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handler.testing.fake_neuron import FakeNeuronModel
from optimum.neuron.configuration_utils import NeuronConfig


class NeuronModelForCausalLM:
    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs: Any) -> FakeNeuronModel:
        from transformers import AutoModelForCausalLM

        neuron_config = NeuronConfig.from_pretrained(model_id)
        torch_model = AutoModelForCausalLM.from_pretrained(Path(model_id)).eval()
        return FakeNeuronModel(
            torch_model,
            batch_size=neuron_config.batch_size,
            sequence_length=neuron_config.sequence_length,
            on_device_sampling=neuron_config.on_device_sampling,
            tp_degree=neuron_config.tp_degree,
        )
