"""Configuration: precedence, aliases, derived defaults and every contradiction."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from handler import config
from handler.config import (
    OPTIONS,
    CompiledShape,
    ConfigError,
    Settings,
    positive_int_argument,
    read_settings,
)

README = Path(__file__).parent.parent / "README.md"

VALID = [
    (
        {},
        {
            "max_batch_size": 4,
            "max_total_tokens": 4096,
            "max_input_tokens": 2048,
            "max_batch_prefill_tokens": 4 * 2048,
            "max_concurrent_requests": 128,
            "port": 8080,
        },
    ),
    (
        {"HF_BATCH_SIZE": "8", "HF_SEQUENCE_LENGTH": "2048"},
        {
            "max_batch_size": 8,
            "max_total_tokens": 2048,
            "max_input_tokens": 1024,
            "max_batch_prefill_tokens": 8 * 1024,
        },
    ),
    ({"MAX_BATCH_SIZE": "2", "HF_BATCH_SIZE": "2"}, {"max_batch_size": 2}),
    (
        {
            "SM_ON_BATCH_SIZE": "3",
            "SM_ON_SEQUENCE_LENGTH": "1024",
            "SM_ON_TENSOR_PARALLEL_SIZE": "2",
            "SM_ON_MODEL": "org/model",
        },
        {"max_batch_size": 3, "max_total_tokens": 1024, "num_cores": 2, "model_id": "org/model"},
    ),
    ({"MAX_INPUT_LENGTH": "100", "MAX_TOTAL_TOKENS": "200"}, {"max_input_tokens": 100}),
    (
        {
            "MAX_INPUT_TOKENS": "100",
            "MAX_INPUT_LENGTH": "100",
            "MAX_TOTAL_TOKENS": "200",
            "MAX_BATCH_PREFILL_TOKENS": "150",
        },
        {"max_input_tokens": 100, "max_batch_prefill_tokens": 150},
    ),
    ({"HF_AUTO_CAST_TYPE": "bfloat16"}, {"auto_cast_type": "bf16"}),
    ({"HF_AUTO_CAST_TYPE": "float16"}, {"auto_cast_type": "fp16"}),
    ({"HF_AUTO_CAST_TYPE": "FP32"}, {"auto_cast_type": "fp32"}),
    ({"HF_NUM_CORES": "2"}, {"num_cores": 2}),
    ({"MAX_CONCURRENT_REQUESTS": "7"}, {"max_concurrent_requests": 7}),
    ({"SAGEMAKER_BIND_TO_PORT": "9000", "PORT": "7000"}, {"port": 9000}),
    ({"PORT": "7000"}, {"port": 7000}),
    (
        {"HF_MODEL_ID": "a/b", "MODEL_ID": "a/b", "HF_MODEL_REVISION": "main"},
        {"model_id": "a/b", "revision": "main"},
    ),
    ({"HF_MODEL_TRUST_REMOTE_CODE": "true"}, {"trust_remote_code": True}),
    ({"MESSAGES_API_ENABLED": "true", "SM_NUM_GPUS": "1"}, {"sm_num_gpus": 1}),
    ({"HF_HOME": "/data"}, {"hub_cache": "/data/hub"}),
    ({"HUGGINGFACE_HUB_CACHE": "/cache", "HF_HOME": "/data"}, {"hub_cache": "/cache"}),
    ({"HOSTNAME": "container-42"}, {"hostname": "0.0.0.0"}),
    ({"MAX_WAITING_TOKENS": "0", "MAX_TOP_N_TOKENS": "0"}, {"max_waiting_tokens": 0}),
    ({}, {"torch_compile": True, "compile_cache": None}),
    (
        {"TORCH_COMPILE": "false", "TORCH_COMPILE_CACHE": "/data/steps"},
        {"torch_compile": False, "compile_cache": "/data/steps"},
    ),
]


@pytest.mark.parametrize(("environ", "expected"), VALID)
def test_valid_environments(environ: dict[str, str], expected: dict[str, object]) -> None:
    settings = read_settings([], environ)
    for name, value in expected.items():
        assert getattr(settings, name) == value, name


INVALID = [
    (
        {"HF_BATCH_SIZE": "4", "MAX_BATCH_SIZE": "8"},
        ["MAX_BATCH_SIZE='8'", "HF_BATCH_SIZE='4'", "set only MAX_BATCH_SIZE"],
    ),
    (
        {"MAX_TOTAL_TOKENS": "4096", "HF_SEQUENCE_LENGTH": "2048"},
        ["MAX_TOTAL_TOKENS='4096'", "HF_SEQUENCE_LENGTH='2048'"],
    ),
    (
        {"MAX_INPUT_TOKENS": "100", "MAX_INPUT_LENGTH": "200"},
        ["MAX_INPUT_TOKENS='100'", "MAX_INPUT_LENGTH='200'"],
    ),
    (
        {"MAX_INPUT_TOKENS": "4096", "MAX_TOTAL_TOKENS": "4096"},
        ["MAX_INPUT_TOKENS=4096 must be smaller than MAX_TOTAL_TOKENS=4096"],
    ),
    (
        {"MAX_INPUT_TOKENS": "5000"},
        ["MAX_INPUT_TOKENS=5000 must be smaller than max_total_tokens=4096"],
    ),
    ({"HF_AUTO_CAST_TYPE": "int3"}, ["HF_AUTO_CAST_TYPE='int3' is invalid", "bf16, fp16, fp32"]),
    ({"MAX_BATCH_SIZE": "four"}, ["MAX_BATCH_SIZE='four' is invalid", "whole number"]),
    ({"MAX_BATCH_SIZE": "0"}, ["MAX_BATCH_SIZE='0' is invalid", "positive"]),
    ({"HF_NUM_CORES": "-2"}, ["HF_NUM_CORES='-2' is invalid"]),
    ({"PORT": "99999"}, ["PORT='99999' is invalid"]),
    (
        {"MAX_BATCH_PREFILL_TOKENS": "10", "MAX_INPUT_TOKENS": "100", "MAX_TOTAL_TOKENS": "200"},
        ["MAX_BATCH_PREFILL_TOKENS=10 is smaller than max_input_tokens=100"],
    ),
    ({"HF_MODEL_TRUST_REMOTE_CODE": "maybe"}, ["HF_MODEL_TRUST_REMOTE_CODE='maybe' is invalid"]),
    ({"MAX_WAITING_TOKENS": "-1"}, ["MAX_WAITING_TOKENS='-1' is invalid: must be 0 or more"]),
    ({"MAX_STOP_SEQUENCES": "-2"}, ["MAX_STOP_SEQUENCES='-2' is invalid: must be 0 or more"]),
    ({"MAX_TOP_N_TOKENS": "-1"}, ["MAX_TOP_N_TOKENS='-1' is invalid: must be 0 or more"]),
    ({"SERVING_BACKEND": "tpu"}, ["SERVING_BACKEND='tpu' is invalid", "auto, torch, neuron"]),
    ({"TORCH_COMPILE": "sometimes"}, ["TORCH_COMPILE='sometimes' is invalid", "true or false"]),
]


@pytest.mark.parametrize(("environ", "fragments"), INVALID)
def test_invalid_environments(environ: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        read_settings([], environ)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_all_problems_reported_in_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        read_settings([], {"MAX_BATCH_SIZE": "x", "HF_AUTO_CAST_TYPE": "int3", "PORT": "0"})
    message = str(info.value)
    assert all(name in message for name in ("MAX_BATCH_SIZE", "HF_AUTO_CAST_TYPE", "PORT"))


def test_flags_override_environment() -> None:
    settings = read_settings(
        [
            "--max-batch-size",
            "2",
            "--max-total-tokens",
            "512",
            "--max-input-tokens",
            "100",
            "--port",
            "9999",
            "--model-id",
            "x/y",
            "--revision",
            "r1",
            "--hostname",
            "127.0.0.1",
            "--max-batch-prefill-tokens",
            "300",
            "--max-concurrent-requests",
            "9",
        ],
        {"MAX_BATCH_SIZE": "8", "PORT": "7000", "HF_MODEL_ID": "a/b"},
    )
    assert (settings.max_batch_size, settings.max_total_tokens, settings.max_input_tokens) == (
        2,
        512,
        100,
    )
    assert (settings.port, settings.model_id, settings.revision, settings.hostname) == (
        9999,
        "x/y",
        "r1",
        "127.0.0.1",
    )
    assert (settings.max_batch_prefill_tokens, settings.max_concurrent_requests) == (300, 9)


def test_unknown_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="--max-batchsize"):
        read_settings(["--max-batchsize", "4"], {})


def test_compiled_shapes_become_defaults() -> None:
    settings = read_settings([], {}).with_compiled(CompiledShape(8, 2048, 2, "bf16"))
    assert (settings.max_batch_size, settings.max_total_tokens, settings.num_cores) == (8, 2048, 2)
    assert (settings.auto_cast_type, settings.max_input_tokens) == ("bf16", 1024)
    assert settings.max_batch_prefill_tokens == 8 * 1024


def test_compiled_shapes_rank_below_flags_and_environment() -> None:
    """Flags, then environment, then compiled shapes, then defaults; values derived from a
    default follow the compiled shape, given ones stay."""
    shape = CompiledShape(8, 2048, 2, "bf16", on_device_sampling=False)
    read = read_settings(
        ["--max-input-tokens", "100"], {"MAX_INPUT_TOKENS": "300", "HF_NUM_CORES": "2"}
    )

    settings = read.with_compiled(shape)

    assert (settings.max_input_tokens, settings.num_cores) == (100, 2)
    assert (settings.max_batch_size, settings.max_total_tokens) == (8, 2048)
    assert settings.max_batch_prefill_tokens == 8 * 100
    assert settings.on_device_sampling is False
    assert settings.sources == {
        "max_input_tokens": "--max-input-tokens",
        "num_cores": "HF_NUM_CORES",
    }
    assert (read.max_batch_size, read.max_total_tokens) == (4, 4096)  # a new object


def test_a_shorter_sequence_length_than_compiled_is_kept() -> None:
    shape = CompiledShape(4, 2048, 2, "bf16")
    settings = read_settings([], {"MAX_TOTAL_TOKENS": "1024"}).with_compiled(shape)
    assert (settings.max_total_tokens, settings.max_input_tokens) == (1024, 512)


def test_with_compiled_checks_what_the_compiled_shape_derives() -> None:
    """A prompt limit that fits the default sequence length but not the compiled one."""
    read = read_settings([], {"MAX_INPUT_TOKENS": "3000"})
    with pytest.raises(ConfigError, match="MAX_INPUT_TOKENS=3000 must be smaller than"):
        read.with_compiled(CompiledShape(4, 2048))


def test_where_a_setting_came_from_does_not_make_it_different() -> None:
    """The MMS worker reads from variables what the launcher got as flags: equal settings."""
    assert read_settings(["--max-batch-size", "2"], {}) == read_settings([], {"HF_BATCH_SIZE": "2"})


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        (
            {"MAX_BATCH_SIZE": "8"},
            "MAX_BATCH_SIZE=8 but the model was compiled for batch size 4: set MAX_BATCH_SIZE=4",
        ),
        ({"HF_BATCH_SIZE": "2"}, "HF_BATCH_SIZE=2 but the model was compiled for batch size 4"),
        (
            {"MAX_TOTAL_TOKENS": "4096"},
            "MAX_TOTAL_TOKENS=4096 but the model was compiled for sequence length 2048",
        ),
        ({"HF_NUM_CORES": "8"}, "HF_NUM_CORES=8 but the model was compiled for number of cores 2"),
        (
            {"HF_AUTO_CAST_TYPE": "fp16"},
            "HF_AUTO_CAST_TYPE=fp16 but the model was compiled for dtype bf16",
        ),
    ],
)
def test_contradicting_compiled_shape(environ: dict[str, str], fragment: str) -> None:
    settings = read_settings([], environ)
    with pytest.raises(ConfigError) as info:
        settings.with_compiled(CompiledShape(4, 2048, 2, "bf16"))
    assert fragment in str(info.value)


def test_compiled_dtype_alias_matches() -> None:
    settings = read_settings([], {"HF_AUTO_CAST_TYPE": "bfloat16"})
    assert settings.with_compiled(CompiledShape(4, 2048, 2, "bf16")).auto_cast_type == "bf16"


def test_secrets_redacted() -> None:
    settings = read_settings(["--api-key", "k-123"], {"HF_TOKEN": "hf_secret"})
    assert settings.hf_token == "hf_secret"
    shown = f"{settings!r} {settings.describe()}"
    assert "hf_secret" not in shown and "k-123" not in shown
    assert settings.describe()["hf_token"] == "<redacted>"


def test_conflicting_secret_not_printed() -> None:
    with pytest.raises(ConfigError) as info:
        read_settings([], {"HF_TOKEN": "hf_aaa", "HUGGING_FACE_HUB_TOKEN": "hf_bbb"})
    assert "hf_aaa" not in str(info.value) and "hf_bbb" not in str(info.value)
    assert "HF_TOKEN=<redacted>" in str(info.value)


def test_effective_configuration_logged_once_without_secrets(caplog) -> None:
    from handler.__main__ import log_settings

    settings = read_settings(
        ["--api-key", "k-123"], {"HF_TOKEN": "hf_secret", "HF_BATCH_SIZE": "2"}
    )
    with caplog.at_level("INFO", logger="handler"):
        log_settings(settings)
    lines = [r.getMessage() for r in caplog.records if "effective configuration" in r.getMessage()]
    assert len(lines) == 1
    assert "max_batch_size=2" in lines[0] and "hf_token=<redacted>" in lines[0]
    assert "hf_secret" not in caplog.text and "k-123" not in caplog.text


@pytest.mark.parametrize(
    ("text", "message"), [("0", "must be a positive integer"), ("abc", "must be a whole number")]
)
def test_command_line_tools_refuse_what_the_settings_refuse(text: str, message: str) -> None:
    """The export and deploy tools share the settings' own check for counts."""
    assert positive_int_argument(" 3 ") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}': {message}"):
        positive_int_argument(text)


