"""`NeuronConfig.from_pretrained`: reads `neuron_config.json` as the real one does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class NeuronConfig:
    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> SimpleNamespace:
        path = Path(model) / "neuron_config.json"
        if not path.is_file():
            raise OSError(f"{path} not found")
        return SimpleNamespace(**json.loads(path.read_text()))
