"""End-to-end benchmark: our server, the ceiling and the peers, in one run, on SmolLM2.

    python -m benchmarks.e2e                # what `make bench` runs
    python -m benchmarks.e2e --quick        # smoke run: levels 1 and 4, 16 new tokens
    python -m benchmarks.e2e --quick --skip ours,ceiling,toolkit    # the CPU peers alone

Every server is measured with the same load generator (`benchmarks.load`): the same prompts,
streaming `/v1/completions`, greedy (`temperature: 0`), `ignore_eos`, the same levels of C
closed-loop clients. A server with `--batch-sizes` slots serves the levels up to its size (by
default 16 slots for C = 1, 4, 8, 16 and 32 slots for C = 32), with `--max-total-tokens` tokens
per slot (2,048: 16 x 2,048 is the issue's memory comparison).

1. Our server over HTTP (`python -m handler serve`): a first start with an empty compile cache,
   an eager start (compiled step off), then the restart with the cache, which is measured:
   closed-loop levels, paired runs against the bare loop, then Poisson arrivals.
2. The ceiling: the fastest bare `transformers` loop at batch = C, in the server's dtype
   (`benchmarks.ceiling`), plus the bare prefill of each prompt and the bare decode step.
3. The CPU peers (`benchmarks.cpu_peers`, each installed into its own virtual environment on
   first use): llama.cpp's `llama-server` (Q4_1 GGUF, `--parallel` slots) and vLLM's CPU build
   (bf16, `--max-num-seqs`); each started twice (first start, restart) and measured.
4. The SageMaker Hugging Face inference toolkit with MMS, one worker, over POST `/invocations`
   (`benchmarks.peer`), levels up to 16 (it answers one request at a time).

`--skip ours,ceiling,llama.cpp,vllm,toolkit` leaves any of them out; a peer that cannot be
installed here (a Debian package missing without root, a failed build) is skipped with the
reason in the report.

The targets that compare our server with the bare loop (1, 3, 4) pair each of our measurements
with the bare loop measured in this process just before it (`paired_runs`): on 2 shared cores
the machine's speed drifts by up to 25% within a minute, more than the margins being checked.

Before each measurement the run waits (up to `--quiet-timeout` s) until processes that are not ours
use less than `--quiet-cores` CPU cores, and records what it saw. Writes `--out` (JSON), the
Markdown table beside it (`.md`) and the plots (`-throughput.png`, `-latency.png`).
"""

from __future__ import annotations

import argparse
import functools
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import torch
from transformers import AutoTokenizer

from benchmarks import report as reporting
from benchmarks.ceiling import BareReference, measure_ceiling
from benchmarks.cpu_peers import (
    Peer,
    PeerSettings,
    PeerUnavailable,
    ensure_installed,
    first_answer,
    peers,
    peers_root,
    served_model,
)
from benchmarks.load import (
    PROMPTS,
    Client,
    LoadResult,
    OpenAICompletions,
    SageMakerInvocations,
    run_arrivals,
    run_level,
)
from benchmarks.machine import machine, matmul_gflops
from benchmarks.monitor import (
    GroupMonitor,
    Quiet,
    group_processes,
    leader_pss_mib,
    wait_for_quiet,
)
from benchmarks.peer import default_venv, ensure_venv, start_peer
from benchmarks.servers import (
    COMPILE_CACHE_ENV,
    EAGER_ENV,
    ServerProcess,
    compile_cache_env,
    start_ours,
)
from handler.config import DTYPE_ALIASES

_STARTED = time.perf_counter()
WARMUP_REQUESTS = 4
"""Fewest unmeasured requests before a level's measured ones (one client sends them in turn)."""
MEASURED_REQUESTS = 8
"""Fewest measured requests of a closed-loop level."""
BUSY_LEVEL, BUSY_ROUNDS = 16, 4
"""Fewest measured rounds from BUSY_LEVEL clients up: in two rounds at C = 32 (7 s) the first burst
of prompts and the last answers' tail weigh on the window, and ours read 508.7 then 575.6 tok/s in
two runs of the same build (2 and 6 rounds)."""