# --- the options: one declaration per setting ------------------------------------------------


def test_every_setting_is_declared_once_with_its_names_and_doc() -> None:
    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "sources"]
    assert list(OPTIONS) == fields
    flags = [flag for option in OPTIONS.values() for flag in option.flags]
    env = [name for option in OPTIONS.values() for name in option.env]
    assert len(flags) == len(set(flags)) and len(env) == len(set(env))
    for name, option in OPTIONS.items():
        assert option.doc.strip(), name
        assert option.flags or option.env, name


def test_help_names_each_flag_with_its_variables() -> None:
    shown = " ".join(config._parser().format_help().split())
    assert "--max-batch-size VALUE Static batch size" in shown
    assert "[env: MAX_BATCH_SIZE, HF_BATCH_SIZE, SM_ON_BATCH_SIZE]" in shown
    assert "--trust-remote-code Run the model repository's own" in shown
    assert "Read from the environment only: HF_TOKEN, HUGGING_FACE_HUB_TOKEN" in shown


def test_readme_configuration_names_only_what_the_settings_read() -> None:
    """Every flag and variable the README's Configuration section names is one an option
    declares (or `HF_HOME`, read for the hub cache; `HOSTNAME`, named as deliberately unread)."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(--[a-z-]+)", section))
    variables = set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", section))
    declared_flags = {flag for option in OPTIONS.values() for flag in option.flags}
    declared_env = {name for option in OPTIONS.values() for name in option.env}
    assert named and named <= declared_flags
    assert variables and variables - {"HF_HOME", "HOSTNAME"} <= declared_env


def test_settings_secrets_are_the_options_marked_secret() -> None:
    secret = {name for name, option in OPTIONS.items() if option.secret}
    assert secret == {"hf_token", "api_key"}
    described = read_settings([], {"HF_TOKEN": "t", "API_KEY": "k"}).describe()
    assert {name for name, value in described.items() if value == "<redacted>"} == secret
