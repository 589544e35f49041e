"""Configuration: every flag and environment variable, read once into a frozen `Settings`.

Precedence, highest first: command-line flags (named like the TGI launcher's), environment
variables, the exported model's compiled shapes (`Settings.with_compiled`), defaults. Several
environment names often carry one value (current TGI names, the legacy `HF_*` names of the
Neuron docs, the `SM_ON_*` names of the vLLM-based images): they may all be set, but only to the
same value. Every problem is collected and reported in one `ConfigError` that names the
variables, their values and the fix, before any model is loaded.

Each setting is one field of `Settings`, declared with `option(...)`: its default, its doc, its
flags, its environment names and its parser sit together, and that one declaration drives the
command line (`--help` included), the environment and the start-up log.

Nothing outside this module reads `os.environ`; `read_settings` takes the environment as an
argument so that tests pass plain dictionaries.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from handler.errors import ConfigError

DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}
BACKENDS = ("auto", "torch", "neuron")
SERVING_STACKS = ("gunicorn", "mms")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZE_METHODS = ("int8",)
DEFAULT_BATCH_SIZE = 4
DEFAULT_TOTAL_TOKENS = 4096


@dataclass(frozen=True)
class CompiledShape:
    """Shapes fixed by an exported (compiled) Neuron model; they become defaults."""

    batch_size: int
    sequence_length: int
    num_cores: int | None = None
    auto_cast_type: str | None = None
    on_device_sampling: bool | None = None


# --- parsers: text of a flag or variable -> value, or ValueError saying what is expected --------


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def positive_int_argument(text: str) -> int:
    """argparse type for the command-line tools (export, deploy): a whole number above zero."""
    try:
        return _positive_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _dtype(text: str) -> str:
    key = text.strip().lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(
            f"unknown dtype, use one of bf16, fp16, fp32 (or {', '.join(DTYPE_ALIASES)})"
        )
    return DTYPE_ALIASES[key]


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0 <= value < 3600:
        raise ValueError("must be between 0 and 3600 seconds")
    return value


def _timeout(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if not 0 <= value <= 100:
        raise ValueError("must be between 0 and 100")
    return value


def _upper(text: str) -> str:
    return text.strip().upper()


def _port(text: str) -> int:
    value = _int(text)
    if not 0 < value < 65536:
        raise ValueError("must be between 1 and 65535")
    return value


# --- options -----------------------------------------------------------------------------------

OPTION = "option"
"""The key of a `Settings` field's `Option` in its `dataclasses.field` metadata."""


@dataclass(frozen=True)
class Option:
    """How one setting is given: its flags, its environment names and how to parse them."""

    doc: str
    """What the setting does (the field's documentation and its `--help` line)."""
    flags: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    """Environment names, current one first: they must agree when several are set."""
    parse: Callable[[str], Any] = str
    fallback: bool = False
    """True: env names are tried in order (no conflict check), as for the port."""
    secret: bool = False
    """Never logged, shown or repr'd."""
    switch: bool = False
    """The flag takes no value and means true (`--trust-remote-code`)."""


def option(
    default: Any,
    doc: str,
    *,
    flags: tuple[str, ...] = (),
    env: tuple[str, ...] = (),
    parse: Callable[[str], Any] = str,
    fallback: bool = False,
    secret: bool = False,
    switch: bool = False,
) -> Any:
    """A `Settings` field with its `Option`: declared once, read from `flags` then `env`."""
    described = Option(doc, flags, env, parse, fallback, secret, switch)
    return field(default=default, repr=not secret, metadata={OPTION: described})