@dataclass(frozen=True)
class Options:
    levels: list[int]
    batch_sizes: list[int]
    max_new_tokens: int
    max_total_tokens: int
    rounds: int
    """Measured requests per client at each level."""
    warmup_rounds: int
    arrival_rate: float | None
    """Requests/s under arrivals; None: `arrival_load` x our requests/s at C = batch size."""
    arrival_load: float
    arrival_requests_per_slot: int
    """Requests of the arrivals run per slot of the server's batch."""
    ceiling_repeats: int
    pairs: int
    """Paired measurements per server for targets 1, 3 and 4 (see `paired_runs`)."""
    dtype: str | None
    """Our server's and the ceiling's dtype; None: the server's default."""
    quantize: str | None
    """Our server's `QUANTIZE` (weight-only int8 in its compiled step); None: off."""
    quiet_cores: float
    """Other processes' CPU use (cores) under which the machine counts as quiet."""
    quiet_timeout_s: float
    retries: int
    """Runs of a measurement again when other processes were busy during it."""
    skip: list[str]
    """Systems left out: any of `SYSTEMS`."""
    peer_venv: str
    """The SageMaker toolkit peer's virtual environment."""
    peers_root: str
    """Where the CPU peers' virtual environments live."""
    build_jobs: int | None
    """Parallel compile jobs of the llama.cpp build; None: the usable CPUs."""
    model_dir: str
    quick: bool

    def runs(self, system: str) -> bool:
        return system not in self.skip


SYSTEMS = ("ours", "ceiling", "llama.cpp", "vllm", "toolkit")
TOOLKIT_MAX_LEVEL = 16
"""The toolkit answers one request at a time: higher levels only queue longer."""


