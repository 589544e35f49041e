"""Security: the API key check, what errors may say, remote code, and which files a request can
make the server read.

On the real server: the API key guards every route but health checks, and never appears in
the log (`test_server_errors.py`); HF_TOKEN and prompts never appear in answers or the log, the
OpenAI `model` field is only echoed, and thousands of fuzzed error bodies hold no traceback or
prompt (`test_fuzz.py`). Here, in-process, what needs a spy, an injected bug or an audit hook.
"""

from __future__ import annotations

import hmac
import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
import transformers.dynamic_module_utils
from flask.testing import FlaskClient

from handler.api import tgi
from handler.config import read_settings
from handler.engine import Engine, build_torch_engine
from handler.errors import ConfigError
from handler.model import compiled
from handler.model.resolve import resolve_model
from handler.server import app as app_module
from handler.server.app import create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState, Stage
from tests.conftest import PROMPTS

pytestmark = pytest.mark.slow

MARKER = "quokka"
PROMPT = f"Zanzibar {MARKER} orchestra"
PATH_LIKE_MODELS = [
    "../../etc/passwd",
    "/etc/passwd",
    "~/.ssh/id_rsa",
    "file:///etc/shadow",
    "..\\..\\windows\\win.ini",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
]


def client_for(engine: Engine | None, **env: str) -> FlaskClient:
    """The app on `engine` (ready), or on no engine (loading) with settings from `env`."""
    state = ServerState(engine.settings if engine else read_settings([], env))
    if engine is not None:
        state.engine = engine
        state.stage = Stage.READY
    return create_app(state, Metrics()).test_client()


# --- the API key --------------------------------------------------------------------------------


def test_the_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def spy(supplied: bytes, expected: bytes) -> bool:
        compared.append((supplied, expected))
        return constant_time(supplied, expected)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    client = client_for(None, API_KEY="k-123")
    assert client.get("/info", headers={"Authorization": "Bearer k-124"}).status_code == 401
    assert client.get("/info", headers={"Authorization": "Bearer k-123"}).status_code == 200
    assert client.get("/info").status_code == 401
    assert compared == [
        (b"Bearer k-124", b"Bearer k-123"),
        (b"Bearer k-123", b"Bearer k-123"),
        (b"", b"Bearer k-123"),
    ]
    assert client.get("/ping").status_code == 503  # health checks need no key (still loading)
    assert len(compared) == 3


# --- what an error may say ----------------------------------------------------------------------


def test_a_bug_answers_a_generic_500_without_the_prompt_or_a_traceback(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"bug while handling {PROMPT!r}")

    monkeypatch.setattr(tgi, "validate", broken)
    client = client_for(engine)
    for path in ("/generate", "/generate_stream", "/", "/invocations"):
        response = client.post(path, json={"inputs": PROMPT})
        assert response.status_code == 500, path
        assert response.json == {"error": "Internal server error", "error_type": "server_error"}


def test_a_bug_inside_a_stream_ends_it_with_a_generic_error_event(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(token: Any) -> Any:
        raise RuntimeError(f"bug while formatting {PROMPT!r}")

    monkeypatch.setattr(tgi, "token", broken)
    client = client_for(engine)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 30}}
    text = client.post("/generate_stream", json=body).data.decode()
    assert text.endswith('data: {"error":"Internal server error","error_type":"server_error"}\n\n')
    assert MARKER not in text and "Traceback" not in text
    deadline = time.monotonic() + 10  # the abandoned request's slot is freed at the next step
    while engine.generator.active_slots and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.generator.active_slots == 0


