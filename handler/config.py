"""Configuration: every flag and environment variable, read once into a frozen `Settings`.

Precedence, highest first: command-line flags (named like the TGI launcher's), environment
variables, the exported model's compiled shapes (`CompiledShape`), defaults. Several
environment names often carry one value (current TGI names, the legacy `HF_*` names of the
Neuron docs, the `SM_ON_*` names of the vLLM-based images): they may all be set, but only to the
same value. Every problem is collected and reported in one `ConfigError` that names the
variables, their values and the fix, before any model is loaded.

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
SECRET_FIELDS = ("hf_token", "api_key")
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


@dataclass(frozen=True)
class Settings:
    """The effective configuration of one server process."""

    model_id: str | None = None
    """Hub id or local directory (`--model-id`, `HF_MODEL_ID`, `MODEL_ID`, `SM_ON_MODEL`)."""
    revision: str | None = None
    """Hub revision (`--revision`, `HF_MODEL_REVISION`, `REVISION`); ignored for local dirs."""
    hf_token: str | None = field(default=None, repr=False)
    """Token for gated models (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`). Never logged."""
    model_dir: str | None = None
    """Inference Endpoints model mount (`HF_MODEL_DIR`, default `/repository` when present)."""
    max_batch_size: int = DEFAULT_BATCH_SIZE
    """Static batch size = KV cache slots (`MAX_BATCH_SIZE`, legacy `HF_BATCH_SIZE`)."""
    max_total_tokens: int = DEFAULT_TOTAL_TOKENS
    """Sequence length: prompt + generated (`MAX_TOTAL_TOKENS`, legacy `HF_SEQUENCE_LENGTH`)."""
    max_input_tokens: int = DEFAULT_TOTAL_TOKENS // 2
    """Longest prompt (`MAX_INPUT_TOKENS`, legacy `MAX_INPUT_LENGTH`); default half the total."""
    max_batch_prefill_tokens: int = DEFAULT_BATCH_SIZE * DEFAULT_TOTAL_TOKENS // 2
    """Prompt tokens prefilled together; default `max_batch_size * max_input_tokens`."""
    max_concurrent_requests: int = 128
    """Requests in flight (running + waiting); beyond it: 429 `overloaded`."""
    max_waiting_tokens: int = 20
    """TGI's `--max-waiting-tokens`: decode steps a waiting request may be held back (to be
    prefilled together with others) before it is admitted anyway."""
    waiting_served_ratio: float = 0.3
    """TGI's `--waiting-served-ratio`: while requests run, admit only when at least
    `ratio x running` waiting requests can be prefilled at once (or `max_waiting_tokens` have
    passed), so that prefills, which pause every stream, come in batches instead of one by one."""
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 1
    """`best_of` > 1 is not implemented: requests asking for it are rejected."""
    max_client_batch_size: int = 4
    """Most prompts in one `/v1/completions` request."""
    payload_limit: int = 2_000_000
    """Largest request body in bytes (413 beyond)."""
    num_cores: int | None = None
    """Neuron cores = tensor parallel degree (`HF_NUM_CORES`); None: all available."""
    auto_cast_type: str | None = None
    """`bf16`, `fp16` or `fp32` (`HF_AUTO_CAST_TYPE`, aliases such as `bfloat16` accepted)."""
    backend: str = "auto"
    """`auto` (Neuron when devices are present, else torch), `torch` or `neuron`."""
    device: str = "auto"
    """Torch backend device: `auto` (CUDA when available), `cpu` or `cuda`."""
    hostname: str = "0.0.0.0"
    port: int = 8080
    """`--port`, else `SAGEMAKER_BIND_TO_PORT`, else `PORT`, else 8080."""
    serving_stack: str = "gunicorn"
    """What `serve` runs (`SERVING_STACK`): `gunicorn` (every route, streaming) or `mms` (the
    SageMaker inference toolkit's Multi Model Server: `/ping` and `/invocations` only)."""
    model_server_workers: int = 1
    """MMS worker processes (`SAGEMAKER_MODEL_SERVER_WORKERS`): with `SERVING_STACK=mms` only 1,
    since each worker is a process that would load its own copy of the model (and on Neuron
    claim its own cores). Ignored by gunicorn, which always runs one worker."""
    model_server_timeout: int = 60
    """`SAGEMAKER_MODEL_SERVER_TIMEOUT`: the toolkit writes it as MMS's `default_response_timeout`,
    which MMS 1.1 counts in minutes (default 60): how long MMS waits for each reply of its worker,
    the model load included, before it restarts the worker."""
    model_server_timeout_seconds: int | None = None
    """`SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS`: the same limit in seconds; wins when set."""
    messages_api_enabled: bool = False
    """`MESSAGES_API_ENABLED`, as in TGI: `/invocations` takes chat completion bodies only.
    Off, it takes generate, chat and completion bodies, told apart by their fields. The chat
    routes are always on."""
    trust_remote_code: bool = False
    api_key: str | None = field(default=None, repr=False)
    """When set, every route but health checks needs `Authorization: Bearer <key>`."""
    hub_cache: str | None = None
    """Download and export cache (`HUGGINGFACE_HUB_CACHE`, `HF_HUB_CACHE`, `HF_HOME/hub`)."""
    custom_cache_repo: str = "aws-neuron/optimum-neuron-cache"
    sm_num_gpus: int | None = None
    """Set by SageMaker GPU snippets; meaningless here, accepted and ignored."""
    log_level: str = "INFO"
    request_header_timeout: float = 10.0
    """Seconds a client has to send a request's line and headers (`--request-header-timeout`,
    `REQUEST_HEADER_TIMEOUT`), from its connection or, kept alive, from the request's first
    byte; then 408 and the connection is closed."""
    request_body_timeout: float = 10.0
    """Seconds a request body may take after the headers (`--request-body-timeout`,
    `REQUEST_BODY_TIMEOUT`), plus one per `request_body_min_rate` bytes received; then 408."""
    request_body_min_rate: int = 1000
    """Bytes per second a long body must keep up (`--request-body-min-rate`,
    `REQUEST_BODY_MIN_RATE`): each such amount received extends its deadline by a second."""
    max_connections: int = 2048
    """Open connections the server keeps (`--max-connections`, `MAX_CONNECTIONS`), idle,
    being read or served; beyond it idle ones are closed first, then new ones get 503
    `overloaded` (health checks excepted)."""
    shutdown_grace: float = 20.0
    compile_on_start: bool = False
    """Allow a Neuron export with no hub-cached artifacts at start-up (`--compile-on-start`,
    `NEURON_COMPILE_ON_START`). Off: such a compile can outlast the health-check window."""
    on_device_sampling: bool | None = None
    """Compile a Neuron export that chooses tokens on the device (`--on-device-sampling`,
    `NEURON_ON_DEVICE_SAMPLING`, true or false); None: what optimum-neuron picks for the
    architecture (Llama: on). Off, the host samples: seeds, penalties, typical_p and
    log-probabilities work, and `[batch, vocab]` logits leave the device at every step."""
    neuron_rt_num_cores: int | None = None
    """`NEURON_RT_NUM_CORES`: how many Neuron cores the runtime may take."""
    neuron_rt_visible_cores: str | None = None
    """`NEURON_RT_VISIBLE_CORES`: which cores (`3`, `0-3`, `0,2,4-5`) the runtime may take."""
    export_cache: str | None = None
    """Where exported Neuron models are saved and found again (`--export-cache`,
    `NEURON_EXPORT_CACHE`); default `neuron-exports` under the hub cache (`/data` in the image)."""
    torch_compile: bool = True
    """Compile the torch backend's decode step (`--torch-compile`, `TORCH_COMPILE`, true or
    false; handler/model/compiled.py). Off, or where the model is outside the compiled family or
    the compile fails, `transformers`' modelling code runs op by op (logged; `/info` says why)."""
    compile_cache: str | None = None
    """Where compiled decode steps are kept between starts (`--compile-cache`,
    `TORCH_COMPILE_CACHE`); default `compiled-steps` under the hub cache (`/data` in the image)."""
    """Seconds running generations get to finish after SIGTERM; SageMaker kills at 30 s."""

    def mms_response_timeout(self) -> float:
        """Seconds MMS waits for any reply of its worker (the load included) before it restarts
        it: `model_server_timeout_seconds`, else `model_server_timeout` minutes."""
        if self.model_server_timeout_seconds:
            return float(self.model_server_timeout_seconds)
        return 60.0 * self.model_server_timeout

    def describe(self) -> dict[str, Any]:
        """All fields, secrets redacted: what start-up logs."""
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if values[name] is not None:
                values[name] = "<redacted>"
        return values


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One setting: its flags, its environment names and how to parse it."""

    name: str
    flags: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    parse: Callable[[str], Any] = str
    fallback: bool = False
    """True: env names are tried in order (no conflict check), as for the port."""
    secret: bool = False


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


def _port(text: str) -> int:
    value = _int(text)
    if not 0 < value < 65536:
        raise ValueError("must be between 1 and 65535")
    return value


OPTIONS = (
    _Option("model_id", ("--model-id",), ("HF_MODEL_ID", "MODEL_ID", "SM_ON_MODEL")),
    _Option("revision", ("--revision",), ("HF_MODEL_REVISION", "REVISION")),
    _Option("hf_token", (), ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), secret=True),
    _Option("model_dir", (), ("HF_MODEL_DIR",)),
    _Option(
        "max_batch_size",
        ("--max-batch-size",),
        ("MAX_BATCH_SIZE", "HF_BATCH_SIZE", "SM_ON_BATCH_SIZE"),
        _positive_int,
    ),
    _Option(
        "max_total_tokens",
        ("--max-total-tokens",),
        ("MAX_TOTAL_TOKENS", "HF_SEQUENCE_LENGTH", "SM_ON_SEQUENCE_LENGTH"),
        _positive_int,
    ),
    _Option(
        "max_input_tokens",
        ("--max-input-tokens", "--max-input-length"),
        ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
        _positive_int,
    ),
    _Option(
        "max_batch_prefill_tokens",
        ("--max-batch-prefill-tokens",),
        ("MAX_BATCH_PREFILL_TOKENS",),
        _positive_int,
    ),
    _Option(
        "max_concurrent_requests",
        ("--max-concurrent-requests",),
        ("MAX_CONCURRENT_REQUESTS",),
        _positive_int,
    ),
    _Option("max_waiting_tokens", ("--max-waiting-tokens",), ("MAX_WAITING_TOKENS",), _int),
    _Option("waiting_served_ratio", ("--waiting-served-ratio",), ("WAITING_SERVED_RATIO",), _ratio),
    _Option("max_stop_sequences", ("--max-stop-sequences",), ("MAX_STOP_SEQUENCES",), _int),
    _Option("max_top_n_tokens", ("--max-top-n-tokens",), ("MAX_TOP_N_TOKENS",), _int),
    _Option("max_best_of", ("--max-best-of",), ("MAX_BEST_OF",), _positive_int),
    _Option(
        "max_client_batch_size",
        ("--max-client-batch-size",),
        ("MAX_CLIENT_BATCH_SIZE",),
        _positive_int,
    ),
    _Option("payload_limit", ("--payload-limit",), ("PAYLOAD_LIMIT",), _positive_int),
    _Option(
        "num_cores",
        ("--num-cores",),
        ("HF_NUM_CORES", "SM_ON_TENSOR_PARALLEL_SIZE"),
        _positive_int,
    ),
    _Option("auto_cast_type", ("--auto-cast-type",), ("HF_AUTO_CAST_TYPE",), _dtype),
    _Option("backend", ("--backend",), ("SERVING_BACKEND",), _choice(BACKENDS)),
    _Option("device", ("--device",), ("SERVING_DEVICE",), _choice(DEVICES)),
    # HOSTNAME is not read: shells and Docker set it to the machine's name, not an address.
    _Option("hostname", ("--hostname",), ()),
    _Option("port", ("--port",), ("SAGEMAKER_BIND_TO_PORT", "PORT"), _port, fallback=True),
    _Option("serving_stack", (), ("SERVING_STACK",), _choice(SERVING_STACKS)),
    _Option("model_server_workers", (), ("SAGEMAKER_MODEL_SERVER_WORKERS",), _positive_int),
    _Option("model_server_timeout", (), ("SAGEMAKER_MODEL_SERVER_TIMEOUT",), _positive_int),
    _Option(
        "model_server_timeout_seconds",
        (),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",),
        _positive_int,
    ),
    _Option("messages_api_enabled", (), ("MESSAGES_API_ENABLED",), _bool),
    _Option(
        "trust_remote_code",
        ("--trust-remote-code",),
        ("HF_MODEL_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"),
        _bool,
    ),
    _Option("api_key", ("--api-key",), ("API_KEY",), secret=True),
    _Option(
        "hub_cache",
        ("--huggingface-hub-cache",),
        ("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"),
        fallback=True,
    ),
    _Option("custom_cache_repo", (), ("CUSTOM_CACHE_REPO",)),
    _Option("sm_num_gpus", (), ("SM_NUM_GPUS",), _int),
    _Option("log_level", ("--log-level",), ("LOG_LEVEL",), lambda s: s.strip().upper()),
    _Option("shutdown_grace", ("--shutdown-grace",), ("SHUTDOWN_GRACE_SECONDS",), _seconds),
    _Option(
        "request_header_timeout",
        ("--request-header-timeout",),
        ("REQUEST_HEADER_TIMEOUT",),
        _timeout,
    ),
    _Option(
        "request_body_timeout", ("--request-body-timeout",), ("REQUEST_BODY_TIMEOUT",), _timeout
    ),
    _Option(
        "request_body_min_rate",
        ("--request-body-min-rate",),
        ("REQUEST_BODY_MIN_RATE",),
        _positive_int,
    ),
    _Option("max_connections", ("--max-connections",), ("MAX_CONNECTIONS",), _positive_int),
    _Option("compile_on_start", ("--compile-on-start",), ("NEURON_COMPILE_ON_START",), _bool),
    _Option("export_cache", ("--export-cache",), ("NEURON_EXPORT_CACHE",)),
    _Option("torch_compile", ("--torch-compile",), ("TORCH_COMPILE",), _bool),
    _Option("compile_cache", ("--compile-cache",), ("TORCH_COMPILE_CACHE",)),
    _Option("on_device_sampling", ("--on-device-sampling",), ("NEURON_ON_DEVICE_SAMPLING",), _bool),
    _Option("neuron_rt_num_cores", (), ("NEURON_RT_NUM_CORES",), _positive_int),
    _Option("neuron_rt_visible_cores", (), ("NEURON_RT_VISIBLE_CORES",)),
)
_BOOL_FLAGS = {"trust_remote_code", "compile_on_start"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m handler serve",
        description="Serve a causal LM with TGI, OpenAI and SageMaker routes.",
        exit_on_error=False,
    )
    for option in OPTIONS:
        if not option.flags:
            continue
        if option.name in _BOOL_FLAGS:
            parser.add_argument(*option.flags, dest=option.name, action="store_const", const="true")
        else:
            parser.add_argument(*option.flags, dest=option.name, metavar="VALUE")
    return parser


def parse_flags(argv: Sequence[str]) -> dict[str, str]:
    """Flags given on the command line, as raw strings keyed by setting name."""
    try:
        namespace, unknown = _parser().parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ConfigError(f"Invalid command line: {exc}") from exc
    if unknown:
        known = sorted(flag for option in OPTIONS for flag in option.flags)
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
    for option in OPTIONS:
        if option.name not in flags:
            continue
        if not option.env:
            stranded.append(option.flags[0])
            continue
        for name in option.env:
            out.pop(name, None)
        out[option.env[0]] = flags[option.name]
    if stranded:
        raise ConfigError(
            f"{', '.join(stranded)} cannot reach the MMS worker, which reads only environment "
            "variables; MMS listens on 0.0.0.0 (the address the SageMaker inference toolkit "
            "writes): drop the flag, or use SERVING_STACK=gunicorn"
        )
    return out


def _shown(option: _Option, value: str) -> str:
    return "<redacted>" if option.secret else repr(value)


def read_settings(
    argv: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    compiled: CompiledShape | None = None,
) -> Settings:
    """Build the `Settings` from flags, environment and an exported model's shapes.

    Raises `ConfigError` listing every problem found.
    """
    environ = {} if environ is None else environ
    flags = parse_flags(argv)
    problems: list[str] = []
    given: dict[str, Any] = {}
    source: dict[str, str] = {}

    for option in OPTIONS:
        if option.name in flags:
            raw, origin = flags[option.name], option.flags[0]
        else:
            present = [(name, environ[name]) for name in option.env if environ.get(name, "") != ""]
            if not present:
                continue
            if not option.fallback:
                values = {value.strip() for _, value in present}
                if len(values) > 1:
                    listed = " and ".join(f"{name}={_shown(option, v)}" for name, v in present)
                    problems.append(
                        f"{listed} give different values for one setting: set only "
                        f"{present[0][0]} (the others are older names for it)"
                    )
                    continue
            origin, raw = present[0]
        try:
            given[option.name] = option.parse(raw)
            source[option.name] = origin
        except ValueError as exc:
            problems.append(f"{origin}={_shown(option, raw)} is invalid: {exc}")

    if "hub_cache" not in given and environ.get("HF_HOME"):
        given["hub_cache"] = environ["HF_HOME"].rstrip("/") + "/hub"
        source["hub_cache"] = "HF_HOME"

    values = _derive(given, source, compiled, problems)
    if problems:
        raise ConfigError("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return Settings(**values)


def _derive(
    given: dict[str, Any],
    source: dict[str, str],
    compiled: CompiledShape | None,
    problems: list[str],
) -> dict[str, Any]:
    """Apply compiled shapes and derived defaults; check values against each other."""
    values = dict(given)

    def named(name: str) -> str:
        return f"{source[name]}={values[name]}"

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
                    f"set {source[name]}={compiled_value} (or unset it) or export the model again"
                )

    total = values.setdefault("max_total_tokens", DEFAULT_TOTAL_TOKENS)
    batch = values.setdefault("max_batch_size", DEFAULT_BATCH_SIZE)
    if "max_input_tokens" not in values:
        values["max_input_tokens"] = max(1, total // 2) if total > 1 else 1
    max_input = values["max_input_tokens"]
    if max_input >= total:
        total_name = (
            named("max_total_tokens")
            if "max_total_tokens" in source
            else f"max_total_tokens={total}"
        )
        input_name = (
            named("max_input_tokens")
            if "max_input_tokens" in source
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
    for name in ("max_stop_sequences", "max_top_n_tokens"):
        if name in values and values[name] < 0:
            problems.append(f"{named(name)} must not be negative")
    if values.get("serving_stack") == "mms" and values.get("model_server_workers", 1) != 1:
        problems.append(
            f"{named('model_server_workers')}: each MMS worker is a process that loads its own "
            "copy of the model (and on Neuron claims its own cores), so one worker serves them "
            "all; set SAGEMAKER_MODEL_SERVER_WORKERS=1 or unset it"
        )
    return values


def redacted_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The recognised variables present in `environ`, secrets replaced (for diagnostics)."""
    out = {}
    for option in OPTIONS:
        for name in option.env:
            if name in environ:
                out[name] = "<redacted>" if option.secret else environ[name]
    return out