def progress(message: str) -> None:
    elapsed = time.perf_counter() - _STARTED
    print(f"[benchmarks.e2e {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def settle(options: Options, server: ServerProcess | None) -> Quiet:
    """Wait for the machine to calm down; processes of `server` are ours and do not count."""
    ours = {p.pid for p in group_processes(server.pgid)} if server else set()
    quiet = wait_for_quiet(ours, options.quiet_cores, options.quiet_timeout_s)
    if not quiet.quiet:
        progress(
            f"machine still busy after {quiet.waited_s:.0f} s ({quiet.other_cpu_cores:.2f} "
            f"cores: {', '.join(quiet.busiest)}); measuring anyway, recorded as not quiet"
        )
    return quiet


def measure(
    options: Options,
    server: ServerProcess,
    what: str,
    run_once: Callable[[Quiet], LoadResult],
) -> LoadResult:
    """Run one measurement once the machine is quiet; run it again (at most `options.retries`
    times) when other processes used CPU during it, and keep the least disturbed run."""
    best: LoadResult | None = None
    for attempt in range(options.retries + 1):
        quiet = settle(options, server)
        progress(what if attempt == 0 else f"{what}, again (attempt {attempt + 1})")
        result = run_once(quiet)
        others = result.server.others_cpu_cores if result.server else 0.0
        if best is None or best.server is None or others < best.server.others_cpu_cores:
            best = result
        if others < options.quiet_cores:
            break
        progress(f"{what}: other processes used {others:.2f} cores during the measurement")
    assert best is not None
    return best


def measured_rounds(options: Options, level: int) -> int:
    """Measured requests per client: at least MEASURED_REQUESTS per level (at C = 1, two
    requests made the level's figure swing by a third between runs), and BUSY_ROUNDS from
    BUSY_LEVEL clients up."""
    busy = BUSY_ROUNDS if level >= BUSY_LEVEL else 1
    return max(options.rounds, -(-MEASURED_REQUESTS // level), busy)


def warmup_rounds(options: Options, level: int) -> int:
    """Unmeasured requests per client: at least WARMUP_REQUESTS per level, whatever the client
    count."""
    return max(options.warmup_rounds, -(-WARMUP_REQUESTS // level))


def run_levels(
    options: Options,
    client: Client,
    server: ServerProcess,
    monitor: GroupMonitor,
    name: str,
    levels: Sequence[int],
) -> list[LoadResult]:
    results = []
    for level in levels:
        warmup = warmup_rounds(options, level)
        result = measure(
            options,
            server,
            f"{name}: {level} clients",
            lambda quiet, level=level, warmup=warmup: run_level(
                client,
                level,
                measured_rounds(options, level),
                warmup,
                monitor=monitor,
                quiet=quiet,
            ),
        )
        progress(
            f"{name}: {level} clients: {result.tok_s:.1f} tok/s, TTFT p50 "
            f"{result.ttft_p50_ms or 0:.0f} ms, {result.errors} errors"
        )
        results.append(result)
    return results


def paired_runs(
    options: Options,
    client: Client,
    server: ServerProcess,
    monitor: GroupMonitor,
    name: str,
    batch: int,
    reference: BareReference,
) -> list[dict[str, float | None]]:
    """`options.pairs` times: the bare prefill of the prompts, then our level of 1 client
    (target 3); the bare loop at `batch`, then our level of `batch` clients (target 1). Each
    bare measurement runs in this process while the server idles, seconds before ours, so that
    both see the same machine; the targets take the median pair."""
    pairs = []
    for i in range(options.pairs):
        prefill_ms = reference.prefill_p50_ms()
        alone = measure(
            options,
            server,
            f"{name}: pair {i + 1}: 1 client (bare prefill p50 just before: {prefill_ms:.1f} ms)",
            lambda quiet: run_level(
                client, 1, options.rounds, warmup_rounds(options, 1), monitor=monitor, quiet=quiet
            ),
        )
        point = reference.point(batch)
        full = measure(
            options,
            server,
            f"{name}: pair {i + 1}: {batch} clients (bare loop just before: "
            f"{point.tok_s:.1f} tok/s)",
            lambda quiet: run_level(
                client,
                batch,
                options.rounds,
                warmup_rounds(options, batch),
                monitor=monitor,
                quiet=quiet,
            ),
        )
        progress(
            f"{name}: pair {i + 1}: TTFT p50 {alone.ttft_p50_ms or 0:.1f} ms, "
            f"{full.tok_s:.1f} tok/s ({full.tok_s / point.tok_s:.2f}x the bare loop)"
        )
        pairs.append(
            {
                "bare_prefill_p50_ms": prefill_ms,
                "ttft_p50_ms": alone.ttft_p50_ms,
                "ceiling_tok_s": point.tok_s,
                "ceiling_step_ms": point.step_ms,
                "tok_s": full.tok_s,
                "errors": alone.errors + full.errors,
            }
        )
    return pairs


def arrival_rate(options: Options, batch: int, levels: Sequence[LoadResult]) -> float:
    """The given rate, else `arrival_load` x the requests/s measured with C = `batch` clients
    (or the largest level below it)."""
    if options.arrival_rate:
        return options.arrival_rate
    below = [lv for lv in levels if lv.concurrency and lv.concurrency <= batch] or list(levels)
    return options.arrival_load * max(below, key=lambda lv: lv.concurrency or 0).req_s


def levels_for(options: Options, size: int) -> list[int]:
    """The levels a server of `size` slots serves: those above the next smaller size, up to its
    own (the largest size also takes any level above it)."""
    sizes = sorted(options.batch_sizes)

    def home(level: int) -> int:
        return next((s for s in sizes if s >= level), sizes[-1])

    return [level for level in options.levels if home(level) == size]


def timed_start(
    options: Options, what: str, start: Callable[[], ServerProcess]
) -> tuple[ServerProcess, dict[str, float]]:
    """Start a server once the machine is quiet; time it to ready (`/health` 200) and to the
    end of one streamed 16-token greedy answer."""
    settle(options, None)
    progress(f"{what}: starting")
    started = time.perf_counter()
    server = start()
    ready = time.perf_counter() - started
    try:
        _, answer_s = first_answer(server.url, served_model(server.url))
    except BaseException:
        server.stop()
        raise
    timing = {"ready_s": ready, "first_answer_s": ready + answer_s}
    progress(f"{what}: ready in {ready:.1f} s, first answer at {ready + answer_s:.1f} s")
    return server, timing


def compiled_bare_step_ms(
    options: Options, batch: int, dtype: str, compile_cache: Path, prompt_tokens: int
) -> float | None:
    """Target 3's reference: the compiled decode step our server runs, bare (no engine, no HTTP),
    at `batch` rows (ms). The package is the one our server built into `compile_cache` (loaded,
    not rebuilt); the rows decode `max_new_tokens` steps from `prompt_tokens` cached positions
    (the benchmark prompts' mean length), and the step time is the mean over those steps, best of
    `ceiling_repeats` runs, as the bare loop's step. None where the model has no compiled step."""
    from handler.model import compiled
    from handler.model.torch_backend import TorchBackend

    short = DTYPE_ALIASES[dtype]
    backend = TorchBackend.from_pretrained(
        options.model_dir, batch, options.max_total_tokens, dtype=short
    )
    model_path = str(Path(options.model_dir).resolve())
    spec = compiled.PackageSpec(
        model_path, short, "cpu", batch, options.max_total_tokens, options.quantize
    )
    root = compile_cache / COMPILE_CACHE_ENV["TORCH_COMPILE_CACHE"]
    prepared = compiled.prepare(spec, root, backend.model.config)
    if prepared.step is None:
        progress(f"compiled bare step: not measured ({prepared.reason})")
        return None
    backend.use_compiled(prepared.step)
    rows = list(range(batch))
    tokens = torch.randint(0, backend.model.config.vocab_size, (batch,))
    steps = max(1, min(options.max_new_tokens, options.max_total_tokens - prompt_tokens - 1))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(options.ceiling_repeats + 1):  # the first run warms up
            started = time.perf_counter()
            for step in range(steps):
                positions = torch.full((batch,), prompt_tokens + step)
                backend.decode(tokens, positions, rows)
            best = min(best, (time.perf_counter() - started) / steps)
    return best * 1e3


def bench_ours(options: Options, batch: int, work: Path) -> dict[str, Any]:
    """Our server with `batch` slots: a first start with an empty compile cache, an eager start
    (the smallest batch size only), then the restart with the cache, measured. The smallest
    batch size also runs the paired bare-loop comparisons and the Poisson arrivals."""
    name = f"ours-b{batch}"
    levels_here = levels_for(options, batch)
    primary = batch == min(options.batch_sizes)
    cache = work / f"{name}-compile-cache"
    quantized = {"QUANTIZE": options.quantize} if options.quantize else {}

    def start(extra_env: dict[str, str], log_name: str) -> Callable[[], ServerProcess]:
        return lambda: start_ours(
            options.model_dir,
            batch,
            options.max_total_tokens,
            work,
            dtype=options.dtype,
            extra_env={**quantized, **extra_env},
            log_name=log_name,
        )

    startup: dict[str, Any] = {}
    first, startup["first"] = timed_start(
        options,
        f"{name}: first start (empty compile cache)",
        start(compile_cache_env(cache), f"{name}-first"),
    )
    first.stop()
    if primary:
        eager_env = {**compile_cache_env(work / f"{name}-eager-cache"), **EAGER_ENV}
        eager_env["QUANTIZE"] = ""  # the eager step is never quantized
        eager, startup["eager"] = timed_start(
            options, f"{name}: eager start ({EAGER_ENV})", start(eager_env, f"{name}-eager")
        )
        eager.stop()
    server, startup["restart"] = timed_start(
        options, f"{name}: restart (compile cache kept)", start(compile_cache_env(cache), name)
    )
    startup["compile_cache_env"] = list(compile_cache_env(cache))
    startup["eager_env"] = dict(EAGER_ENV)
    with server, GroupMonitor(server.pgid) as monitor:
        info = requests.get(f"{server.url}/info", timeout=10).json()
        client = OpenAICompletions(
            server.url, options.max_new_tokens, model=served_model(server.url)
        )
        levels = run_levels(options, client, server, monitor, name, levels_here)
        arrivals = None
        arrivals_step_ms = compiled_step_ms = None
        pairs: list[dict[str, float | None]] = []
        if primary:
            reference = BareReference(
                options.model_dir,
                PROMPTS,
                options.max_new_tokens,
                options.ceiling_repeats,
                info["dtype"],
            )
            pairs = paired_runs(options, client, server, monitor, name, batch, reference)
            rate = arrival_rate(options, batch, levels)
            count = options.arrival_requests_per_slot * batch
            arrivals_step_ms = reference.point(batch).step_ms
            compiled_step_ms = compiled_bare_step_ms(
                options, batch, info["dtype"], cache, reference.prompt_tokens
            )
            arrivals = measure(
                options,
                server,
                f"{name}: {count} requests arriving at {rate:.2f}/s",
                lambda quiet: run_arrivals(client, rate, count, monitor=monitor, quiet=quiet),
            )
            progress(
                f"{name}: arrivals: ITL p90 {arrivals.itl_p90_ms or 0:.1f} ms (bare step just "
                f"before: {arrivals_step_ms:.1f} ms; compiled bare step: "
                f"{'not measured' if compiled_step_ms is None else f'{compiled_step_ms:.1f} ms'})"
            )
            del reference
            gc.collect()
        master_mib, workers_mib = leader_pss_mib(server.pgid)
    runs = [*levels, *([arrivals] if arrivals else [])]
    memory = reporting.model_memory(options.model_dir, info["dtype"], info.get("kv_cache_dtype"))
    return {
        "label": f"ours, batch {batch}" + (f", {options.quantize} weights" if quantized else ""),
        "family": "ours",
        "batch_size": batch,
        "slots": batch,
        "max_total_tokens": options.max_total_tokens,
        "streaming": True,
        "info": {
            k: info.get(k)
            for k in ("backend", "device", "dtype", "kv_cache_dtype", "max_batch_size")
        },
        "startup": startup,
        "levels": [r.as_dict() for r in levels],
        "arrivals": arrivals.as_dict() if arrivals else None,
        "arrivals_bare_step_ms": arrivals_step_ms,
        "arrivals_compiled_step_ms": compiled_step_ms,
        "pairs": pairs,
        "peak_rss_mib": max(r.server.peak_rss_mib for r in runs if r.server),
        "peak_pss_mib": max(r.server.peak_pss_mib for r in runs if r.server),
        "memory": {
            "dtype": info["dtype"],
            "kv_cache_dtype": info.get("kv_cache_dtype") or info["dtype"],
            "parameters": memory.parameters,
            "weights_mib": memory.weights_mib,
            "kv_cache_mib": memory.kv_cache_mib(batch, options.max_total_tokens),
            "runtime_mib": runtime_floor_mib(),
            "master_pss_mib": master_mib,
            "worker_pss_mib": workers_mib,
        },
    }


@functools.cache
def runtime_floor_mib() -> float:
    """PSS of a Python process that imported what the server's worker imports (torch,
    `transformers`' modeling code, Flask, gunicorn), before any weights: the part of the server's
    memory that no model or cache size changes."""
    script = (
        "import psutil, gunicorn.app.base, handler.engine, handler.server.app; "
        "print(psutil.Process().memory_full_info().pss)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def bench_toolkit(options: Options, work: Path) -> dict[str, Any]:
    venv = ensure_venv(Path(options.peer_venv))
    progress("toolkit: starting the SageMaker HF inference toolkit (MMS, one worker)")
    started = time.perf_counter()
    server = start_peer(options.model_dir, venv, work / "peer")
    ready = time.perf_counter() - started
    with server, GroupMonitor(server.pgid) as monitor:
        client = SageMakerInvocations(server.url, options.max_new_tokens)
        levels_here = [c for c in options.levels if c <= TOOLKIT_MAX_LEVEL]
        levels = run_levels(options, client, server, monitor, "toolkit", levels_here)
    return {
        "label": "SageMaker HF toolkit + MMS",
        "family": "toolkit",
        "slots": 1,
        "streaming": False,
        # Ready: its model loaded on the first (warm-up) request, included.
        "startup": {"first": {"ready_s": ready, "first_answer_s": ready}},
        "levels": [r.as_dict() for r in levels],
        "peak_rss_mib": max(r.server.peak_rss_mib for r in levels if r.server),
        "peak_pss_mib": max(r.server.peak_pss_mib for r in levels if r.server),
    }


def bench_cpu_peer(
    options: Options, peer: Peer, venv: Path, slots: int, work: Path
) -> dict[str, Any]:
    """One CPU peer with `slots` slots: a first start (empty compile cache), a restart, and
    the levels up to `slots` on the restarted server."""
    name = f"{peer.key}-{slots}"
    settings = PeerSettings(slots, options.max_total_tokens)
    cache = work / f"{name}-cache"
    model_dir = Path(options.model_dir)

    def start(suffix: str) -> Callable[[], ServerProcess]:
        return lambda: peer.start(venv, settings, work, model_dir, cache, suffix)

    startup: dict[str, Any] = {}
    first, startup["first"] = timed_start(options, f"{name}: first start", start("-first"))
    first.stop()
    server, startup["restart"] = timed_start(options, f"{name}: restart", start(""))
    with server, GroupMonitor(server.pgid) as monitor:
        client = OpenAICompletions(
            server.url, options.max_new_tokens, model=served_model(server.url)
        )
        levels = run_levels(options, client, server, monitor, name, levels_for(options, slots))
    return {
        "label": f"{peer.label}, {slots} slots",
        "family": peer.key,
        "slots": slots,
        "max_total_tokens": options.max_total_tokens,
        "weights": peer.weights,
        "streaming": True,
        "startup": startup,
        "levels": [r.as_dict() for r in levels],
        "peak_rss_mib": max(r.server.peak_rss_mib for r in levels if r.server),
        "peak_pss_mib": max(r.server.peak_pss_mib for r in levels if r.server),
    }


def install_cpu_peers(options: Options, skipped: dict[str, str]) -> dict[str, tuple[Peer, Path]]:
    """Install (first use) or find each CPU peer not skipped; a peer that cannot be had here
    goes to `skipped` with the reason."""
    ready = {}
    for key, peer in peers(options.build_jobs).items():
        if not options.runs(key):
            continue
        try:
            if not peer.install.installed(Path(options.peers_root)):
                progress(f"{key}: installing into {peer.install.venv(Path(options.peers_root))}")
            ready[key] = (peer, ensure_installed(peer.install, Path(options.peers_root)))
        except PeerUnavailable as exc:
            skipped[key] = str(exc)
            progress(f"{key}: skipped: {exc}")
    return ready


def bench_ceiling(options: Options, dtype: str) -> dict[str, Any]:
    batches = sorted({*options.levels, *options.batch_sizes})
    settle(options, None)
    progress(f"ceiling: bare transformers loop, {dtype}, batch sizes {batches}")
    ceiling = measure_ceiling(
        options.model_dir,
        PROMPTS,
        batches,
        options.max_new_tokens,
        options.ceiling_repeats,
        dtype,
    )
    for point in ceiling.points:
        progress(
            f"ceiling: batch {point.batch_size}: {point.tok_s:.1f} tok/s ({point.faster_path}), "
            f"step {point.step_ms:.1f} ms"
        )
    gc.collect()
    return asdict(ceiling)


def run(options: Options) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(options.model_dir)
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": asdict(options),
        "prompts": {"count": len(PROMPTS), "tokens": lengths, "mean": statistics.mean(lengths)},
        "systems": {},
    }
    skipped: dict[str, str] = {f"{key}": "--skip" for key in options.skip}
    report["skipped"] = skipped
    cpu_peers = install_cpu_peers(options, skipped)
    speed = report["matmul_gflops"] = {"start": matmul_gflops()}
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    failed = False
    try:
        sizes = [size for size in sorted(options.batch_sizes) if levels_for(options, size)]
        if options.runs("ours"):
            for batch in sizes:
                report["systems"][f"ours-b{batch}"] = bench_ours(options, batch, work)
        if options.runs("ceiling"):
            dtype = options.dtype or next(
                (s["info"]["dtype"] for s in report["systems"].values()), "float32"
            )
            report["systems"]["ceiling"] = bench_ceiling(options, dtype)
            if dtype != "float32":
                # The checkpoint's own precision: the ceiling before reduced precision raised it.
                report["ceiling_float32"] = bench_ceiling(options, "float32")
        speed["after ours"] = matmul_gflops()
        for key, (peer, venv) in cpu_peers.items():
            for slots in sizes:
                try:
                    report["systems"][f"{key}-{slots}"] = bench_cpu_peer(
                        options, peer, venv, slots, work
                    )
                except (RuntimeError, TimeoutError, requests.RequestException) as exc:
                    # One peer failing must not cost the rest of the run: say so and go on.
                    failed = True
                    skipped[f"{key}-{slots}"] = f"failed: {str(exc)[:2000]}"
                    progress(f"{key}, {slots} slots: failed, skipped: {exc}")
        if options.runs("toolkit"):
            report["systems"]["toolkit"] = bench_toolkit(options, work)
    except BaseException:
        progress(f"failed: the servers' logs are kept in {work}")
        raise
    if failed:
        progress(f"the servers' logs are kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    speed["end"] = matmul_gflops()
    report["duration_s"] = time.perf_counter() - _STARTED
    return report


# --- command line ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive integers")
    return values


def _systems(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown system {', '.join(unknown)}: choose from {', '.join(SYSTEMS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> tuple[Options, Path, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e",
        description="Our server, the bare transformers ceiling, llama.cpp, vLLM CPU and the "
        "SageMaker HF toolkit, the same load on each.",
    )
    parser.add_argument("--out", type=Path, default=None, help="default results/e2e.json")
    parser.add_argument("--levels", type=_ints, default=None, help="default 1,4,8,16,32")
    parser.add_argument(
        "--batch-sizes",
        type=_ints,
        default=[16, 32],
        help="slots of each server (ours, llama.cpp, vLLM); each serves the levels up to its "
        "size; default 16,32",
    )
    parser.add_argument("--max-new-tokens", type=_positive, default=None, help="default 64")
    parser.add_argument(
        "--max-total-tokens", type=_positive, default=2048, help="tokens per slot, every server"
    )
    parser.add_argument("--rounds", type=_positive, default=None, help="default 2")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--arrival-rate", type=float, default=None, help="requests/s")
    parser.add_argument(
        "--arrival-load",
        type=float,
        default=0.75,
        help="without --arrival-rate: this share of the requests/s at C = batch size",
    )
    parser.add_argument(
        "--arrival-requests-per-slot", type=_positive, default=None, help="default 4"
    )
    parser.add_argument("--ceiling-repeats", type=_positive, default=None, help="default 2")
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="paired bare/ours measurements per server for targets 1 and 3; default 3",
    )
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (server default otherwise)")
    parser.add_argument(
        "--quantize", choices=["int8"], default=None, help="our server's QUANTIZE (default off)"
    )
    parser.add_argument("--quiet-cores", type=float, default=0.15)
    parser.add_argument("--quiet-timeout", type=float, default=None, help="default 120 s")
    parser.add_argument(
        "--retries", type=int, default=None, help="measure again when disturbed; default 2"
    )
    parser.add_argument(
        "--skip",
        type=_systems,
        default=[],
        help=f"systems to leave out, comma-separated: {','.join(SYSTEMS)}",
    )
    parser.add_argument("--no-peer", action="store_true", help="the same as --skip toolkit")
    parser.add_argument("--peer-venv", type=Path, default=default_venv())
    parser.add_argument("--peers-root", type=Path, default=peers_root())
    parser.add_argument(
        "--build-jobs", type=_positive, default=None, help="llama.cpp build; default: usable CPUs"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="default: bundled SmolLM2")
    parser.add_argument(
        "--readme", type=Path, default=None, help="update this README's benchmark summary"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: levels 1,4, 16 new tokens, 1 round, short waits; "
        "writes results/quick/e2e.json unless --out",
    )
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if quick else full)

    if args.model_dir is None:
        from handler.testing.smollm2 import ensure_model

        args.model_dir = ensure_model()
    results = Path(__file__).parent / "results"
    out = args.out or (results / "quick" / "e2e.json" if quick else results / "e2e.json")
    options = Options(
        levels=pick(args.levels, [1, 4, 8, 16, 32], [1, 4]),
        batch_sizes=args.batch_sizes,
        max_new_tokens=pick(args.max_new_tokens, 64, 16),
        max_total_tokens=args.max_total_tokens,
        rounds=pick(args.rounds, 2, 1),
        warmup_rounds=args.warmup_rounds,
        arrival_rate=args.arrival_rate,
        arrival_load=args.arrival_load,
        arrival_requests_per_slot=pick(args.arrival_requests_per_slot, 4, 1),
        ceiling_repeats=pick(args.ceiling_repeats, 2, 1),
        pairs=pick(args.pairs, 3, 1),
        dtype=args.dtype,
        quantize=args.quantize,
        quiet_cores=args.quiet_cores,
        quiet_timeout_s=pick(args.quiet_timeout, 120.0, 10.0),
        retries=pick(args.retries, 2, 0),
        skip=sorted({*args.skip, *(["toolkit"] if args.no_peer else [])}),
        peer_venv=str(args.peer_venv),
        peers_root=str(args.peers_root),
        build_jobs=args.build_jobs,
        model_dir=str(args.model_dir),
        quick=quick,
    )
    return options, out, args.readme


def main(argv: Sequence[str] | None = None) -> None:
    options, out, readme = parse_args(argv)
    report = run(options)
    markdown = reporting.write(report, out)
    progress(f"wrote {out}, {out.with_suffix('.md')} and the plots beside them")
    if readme:
        block = reporting.readme_block(report, reporting.relative_dir(out, readme))
        reporting.update_readme(readme, block)
        progress(f"updated the benchmark summary in {readme}")
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
