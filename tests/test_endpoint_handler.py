"""`handler.EndpointHandler`: the Inference Endpoints custom-handler convention."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from handler import EndpointHandler
from handler.errors import ValidationError
from tests.conftest import PROMPTS, RunningServer


@pytest.fixture(scope="module")
def endpoint(smollm2_dir: Path) -> Iterator[EndpointHandler]:
    loaded = EndpointHandler(
        str(smollm2_dir),
        environ={
            "MAX_BATCH_SIZE": "2",
            "MAX_TOTAL_TOKENS": "512",
            "HF_AUTO_CAST_TYPE": "fp32",
            "TORCH_COMPILE": "false",  # tests/test_compiled.py covers the compiled step
        },
    )
    yield loaded
    loaded.close()


def test_answers_like_post_root(endpoint: EndpointHandler, server: RunningServer) -> None:
    data = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 8, "details": True}}
    answer = endpoint(data)
    expected = requests.post(f"{server.url}/", json=data, timeout=120).json()
    assert isinstance(answer, list) and len(answer) == 1
    assert answer[0]["generated_text"] == expected[0]["generated_text"]
    ours, theirs = answer[0]["details"]["tokens"], expected[0]["details"]["tokens"]
    # The same tokens; log-probabilities to fp32 kernel rounding (the server batches its rows
    # differently, and a product's kernel depends on its row count).
    assert [{**t, "logprob": None} for t in ours] == [{**t, "logprob": None} for t in theirs]
    assert [t["logprob"] for t in ours] == pytest.approx([t["logprob"] for t in theirs], abs=1e-4)
    assert answer[0]["details"]["finish_reason"] == "length"


def test_bad_input_raises_a_validation_error(endpoint: EndpointHandler) -> None:
    with pytest.raises(ValidationError) as raised:
        endpoint({"inputs": PROMPTS[1], "parameters": {"top_p": 2.0}})
    assert raised.value.status == 422 and "top_p" in raised.value.message