@dataclass(frozen=True)
class Settings:
    """The effective configuration of one server process (see `option` for each field's
    flags and environment names)."""

    model_id: str | None = option(
        None,
        "Hub id or local directory of the model.",
        flags=("--model-id",),
        env=("HF_MODEL_ID", "MODEL_ID", "SM_ON_MODEL"),
    )
    revision: str | None = option(
        None,
        "Hub revision (branch, tag or commit); ignored for local directories.",
        flags=("--revision",),
        env=("HF_MODEL_REVISION", "REVISION"),
    )
    hf_token: str | None = option(
        None,
        "Token for gated and private models. Never logged.",
        env=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
        secret=True,
    )
    model_dir: str | None = option(
        None,
        "Inference Endpoints model mount (default `/repository` when present).",
        env=("HF_MODEL_DIR",),
    )
    max_batch_size: int = option(
        DEFAULT_BATCH_SIZE,
        "Static batch size = KV cache slots; default: the compiled one, else 4.",
        flags=("--max-batch-size",),
        env=("MAX_BATCH_SIZE", "HF_BATCH_SIZE", "SM_ON_BATCH_SIZE"),
        parse=_positive_int,
    )
    max_total_tokens: int = option(
        DEFAULT_TOTAL_TOKENS,
        "Sequence length: prompt + generated tokens; default: the compiled one, else 4096.",
        flags=("--max-total-tokens",),
        env=("MAX_TOTAL_TOKENS", "HF_SEQUENCE_LENGTH", "SM_ON_SEQUENCE_LENGTH"),
        parse=_positive_int,
    )
    max_input_tokens: int = option(
        DEFAULT_TOTAL_TOKENS // 2,
        "Longest prompt; default half of `max_total_tokens`.",
        flags=("--max-input-tokens", "--max-input-length"),
        env=("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
        parse=_positive_int,
    )
    max_batch_prefill_tokens: int = option(
        DEFAULT_BATCH_SIZE * DEFAULT_TOTAL_TOKENS // 2,
        "Prompt tokens prefilled together; default `max_batch_size * max_input_tokens`.",
        flags=("--max-batch-prefill-tokens",),
        env=("MAX_BATCH_PREFILL_TOKENS",),
        parse=_positive_int,
    )
    max_concurrent_requests: int = option(
        128,
        "Requests in flight (running + waiting); beyond it: 429 `overloaded`.",
        flags=("--max-concurrent-requests",),
        env=("MAX_CONCURRENT_REQUESTS",),
        parse=_positive_int,
    )
    max_waiting_tokens: int = option(
        20,
        "TGI's `--max-waiting-tokens`: decode steps a waiting request may be held back (to be "
        "prefilled together with others) before it is admitted anyway.",
        flags=("--max-waiting-tokens",),
        env=("MAX_WAITING_TOKENS",),
        parse=_non_negative_int,
    )
    waiting_served_ratio: float = option(
        0.3,
        "TGI's `--waiting-served-ratio`: while requests run, admit only when at least "
        "`ratio x running` waiting requests can be prefilled at once (or `max_waiting_tokens` "
        "have passed), so that prefills, which pause every stream, come in batches instead of "
        "one by one.",
        flags=("--waiting-served-ratio",),
        env=("WAITING_SERVED_RATIO",),
        parse=_ratio,
    )
    max_stop_sequences: int = option(
        4,
        "Most stop sequences in one request.",
        flags=("--max-stop-sequences",),
        env=("MAX_STOP_SEQUENCES",),
        parse=_non_negative_int,
    )
    max_top_n_tokens: int = option(
        5,
        "Most alternatives (`top_n_tokens`, `top_logprobs`) reported per token.",
        flags=("--max-top-n-tokens",),
        env=("MAX_TOP_N_TOKENS",),
        parse=_non_negative_int,
    )
    max_best_of: int = option(
        1,
        "`best_of` > 1 is not implemented: requests asking for it are rejected.",
        flags=("--max-best-of",),
        env=("MAX_BEST_OF",),
        parse=_positive_int,
    )
    max_client_batch_size: int = option(
        4,
        "Most prompts in one `/v1/completions` request.",
        flags=("--max-client-batch-size",),
        env=("MAX_CLIENT_BATCH_SIZE",),
        parse=_positive_int,
    )
    payload_limit: int = option(
        2_000_000,
        "Largest request body in bytes (413 beyond).",
        flags=("--payload-limit",),
        env=("PAYLOAD_LIMIT",),
        parse=_positive_int,
    )
    num_cores: int | None = option(
        None,
        "Neuron cores = tensor parallel degree; default: the compiled number, else all available.",
        flags=("--num-cores",),
        env=("HF_NUM_CORES", "SM_ON_TENSOR_PARALLEL_SIZE"),
        parse=_positive_int,
    )
    auto_cast_type: str | None = option(
        None,
        "`bf16`, `fp16` or `fp32` (aliases such as `bfloat16` accepted); default: the compiled "
        "one on Neuron, the engine's choice on torch.",
        flags=("--auto-cast-type",),
        env=("HF_AUTO_CAST_TYPE",),
        parse=_dtype,
    )
    backend: str = option(
        "auto",
        "`auto` (Neuron when devices are present, else torch), `torch` or `neuron`.",
        flags=("--backend",),
        env=("SERVING_BACKEND",),
        parse=_choice(BACKENDS),
    )
    device: str = option(
        "auto",
        "Torch backend device: `auto` (CUDA when available), `cpu` or `cuda`.",
        flags=("--device",),
        env=("SERVING_DEVICE",),
        parse=_choice(DEVICES),
    )
    # HOSTNAME is not read: shells and Docker set it to the machine's name, not an address.
    hostname: str = option("0.0.0.0", "Address to listen on.", flags=("--hostname",))
    port: int = option(
        8080,
        "Port to listen on: the flag, else `SAGEMAKER_BIND_TO_PORT`, else `PORT`.",
        flags=("--port",),
        env=("SAGEMAKER_BIND_TO_PORT", "PORT"),
        parse=_port,
        fallback=True,
    )
    serving_stack: str = option(
        "gunicorn",
        "What `serve` runs: `gunicorn` (every route, streaming) or `mms` (the SageMaker "
        "inference toolkit's Multi Model Server: `/ping` and `/invocations` only).",
        env=("SERVING_STACK",),
        parse=_choice(SERVING_STACKS),
    )
    model_server_workers: int = option(
        1,
        "MMS worker processes: with `SERVING_STACK=mms` only 1, since each worker is a process "
        "that would load its own copy of the model (and on Neuron claim its own cores). Ignored "
        "by gunicorn, which always runs one worker.",
        env=("SAGEMAKER_MODEL_SERVER_WORKERS",),
        parse=_positive_int,
    )
    model_server_timeout: int = option(
        60,
        "The toolkit writes it as MMS's `default_response_timeout`, which MMS 1.1 counts in "
        "minutes: how long MMS waits for each reply of its worker, the model load included, "
        "before it restarts the worker.",
        env=("SAGEMAKER_MODEL_SERVER_TIMEOUT",),
        parse=_positive_int,
    )
    model_server_timeout_seconds: int | None = option(
        None,
        "The same limit as `model_server_timeout`, in seconds; wins when set.",
        env=("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",),
        parse=_positive_int,
    )
    messages_api_enabled: bool = option(
        False,
        "As in TGI: `/invocations` takes chat completion bodies only. Off, it takes generate, "
        "chat and completion bodies, told apart by their fields. The chat routes are always on.",
        env=("MESSAGES_API_ENABLED",),
        parse=_bool,
    )
    trust_remote_code: bool = option(
        False,
        "Run the model repository's own modelling and tokenizer code.",
        flags=("--trust-remote-code",),
        env=("HF_MODEL_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"),
        parse=_bool,
        switch=True,
    )
    api_key: str | None = option(
        None,
        "When set, every route but health checks needs `Authorization: Bearer <key>`.",
        flags=("--api-key",),
        env=("API_KEY",),
        secret=True,
    )
    hub_cache: str | None = option(
        None,
        "Download and export cache; default `$HF_HOME/hub` when `HF_HOME` is set.",
        flags=("--huggingface-hub-cache",),
        env=("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"),
        fallback=True,
    )
    custom_cache_repo: str = option(
        "aws-neuron/optimum-neuron-cache",
        "Hub repository of precompiled Neuron artifacts that exports look up.",
        env=("CUSTOM_CACHE_REPO",),
    )
    sm_num_gpus: int | None = option(
        None,
        "Set by SageMaker GPU snippets; meaningless here, accepted and ignored.",
        env=("SM_NUM_GPUS",),
        parse=_int,
    )
    log_level: str = option(
        "INFO",
        "Python logging level (`DEBUG`, `INFO`, `WARNING`...).",
        flags=("--log-level",),
        env=("LOG_LEVEL",),
        parse=_upper,
    )
    request_header_timeout: float = option(
        10.0,
        "Seconds a client has to send a request's line and headers, from its connection or, "
        "kept alive, from the request's first byte; then 408 and the connection is closed.",
        flags=("--request-header-timeout",),
        env=("REQUEST_HEADER_TIMEOUT",),
        parse=_timeout,
    )
    request_body_timeout: float = option(
        10.0,
        "Seconds a request body may take after the headers, plus one per "
        "`request_body_min_rate` bytes received; then 408.",
        flags=("--request-body-timeout",),
        env=("REQUEST_BODY_TIMEOUT",),
        parse=_timeout,
    )
    request_body_min_rate: int = option(
        1000,
        "Bytes per second a long body must keep up: each such amount received extends its "
        "deadline by a second.",
        flags=("--request-body-min-rate",),
        env=("REQUEST_BODY_MIN_RATE",),
        parse=_positive_int,
    )
    max_connections: int = option(
        2048,
        "Open connections the server keeps, idle, being read or served; beyond it idle ones are "
        "closed first, then new ones get 503 `overloaded` (health checks excepted).",
        flags=("--max-connections",),
        env=("MAX_CONNECTIONS",),
        parse=_positive_int,
    )
    shutdown_grace: float = option(
        20.0,
        "Seconds running generations get to finish after SIGTERM; SageMaker kills at 30 s.",
        flags=("--shutdown-grace",),
        env=("SHUTDOWN_GRACE_SECONDS",),
        parse=_seconds,
    )
    compile_on_start: bool = option(
        False,
        "Allow a Neuron export with no hub-cached artifacts at start-up. Off: such a compile "
        "can outlast the health-check window.",
        flags=("--compile-on-start",),
        env=("NEURON_COMPILE_ON_START",),
        parse=_bool,
        switch=True,
    )
    on_device_sampling: bool | None = option(
        None,
        "Compile a Neuron export that chooses tokens on the device (true or false); default: "
        "what optimum-neuron picks for the architecture (Llama: on). Off, the host samples: "
        "seeds, penalties, typical_p and log-probabilities work, and `[batch, vocab]` logits "
        "leave the device at every step.",
        flags=("--on-device-sampling",),
        env=("NEURON_ON_DEVICE_SAMPLING",),
        parse=_bool,
    )
    neuron_rt_num_cores: int | None = option(
        None,
        "How many Neuron cores the runtime may take.",
        env=("NEURON_RT_NUM_CORES",),
        parse=_positive_int,
    )
    neuron_rt_visible_cores: str | None = option(
        None,
        "Which Neuron cores (`3`, `0-3`) the runtime may take.",
        env=("NEURON_RT_VISIBLE_CORES",),
    )
    export_cache: str | None = option(
        None,
        "Where exported Neuron models are saved and found again; default `neuron-exports` "
        "under the hub cache (`/data` in the image).",
        flags=("--export-cache",),
        env=("NEURON_EXPORT_CACHE",),
    )
    torch_compile: bool = option(
        True,
        "Compile the torch backend's decode step (true or false; handler/model/compiled.py). "
        "Off, or where the model is outside the compiled family or the compile fails, "
        "`transformers`' modelling code runs op by op (logged; `/info` says why).",
        flags=("--torch-compile",),
        env=("TORCH_COMPILE",),
        parse=_bool,
    )
    fused_attention: bool = option(
        True,
        "On CPU the compiled decode step attends with a C++ operator built at the first start "
        "(handler/model/cpu_ops.py: each row reads only its own cached keys) rather than "
        "inductor's masked loops (true or false). Where it cannot be built, or the model's "
        "head size is not one it has, the step keeps inductor's loops (logged).",
        flags=("--fused-attention",),
        env=("TORCH_FUSED_ATTENTION",),
        parse=_bool,
    )
    quantize: str | None = option(
        None,
        "`int8`: the torch backend's compiled decode step on CPU reads weight-only int8 weights "
        "(symmetric, one scale per output channel; prompts and any eager step keep the model's "
        "dtype). Half the weight bytes; on 2 AMD EPYC cores a step of one row about 10% "
        "faster, from 4 rows slower (handler/model/compiled.py). TGI's GPU methods (awq, gptq, "
        "bitsandbytes...) are refused.",
        flags=("--quantize",),
        env=("QUANTIZE", "HF_MODEL_QUANTIZE"),
        parse=_choice(QUANTIZE_METHODS),
    )
    prefix_caching: bool = option(
        True,
        "Start a prompt from the positions a KV cache row already holds of its first tokens "
        "(an earlier turn, a shared system prompt; handler/generation/prefix.py), as vLLM's "
        "automatic prefix caching and llama.cpp's slot prompt cache do (true or false; the "
        "torch backend only).",
        flags=("--prefix-caching",),
        env=("PREFIX_CACHING",),
        parse=_bool,
    )
    prefix_cache_rows: int | None = option(
        None,
        "KV cache rows beyond the slots that only keep prompt prefixes for reuse (with "
        "`prefix_caching`): what a slot held is moved there before a new request overwrites it. "
        "A row's memory is committed as positions are written; default: the batch size.",
        flags=("--prefix-cache-rows",),
        env=("PREFIX_CACHE_ROWS",),
        parse=_non_negative_int,
    )
    compile_cache: str | None = option(
        None,
        "Where compiled decode steps are kept between starts; default `compiled-steps` under "
        "the hub cache (`/data` in the image).",
        flags=("--compile-cache",),
        env=("TORCH_COMPILE_CACHE",),
    )
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    """Where each given setting was read: field name -> the flag or variable that gave it
    (`--max-batch-size`, `HF_BATCH_SIZE`, `HF_HOME`). The others have their default, a value
    derived from other settings, or (`with_compiled`) the compiled one."""

    def mms_response_timeout(self) -> float:
        """Seconds MMS waits for any reply of its worker (the load included) before it restarts
        it: `model_server_timeout_seconds`, else `model_server_timeout` minutes."""
        if self.model_server_timeout_seconds:
            return float(self.model_server_timeout_seconds)
        return 60.0 * self.model_server_timeout

    def describe(self) -> dict[str, Any]:
        """Every setting, secrets redacted: what start-up logs."""
        described = {name: getattr(self, name) for name in OPTIONS}
        for name, setting in OPTIONS.items():
            if setting.secret and described[name] is not None:
                described[name] = "<redacted>"
        return described

    def with_compiled(self, shape: CompiledShape) -> Settings:
        """These settings with an exported model's compiled shapes in place of defaults.

        A setting given by a flag or a variable (`sources`) keeps its value, which must agree
        with the compiled one (the sequence length may be shorter); the others take the
        compiled value, and what derives from them (`max_input_tokens`,
        `max_batch_prefill_tokens`) follows. Raises `ConfigError` naming both values and the fix.
        Meant for settings from `read_settings`: a value set another way (`Settings(...)` in
        code, `dataclasses.replace`) is not in `sources` and takes the compiled or default value.
        """
        given = {name: getattr(self, name) for name in self.sources}
        problems: list[str] = []
        values = _derive(given, self.sources, shape, problems)
        _raise_if(problems)
        return Settings(**values, sources=self.sources)


OPTIONS: dict[str, Option] = {
    setting.name: setting.metadata[OPTION]
    for setting in dataclasses.fields(Settings)
    if OPTION in setting.metadata
}
"""Every setting's `Option`, in field order."""


# --- reading -----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    environment_only = [name for o in OPTIONS.values() if not o.flags for name in o.env]
    parser = argparse.ArgumentParser(
        prog="python -m handler serve",
        description="Serve a causal LM with TGI, OpenAI and SageMaker routes. Flags win over "
        "environment variables, which win over an exported model's compiled shapes, which win "
        "over defaults.",
        epilog=f"Read from the environment only: {', '.join(environment_only)}.",
        exit_on_error=False,
    )
    for name, described in OPTIONS.items():
        if not described.flags:
            continue
        mirrors = f" [env: {', '.join(described.env)}]" if described.env else ""
        shown = (described.doc + mirrors).replace("%", "%%")
        if described.switch:
            parser.add_argument(
                *described.flags, dest=name, action="store_const", const="true", help=shown
            )
        else:
            parser.add_argument(*described.flags, dest=name, metavar="VALUE", help=shown)
    return parser


def parse_flags(argv: Sequence[str]) -> dict[str, str]:
    """Flags given on the command line, as raw strings keyed by setting name."""
    try:
        namespace, unknown = _parser().parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ConfigError(f"Invalid command line: {exc}") from exc
    if unknown:
        known = sorted(flag for described in OPTIONS.values() for flag in described.flags)
        raise ConfigError(
            f"Unknown command-line argument(s): {' '.join(unknown)}. "
            f"Known flags: {', '.join(known)}"
        )
    return {name: value for name, value in vars(namespace).items() if value is not None}


def flags_as_environ(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the flags in `argv` written under each setting's first environment name
    (its other names removed), so that a process reading only its environment (an MMS worker)
    gets the same settings. Raises `ConfigError` for a flag that no variable carries."""
    flags = parse_flags(argv)
    out = dict(environ)
    stranded = []
    for name, described in OPTIONS.items():
        if name not in flags:
            continue
        if not described.env:
            stranded.append(described.flags[0])
            continue
        for variable in described.env:
            out.pop(variable, None)
        out[described.env[0]] = flags[name]
    if stranded:
        raise ConfigError(
            f"{', '.join(stranded)} cannot reach the MMS worker, which reads only environment "
            "variables; MMS listens on 0.0.0.0 (the address the SageMaker inference toolkit "
            "writes): drop the flag, or use SERVING_STACK=gunicorn"
        )
    return out


def _shown(described: Option, value: str) -> str:
    return "<redacted>" if described.secret else repr(value)


def read_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
    """Build the `Settings` from flags and environment: once per process. An exported model's
    compiled shapes come later, with `Settings.with_compiled`.

    Raises `ConfigError` listing every problem found.
    """
    problems: list[str] = []
    given, sources = _read_given(argv, {} if environ is None else environ, problems)
    values = _derive(given, sources, None, problems)
    _raise_if(problems)
    return Settings(**values, sources=sources)


def _read_given(
    argv: Sequence[str], environ: Mapping[str, str], problems: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings that flags and variables give (parsed), and which flag or variable gave
    each; what is wrong goes to `problems`."""
    flags = parse_flags(argv)
    given: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, described in OPTIONS.items():
        if name in flags:
            raw, origin = flags[name], described.flags[0]
        else:
            present = [(env, environ[env]) for env in described.env if environ.get(env, "") != ""]
            if not present:
                continue
            if not described.fallback:
                distinct = {value.strip() for _, value in present}
                if len(distinct) > 1:
                    listed = " and ".join(f"{env}={_shown(described, v)}" for env, v in present)
                    problems.append(
                        f"{listed} give different values for one setting: set only "
                        f"{present[0][0]} (the others are older names for it)"
                    )
                    continue
            origin, raw = present[0]
        try:
            given[name] = described.parse(raw)
            sources[name] = origin
        except ValueError as exc:
            problems.append(f"{origin}={_shown(described, raw)} is invalid: {exc}")

    if "hub_cache" not in given and environ.get("HF_HOME"):
        given["hub_cache"] = environ["HF_HOME"].rstrip("/") + "/hub"
        sources["hub_cache"] = "HF_HOME"
    return given, sources


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _derive(
    given: Mapping[str, Any],
    sources: Mapping[str, str],
    compiled: CompiledShape | None,
    problems: list[str],
) -> dict[str, Any]:
    """The given values with compiled shapes and derived defaults added; what contradicts goes
    to `problems`. Precedence: `given` (flags, then environment), `compiled`, defaults."""
    values = dict(given)

    def named(name: str) -> str:
        return f"{sources[name]}={values[name]}"

    if compiled is not None:
        pairs = (
            ("max_batch_size", compiled.batch_size, "batch size", "=="),
            ("max_total_tokens", compiled.sequence_length, "sequence length", "<="),
            ("num_cores", compiled.num_cores, "number of cores", "=="),
            ("auto_cast_type", compiled.auto_cast_type, "dtype", "=="),
            ("on_device_sampling", compiled.on_device_sampling, "on-device sampling", "=="),
        )
        for name, compiled_value, what, relation in pairs:
            if compiled_value is None:
                continue
            if name not in values:
                values[name] = compiled_value
                continue
            ok = (
                values[name] == compiled_value
                if relation == "=="
                else values[name] <= compiled_value
            )
            if not ok:
                problems.append(
                    f"{named(name)} but the model was compiled for {what} {compiled_value}: "
                    f"set {sources[name]}={compiled_value} (or unset it) or export the model again"
                )

    total = values.setdefault("max_total_tokens", DEFAULT_TOTAL_TOKENS)
    batch = values.setdefault("max_batch_size", DEFAULT_BATCH_SIZE)
    if "max_input_tokens" not in values:
        values["max_input_tokens"] = max(1, total // 2) if total > 1 else 1
    max_input = values["max_input_tokens"]
    if max_input >= total:
        total_name = (
            named("max_total_tokens")
            if "max_total_tokens" in sources
            else f"max_total_tokens={total}"
        )
        input_name = (
            named("max_input_tokens")
            if "max_input_tokens" in sources
            else f"max_input_tokens={max_input}"
        )
        problems.append(
            f"{input_name} must be smaller than {total_name} (the prompt must leave room for at "
            f"least one generated token): lower MAX_INPUT_TOKENS or raise MAX_TOTAL_TOKENS"
        )
    prefill = values.setdefault("max_batch_prefill_tokens", batch * max_input)
    if prefill < max_input:
        problems.append(
            f"{named('max_batch_prefill_tokens')} is smaller than max_input_tokens={max_input}: "
            f"the longest allowed prompt could never be prefilled; raise MAX_BATCH_PREFILL_TOKENS"
        )
    if values.get("quantize"):
        if values.get("torch_compile") is False:
            problems.append(
                f"{named('quantize')} quantizes the torch backend's compiled decode step, which "
                f"{named('torch_compile')} turns off: unset one of them"
            )
        if values.get("backend") == "neuron" or values.get("device") == "cuda":
            which = "backend" if values.get("backend") == "neuron" else "device"
            problems.append(
                f"{named('quantize')} is the torch backend's on CPU, not {named(which)}'s: "
                "unset QUANTIZE"
            )
    if values.get("serving_stack") == "mms" and values.get("model_server_workers", 1) != 1:
        problems.append(
            f"{named('model_server_workers')}: each MMS worker is a process that loads its own "
            "copy of the model (and on Neuron claims its own cores), so one worker serves them "
            "all; set SAGEMAKER_MODEL_SERVER_WORKERS=1 or unset it"
        )
    return values