def test_a_model_fault_names_its_type_not_its_message(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise ValueError(f"device fault while computing {PROMPT!r}")

    monkeypatch.setattr(engine.backend, "prefill", broken)
    # Not a prompt sent before: a row holding all of it but its last token would run that
    # token in a decode step instead of a prefill.
    response = client_for(engine).post("/generate", json={"inputs": f"{PROMPT}, once more"})
    assert response.status_code == 424
    assert "prefill step raised ValueError" in response.json["error"]
    assert MARKER not in response.text and "Traceback" not in response.text


# --- remote code ---------------------------------------------------------------------------------

EVIL = """
from pathlib import Path
Path({ran!r}).write_text(__name__)
raise RuntimeError("remote code ran")
"""


@pytest.fixture
def shipped_code(smollm2_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """SmolLM2 with code of its own named in `auto_map` (config and tokenizer) that leaves a
    file behind when it runs. Returns the model directory and that file."""
    model = tmp_path / "model-with-code"
    model.mkdir()
    for item in smollm2_dir.iterdir():
        (model / item.name).symlink_to(item)
    ran = tmp_path / "remote-code-ran"
    for name in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (model / f"{name}.py").write_text(EVIL.format(ran=str(ran)))
    for name, key, value in (
        (
            "config.json",
            "auto_map",
            {
                "AutoConfig": "configuration_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilModel",
            },
        ),
        ("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["tokenization_evil.Evil", None]}),
    ):
        config = json.loads((smollm2_dir / name).read_text())
        (model / name).unlink()
        (model / name).write_text(json.dumps({**config, key: value}))
    return model, ran


def test_a_model_that_ships_code_is_served_without_running_it(
    shipped_code: tuple[Path, Path],
) -> None:
    """Loaded eagerly (the compiled step's build, which loads the model again, is the next
    test: compiling SmolLM2 here would cost this test two minutes)."""
    model, ran = shipped_code
    environ = {"HF_MODEL_ID": str(model), "MAX_TOTAL_TOKENS": "64", "TORCH_COMPILE": "false"}
    settings = read_settings([], environ)
    assert settings.trust_remote_code is False
    imported = set(sys.modules)
    engine = build_torch_engine(settings, resolve_model(settings).path, start=False)
    assert type(engine.backend.model).__name__ == "LlamaForCausalLM"
    assert not ran.exists()
    assert not [name for name in set(sys.modules) - imported if "evil" in name]


class _Loaded(Exception):
    """Raised where the compiled step's build has loaded the model, to end it there."""


def test_the_compiled_steps_build_loads_the_model_without_running_its_code(
    shipped_code: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`build_package` loads the model with `transformers` (then exports and compiles it); the
    build is stopped at its first look at the loaded model's config."""
    model, ran = shipped_code
    seen: list[str] = []

    def loaded(config: Any) -> None:
        seen.append(type(config).__name__)
        raise _Loaded

    monkeypatch.setattr(compiled, "uncovered", loaded)
    imported = set(sys.modules)
    spec = compiled.PackageSpec(str(model), "fp32", "cpu", 1, 64)
    with pytest.raises(_Loaded):
        compiled.build_package(spec, tmp_path / "decode.pt2")
    assert seen == ["LlamaConfig"]
    assert not ran.exists()
    assert not [name for name in set(sys.modules) - imported if "evil" in name]


def test_an_unknown_architecture_with_code_is_refused_before_loading(
    shipped_code: tuple[Path, Path],
) -> None:
    model, ran = shipped_code
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "evil-lm"}))
    with pytest.raises(ConfigError, match="ships its own code"):
        resolve_model(read_settings([], {"HF_MODEL_ID": str(model)}))
    assert not ran.exists()


def test_the_shipped_code_would_run_if_trusted(
    shipped_code: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same directory runs its code when remote code is trusted, so the two
    tests above would see it run."""
    model, ran = shipped_code
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules = tmp_path / "modules"
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(modules))
    with pytest.raises(RuntimeError, match="remote code ran"):
        transformers.AutoConfig.from_pretrained(model, trust_remote_code=True)
    assert ran.exists()
    shutil.rmtree(modules, ignore_errors=True)


# --- which files a request can make the server read -----------------------------------------------


@pytest.fixture(scope="module")
def file_events() -> Iterator[list[tuple[str, str]]]:
    """Audited file events (`open`, `os.listdir`...) while `recording` is set."""
    events: list[tuple[str, str]] = []
    recording = threading.Event()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if recording.is_set() and (event == "open" or event.startswith(("os.", "shutil."))):
            events.append((event, repr(args)[:300]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: `recording` turns it off
    recording.set()
    events.clear()
    yield events
    recording.clear()


def test_the_openai_model_field_is_echoed_and_never_used(engine: Engine, file_events) -> None:
    client = client_for(engine)
    chat = {"messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 5}
    completion = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    expected = {
        path: client.post(path, json={**body, "temperature": 0}).json["choices"]
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion))
    }
    file_events.clear()
    for model in PATH_LIKE_MODELS:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
            answer = client.post(path, json={**body, "model": model, "temperature": 0})
            assert answer.status_code == 200, answer.json
            assert answer.json["model"] == model
            assert answer.json["choices"] == expected[path]
        listed = client.get("/v1/models").json["data"]
        assert [entry["id"] for entry in listed] == [engine.model_id]
    touched = [event for event in file_events if any(m in event[1] for m in ("passwd", "id_rsa"))]
    assert not touched, touched
    assert not [event for event in file_events if event[0] == "open"], file_events[:5]
