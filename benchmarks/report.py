"""The end-to-end report: the issue's targets as ratios, a Markdown table and PNG plots.

Everything here reads the JSON that `benchmarks.e2e` writes, so a report can be rebuilt without
measuring again:

    python -m benchmarks.report benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

MIB = 1024 * 1024
CEILING_SHARE = 0.95
PEER_SPEEDUP = {8: 4.5, 16: 7.0}
TTFT_SLACK_MS = 15.0
ITL_FACTOR = 1.5
RSS_SLACK_MIB = 300.0


# --- model sizes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMemory:
    """What the model needs in memory, from its config: weights and KV cache per token."""

    parameters: int
    dtype: str
    weights_mib: float
    kv_bytes_per_token: int
    """Keys and values of every layer for one token of one sequence."""

    def kv_cache_mib(self, batch_size: int, max_total_tokens: int) -> float:
        return self.kv_bytes_per_token * batch_size * max_total_tokens / MIB


def model_memory(model_dir: str, dtype: str, kv_dtype: str | None = None) -> ModelMemory:
    """Count parameters on the meta device (tied embeddings once) and size the KV cache:
    2 x layers x kv_heads x head_dim x bytes per element (of `kv_dtype`, default `dtype`), per
    token."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    itemsize = getattr(torch, dtype).itemsize
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelMemory(
        parameters=parameters,
        dtype=dtype,
        weights_mib=parameters * itemsize / MIB,
        kv_bytes_per_token=2
        * config.num_hidden_layers
        * kv_heads
        * head_dim
        * getattr(torch, kv_dtype or dtype).itemsize,
    )


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, measured: `value` against `bound` (`value / bound` = ratio)."""

    number: int
    name: str
    system: str
    value: float | None
    bound: float | None
    unit: str
    higher_is_better: bool
    detail: str

    @property
    def met(self) -> bool | None:
        if self.value is None or self.bound is None:
            return None
        if self.higher_is_better:
            return self.value >= self.bound
        return self.value <= self.bound


def _level(system: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((lv for lv in system["levels"] if lv["concurrency"] == concurrency), None)


def _ceiling_point(report: dict[str, Any], batch: int) -> dict[str, Any] | None:
    ceiling = report["systems"].get("ceiling")
    if not ceiling:
        return None
    return next((p for p in ceiling["points"] if p["batch_size"] == batch), None)


def _median_pair(
    pairs: Sequence[dict[str, Any]], ratio: Any
) -> tuple[dict[str, Any] | None, list[float]]:
    """The pair whose `ratio(pair)` is the median (the lower one of an even count) and every
    pair's ratio, in order; pairs lacking a value are left out."""
    scored = []
    for pair in pairs:
        try:
            scored.append((ratio(pair), pair))
        except (TypeError, ZeroDivisionError):
            continue
    if not scored:
        return None, []
    ordered = sorted(scored, key=lambda item: item[0])
    return ordered[(len(ordered) - 1) // 2][1], [r for r, _ in scored]


def _ratios(values: Sequence[float]) -> str:
    """`median of 3 pairs (0.97, 1.01, 0.95)`."""
    listed = ", ".join(f"{v:.2f}" for v in values)
    return f"median of {len(values)} pairs ({listed})" if len(values) > 1 else f"1 pair ({listed})"


def engine_targets(report: dict[str, Any]) -> list[Target]:
    """The earlier targets of our engine against the bare loop (and the SageMaker toolkit), for
    each of our configurations, from one run's numbers."""
    systems = report["systems"]
    ceiling = systems.get("ceiling")
    peer = systems.get("toolkit") or systems.get("peer")
    found: list[Target] = []
    for key, ours in systems.items():
        if not key.startswith("ours") or (ours.get("family") and not ours.get("pairs")):
            continue  # a server size measured without the paired runs (C = 32 only)
        batch = ours["batch_size"]
        label = ours["label"]
        at_batch = _level(ours, batch)
        point = _ceiling_point(report, batch)
        pairs = ours.get("pairs") or []
        pair, ratios = _median_pair(pairs, lambda p: p["tok_s"] / p["ceiling_tok_s"])
        if pair:
            throughput = Target(
                1,
                f"tokens/s at concurrency {batch} / ceiling at batch {batch}, paired",
                label,
                pair["tok_s"] / pair["ceiling_tok_s"],
                CEILING_SHARE,
                "x",
                True,
                f"{_ratios(ratios)}: {_num(pair['tok_s'])} vs "
                f"{_num(pair['ceiling_tok_s'])} tok/s measured just before; the table's "
                f"separate runs: {_num(at_batch and at_batch['tok_s'])} vs "
                f"{_num(point and point['tok_s'])}",
            )
        else:
            throughput = Target(
                1,
                f"tokens/s at concurrency {batch} / ceiling at batch {batch}",
                label,
                at_batch["tok_s"] / point["tok_s"] if at_batch and point else None,
                CEILING_SHARE,
                "x",
                True,
                f"{_num(at_batch and at_batch['tok_s'])} vs {_num(point and point['tok_s'])} tok/s",
            )
        found.append(throughput)
        if batch in PEER_SPEEDUP and peer:
            theirs = _level(peer, batch)
            found.append(
                Target(
                    2,
                    f"tokens/s at concurrency {batch} / peer's",
                    label,
                    at_batch["tok_s"] / theirs["tok_s"] if at_batch and theirs else None,
                    PEER_SPEEDUP[batch],
                    "x",
                    True,
                    f"{_num(at_batch and at_batch['tok_s'])} vs "
                    f"{_num(theirs and theirs['tok_s'])} tok/s",
                )
            )
        alone = _level(ours, 1)
        prefill = ceiling["prefill_p50_ms"] if ceiling else None
        pair, ratios = _median_pair(
            pairs, lambda p: p["ttft_p50_ms"] / (p["bare_prefill_p50_ms"] + TTFT_SLACK_MS)
        )
        if pair:
            first_token = Target(
                3,
                "TTFT p50 at concurrency 1 (ms) vs bare prefill p50 + 15 ms, paired",
                label,
                pair["ttft_p50_ms"],
                pair["bare_prefill_p50_ms"] + TTFT_SLACK_MS,
                "ms",
                False,
                f"{_ratios(ratios)}; bare prefill p50 "
                f"{_num(pair['bare_prefill_p50_ms'], 1)} ms over the prompts, alone, measured "
                f"just before; the table's separate runs: "
                f"{_num(alone and alone['ttft_p50_ms'], 1)} vs {_num(prefill, 1)} + 15 ms",
            )
        else:
            first_token = Target(
                3,
                "TTFT p50 at concurrency 1 (ms) vs bare prefill p50 + 15 ms",
                label,
                alone["ttft_p50_ms"] if alone else None,
                prefill + TTFT_SLACK_MS if prefill is not None else None,
                "ms",
                False,
                f"bare prefill p50 {_num(prefill, 1)} ms over the prompts, alone",
            )
        found.append(first_token)
        arrivals = ours.get("arrivals")
        step = ours.get("arrivals_bare_step_ms") or (point["step_ms"] if point else None)
        found.append(
            Target(
                4,
                f"ITL p90 under arrivals (ms) vs 1.5 x bare decode step at batch {batch}",
                label,
                arrivals["itl_p90_ms"] if arrivals else None,
                ITL_FACTOR * step if step is not None else None,
                "ms",
                False,
                f"bare step {_num(step, 1)} ms"
                + (
                    " (measured just before the arrivals); "
                    if ours.get("arrivals_bare_step_ms")
                    else "; "
                )
                + (
                    f"{arrivals['arrival_rate_rps']:.2f} req/s, "
                    f"{arrivals['mean_in_flight']:.1f} in flight on average"
                    if arrivals
                    else "no arrivals run"
                ),
            )
        )
        memory = ours.get("memory")
        found.append(
            Target(
                5,
                "server peak memory (PSS, MiB) vs weights + KV cache + 300 MiB",
                label,
                ours.get("peak_pss_mib", ours.get("peak_rss_mib")),
                memory["weights_mib"] + memory["kv_cache_mib"] + RSS_SLACK_MIB if memory else None,
                "MiB",
                False,
                f"weights {_num(memory and memory['weights_mib'])} MiB "
                f"({memory and memory['dtype']}) + KV cache "
                f"{_num(memory and memory['kv_cache_mib'])} MiB "
                f"({memory and memory.get('kv_cache_dtype', memory['dtype'])}); "
                f"Python + torch + transformers + server imported, no model: "
                f"{_num(memory and memory.get('runtime_mib'))} MiB; at the end, gunicorn's "
                f"master {_num(memory and memory.get('master_pss_mib'))} MiB and its worker "
                f"{_num(memory and memory.get('worker_pss_mib'))} MiB; summed RSS "
                f"{_num(ours.get('peak_rss_mib'))} MiB",
            )
        )
    return found


# --- the targets of issue 15: ours against the CPU peers -----------------------------------------

PEER_FAMILIES = {"llama.cpp": "llama.cpp", "vllm": "vLLM"}
THROUGHPUT_LEVELS = (4, 8, 16, 32)
THROUGHPUT_BOUND = 1.0
ALONE_BOUNDS = {"vllm": 1.0, "llama.cpp": 0.6}
RESTART_FACTOR = 1.3
MEMORY_FACTOR = 1.5
MEMORY_SLOTS = 16


def family_level(
    report: dict[str, Any], family: str, concurrency: int
) -> tuple[dict[str, Any], dict[str, Any]] | tuple[None, None]:
    """The level at `concurrency` of a family (`ours`, `llama.cpp`, `vllm`, `toolkit`) and the
    system (server size) that served it."""
    for system in report["systems"].values():
        if system.get("family") != family:
            continue
        level = _level(system, concurrency)
        if level:
            return level, system
    return None, None


def family_system(report: dict[str, Any], family: str, slots: int) -> dict[str, Any] | None:
    return next(
        (
            s
            for s in report["systems"].values()
            if s.get("family") == family and s.get("slots") == slots
        ),
        None,
    )


def _tok_s(level: dict[str, Any] | None) -> float | None:
    return level["tok_s"] if level and not level.get("errors") else None


def compiled_bare_step_ms(ours: dict[str, Any]) -> float | None:
    """Target 3's reference: the compiled bare decode step at batch 16, which
    `benchmarks.e2e.compiled_bare_step_ms` measures (a hook the compiled step fills in)."""
    return ours.get("arrivals_compiled_step_ms")


def targets(report: dict[str, Any]) -> list[Target]:
    """Issue 15's five targets, from one run's numbers: ours against llama.cpp and vLLM."""
    found: list[Target] = []
    ours_label = "ours"
    for concurrency in THROUGHPUT_LEVELS:
        mine, system = family_level(report, "ours", concurrency)
        theirs = {
            family: _tok_s(family_level(report, family, concurrency)[0]) for family in PEER_FAMILIES
        }
        measured = {f: v for f, v in theirs.items() if v}
        if mine is None and not measured:
            continue
        best = max(measured, key=measured.get) if measured else None
        value = _tok_s(mine) / measured[best] if _tok_s(mine) and best else None
        found.append(
            Target(
                1,
                f"tokens/s at C = {concurrency} / the better peer's (aim 1.3x)",
                system["label"] if system else ours_label,
                value,
                THROUGHPUT_BOUND,
                "x",
                True,
                f"ours {_num(_tok_s(mine), 1)}; "
                + ", ".join(f"{PEER_FAMILIES[f]} {_num(theirs[f], 1)}" for f in PEER_FAMILIES)
                + " tok/s",
            )
        )
    mine, system = family_level(report, "ours", 1)
    for family, bound in ALONE_BOUNDS.items():
        theirs, _ = family_level(report, family, 1)
        value = _tok_s(mine) / _tok_s(theirs) if _tok_s(mine) and _tok_s(theirs) else None
        found.append(
            Target(
                2,
                f"tokens/s at C = 1 / {PEER_FAMILIES[family]}'s"
                + (" (4-bit weights; aim 1.0x)" if family == "llama.cpp" else ""),
                system["label"] if system else ours_label,
                value,
                bound,
                "x",
                True,
                f"{_num(_tok_s(mine), 1)} vs {_num(_tok_s(theirs), 1)} tok/s; ITL p50 "
                f"{_num(mine and mine['itl_p50_ms'], 1)} vs "
                f"{_num(theirs and theirs['itl_p50_ms'], 1)} ms",
            )
        )
    ours = family_system(report, "ours", MEMORY_SLOTS)
    arrivals = ours.get("arrivals") if ours else None
    step = compiled_bare_step_ms(ours) if ours else None
    found.append(
        Target(
            3,
            f"ITL p90 under Poisson arrivals at batch {MEMORY_SLOTS} (ms) vs 1.5 x the compiled "
            "bare step",
            ours["label"] if ours else ours_label,
            arrivals["itl_p90_ms"] if arrivals else None,
            ITL_FACTOR * step if step is not None else None,
            "ms",
            False,
            (
                f"compiled bare step {_num(step, 1)} ms"
                if step is not None
                else "compiled bare step not measured yet (hook "
                "`benchmarks.e2e.compiled_bare_step_ms`)"
            )
            + (
                f"; eager bare step {_num(ours.get('arrivals_bare_step_ms'), 1)} ms; "
                f"{arrivals['arrival_rate_rps']:.2f} req/s, "
                f"{arrivals['mean_in_flight']:.1f} in flight on average"
                if arrivals and ours
                else "; no arrivals run"
            ),
        )
    )
    startup = (ours or {}).get("startup") or {}
    restart, eager, first = (startup.get(k) for k in ("restart", "eager", "first"))
    found.append(
        Target(
            4,
            "restart ready (compile cache kept, s) vs 1.3 x the eager start",
            ours["label"] if ours else ours_label,
            restart["ready_s"] if restart else None,
            RESTART_FACTOR * eager["ready_s"] if eager else None,
            "s",
            False,
            f"eager start ready in {_num(eager and eager['ready_s'], 1)} s; first start (empty "
            f"compile cache) {_num(first and first['ready_s'], 1)} s, so compiling took about "
            f"{_num(first and restart and first['ready_s'] - restart['ready_s'], 1)} s",
        )
    )
    theirs = family_system(report, "llama.cpp", MEMORY_SLOTS)
    tokens = (ours or {}).get("max_total_tokens") or report["options"].get("max_total_tokens")
    same = bool(ours and theirs and theirs.get("max_total_tokens") == tokens)
    found.append(
        Target(
            5,
            f"peak memory (PSS) at {MEMORY_SLOTS} slots x {_num(tokens)} tokens vs 1.5 x "
            "llama.cpp's",
            ours["label"] if ours else ours_label,
            ours.get("peak_pss_mib") if ours else None,
            MEMORY_FACTOR * theirs["peak_pss_mib"] if theirs and same else None,
            "MiB",
            False,
            f"llama.cpp {_num(theirs and theirs['peak_pss_mib'])} MiB at "
            f"{MEMORY_SLOTS} x {_num(theirs and theirs.get('max_total_tokens'))} tokens (Q4_1); "
            f"vLLM {_num((family_system(report, 'vllm', MEMORY_SLOTS) or {}).get('peak_pss_mib'))}"
            " MiB",
        )
    )
    return found


# --- Markdown ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _mark(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


def _ratio(target: Target) -> str:
    if target.value is None or target.bound is None:
        return "not measured"
    if target.unit == "x":
        return f"{target.value:.2f}x (≥ {target.bound:g}x)"
    share = target.value / target.bound
    return f"{target.value:,.1f} {target.unit} (≤ {target.bound:,.1f}); {share:.2f}"


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    cpu = m.get("cpu_model") or m.get("processor") or "unknown CPU"
    cores = m.get("physical_cores")
    return (
        f"{cpu}, {m['usable_cpus']} usable CPUs"
        + (f" ({cores} physical cores)" if cores else "")
        + f", {m.get('memory_gib', '?')} GiB, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}"
    )


def quiet_line(report: dict[str, Any]) -> str:
    """How busy the rest of the machine was before and during the measurements."""
    runs = [
        lv
        for system in report["systems"].values()
        for lv in [*system.get("levels", []), system.get("arrivals")]
        if lv and lv.get("quiet") and lv.get("server")
    ]
    if not runs:
        return "Machine quietness was not probed."
    threshold = report["options"]["quiet_cores"]
    before = max(lv["quiet"]["other_cpu_cores"] for lv in runs)
    during = max(lv["server"]["others_cpu_cores"] for lv in runs)
    disturbed = [
        lv
        for lv in runs
        if lv["server"]["others_cpu_cores"] >= threshold or not lv["quiet"]["quiet"]
    ]
    text = (
        f"Other processes used at most {before:.2f} cores just before and {during:.2f} during "
        f"each of the {len(runs)} measurements (quiet below {threshold:g})"
    )
    ceiling = report["systems"].get("ceiling") or {}
    if ceiling.get("others_cpu_cores") is not None:
        text += f"; {ceiling['others_cpu_cores']:.2f} during the ceiling"
        if ceiling["others_cpu_cores"] >= threshold:
            disturbed.append(ceiling)
    if disturbed:
        return text + (
            f"; {len(disturbed)} ran on a busy machine even after waiting and retrying: "
            "treat those numbers with care." + speed_line(report)
        )
    return text + ": quiet throughout." + speed_line(report)


SPEED_DRIFT = 1.15
"""A run whose bf16 matrix products ran this much faster at one probe than at another is
flagged: the host itself changed speed while the systems were measured one after another."""


def speed_line(report: dict[str, Any]) -> str:
    """The machine's bf16 matrix-product speed at the start, middle and end of the run."""
    speed = report.get("matmul_gflops") or {}
    if not speed:
        return ""
    text = " bf16 matrix products ran at " + ", ".join(
        f"{value:,.0f} GFLOP/s ({when})" for when, value in speed.items()
    )
    if max(speed.values()) > SPEED_DRIFT * min(speed.values()):
        return text + (
            ": the host's speed changed during the run, so ratios between systems measured "
            "at different times are uncertain."
        )
    return text + "."


def skipped_lines(report: dict[str, Any]) -> list[str]:
    skipped = report.get("skipped") or {}
    if not skipped:
        return []
    return [
        "Left out: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + ".",
        "",
    ]


def _startup_cell(startup: dict[str, Any], key: str) -> str:
    timing = startup.get(key)
    if not timing:
        return "—"
    return f"{timing['ready_s']:.1f} / {timing['first_answer_s']:.1f}"


def startup_lines(report: dict[str, Any]) -> list[str]:
    """Start-up times and peak memory of each server."""
    rows = [
        (system, system.get("startup") or {})
        for system in report["systems"].values()
        if "levels" in system
    ]
    if not rows:
        return []
    lines = [
        "",
        "## Start-up and memory",
        "",
        "Seconds from launching the server to ready (`/health` 200) / to the end of one streamed "
        "16-token answer. First start: an empty compile cache (ours: the compiled step built; "
        "vLLM: its inductor compile, which it repeats at every start and caches in part); "
        "restart: the same cache again. Eager: ours with the compiled step off. Peak PSS: the "
        "server's process group while serving the levels.",
        "",
        "| System | slots x tokens | first start s | restart s | eager start s | peak PSS MiB "
        "| peak RSS MiB |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for system, startup in rows:
        size = (
            f"{system['slots']} x {_num(system.get('max_total_tokens'))}"
            if system.get("slots")
            else "—"
        )
        lines.append(
            f"| {system['label']} | {size} | {_startup_cell(startup, 'first')} "
            f"| {_startup_cell(startup, 'restart')} | {_startup_cell(startup, 'eager')} "
            f"| {_num(system.get('peak_pss_mib'))} | {_num(system.get('peak_rss_mib'))} |"
        )
    return lines


def to_markdown(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    o = report["options"]
    lines = [
        "# End-to-end benchmark",
        "",
        f"{machine_line(report)}. Run {report['started']}, {report['duration_s'] / 60:.0f} min.",
        f"{quiet_line(report)}",
        "",
        f"SmolLM2-135M-Instruct, {report['prompts']['count']} prompts of "
        f"{min(report['prompts']['tokens'])} to {max(report['prompts']['tokens'])} tokens, "
        f"{o['max_new_tokens']} new tokens, greedy; closed loop of C clients, "
        f"{o['warmup_rounds']} warm-up request per client (at least 4 per level) and "
        f"{o['rounds']} measured requests per client (at least 8 per level, and 4 per client "
        "from 16 clients up). "
        "All ratios below come from this one run.",
        "",
        "Every server but the SageMaker toolkit gets the same requests: streaming "
        "`/v1/completions`, `temperature: 0`, `ignore_eos`, so each generates exactly "
        "`max_new_tokens` tokens (the mean generated length of each level shows it); the toolkit "
        "is asked for `min_new_tokens` = `max_new_tokens` over `/invocations`. Each server has "
        f"{_num(o['max_total_tokens'])} tokens per slot; a server with N slots serves the levels "
        "up to N. llama.cpp serves 4-bit (Q4_1) weights, the others bf16 (ours: its dtype "
        "below): compare speed, not text.",
        "",
    ]
    lines += skipped_lines(report)
    lines += [
        "## Targets",
        "",
        "Issue 15: ours against the better of llama.cpp and vLLM (tokens/s at C = 4 to 32), "
        "against each at C = 1, ITL under arrivals against the compiled bare step, restart "
        "against the eager start, memory against llama.cpp at the same slots and context.",
        "",
        "| # | Target | System | Measured (bound); ratio | Met | Detail |",
        "|---:|:---|:---|:---|:---:|:---|",
    ]
    for t in targets(report):
        lines.append(
            f"| {t.number} | {t.name} | {t.system} | {_ratio(t)} | {_mark(t.met)} | {t.detail} |"
        )
    lines += startup_lines(report)
    engine = engine_targets(report)
    if engine:
        lines += [
            "",
            "## Our engine against the bare loop",
            "",
            "The earlier targets, kept as a check that serving costs little over the bare "
            "`transformers` loop of the ceiling below.",
            "",
        ]
        if any(system.get("pairs") for system in report["systems"].values()):
            lines += [
                "Targets 1, 3 and 4 compare each of our measurements with the bare loop measured "
                "in this process seconds before it, while the server idles: on these 2 shared "
                "cores the same bare loop reads up to 25% apart a minute later, so a comparison "
                "with the separately timed ceiling table below would mostly measure the "
                "machine's drift. Targets 1 and 3 repeat the pair and take the median pair.",
                "",
            ]
        lines += [
            "| # | Target | System | Measured (bound); ratio | Met | Detail |",
            "|---:|:---|:---|:---|:---:|:---|",
        ]
        for t in engine:
            lines.append(
                f"| {t.number} | {t.name} | {t.system} | {_ratio(t)} | {_mark(t.met)} "
                f"| {t.detail} |"
            )
    lines += [
        "",
        "## Per level",
        "",
        "Tokens/s: generated tokens of all successful requests / the measured window. TTFT and "
        "ITL as the client receives server-sent events; the SageMaker toolkit does not stream, "
        "so its TTFT is its end-to-end time and it has no ITL. Server memory: peak of the "
        "summed proportional set sizes (PSS: shared pages split between the processes mapping "
        "them) of the server's process group, read every 5 s, whenever its RSS (read every "
        "0.2 s) grew by 16 MiB, and at the end of the window: the kernel takes about 14 ms of CPU "
        "per GB to sum PSS, which read 5 times a second stretched the step it measured; CPU: "
        "its CPU seconds per second (2 = both cores)."
        " Others' CPU: cores used by every other process (the load generator excepted) just "
        "before and during the measurement; a measurement disturbed during it was run again.",
        "",
        "| System | C | tok/s | req/s | TTFT p50 / p90 ms | ITL p50 / p90 ms "
        "| e2e p50 / p90 ms | mean tokens | errors | PSS MiB | CPU cores "
        "| others' CPU before / during |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in report["systems"].values():
        if "levels" not in system:
            continue
        runs = [*system["levels"], *([system["arrivals"]] if system.get("arrivals") else [])]
        for lv in runs:
            level = (
                str(lv["concurrency"])
                if lv["concurrency"] is not None
                else f"{lv['arrival_rate_rps']:.2f}/s"
            )
            server = lv.get("server") or {}
            quiet = lv.get("quiet") or {}
            lines.append(
                f"| {system['label']} | {level} | {_num(lv['tok_s'], 1)} | {_num(lv['req_s'], 2)} "
                f"| {_num(lv['ttft_p50_ms'])} / {_num(lv['ttft_p90_ms'])} "
                f"| {_num(lv['itl_p50_ms'], 1)} / {_num(lv['itl_p90_ms'], 1)} "
                f"| {_num(lv['e2e_p50_ms'])} / {_num(lv['e2e_p90_ms'])} "
                f"| {lv['mean_generated_tokens']:.1f} | {lv['errors']} "
                f"| {_num(server.get('peak_pss_mib', server.get('peak_rss_mib')))} "
                f"| {_num(server.get('cpu_cores'), 2)} "
                f"| {_num(quiet.get('other_cpu_cores'), 2)} / "
                f"{_num(server.get('others_cpu_cores'), 2)} |"
            )
    lines += [
        "",
        "C = concurrent clients; `n/s` = Poisson arrivals at n requests/s (open loop).",
    ]
    ceiling = report["systems"].get("ceiling")
    if ceiling:
        lines += [
            "",
            "## Ceiling",
            "",
            f"Bare `transformers` forward loop, {ceiling['dtype']}, sdpa, no server: one prefill "
            "of a batch of random prompts of the prompts' mean length, then greedy decode steps; "
            "best of the repeats for each cache path, the faster path is the ceiling. "
            f"Bare prefill of one prompt alone: p50 {ceiling['prefill_p50_ms']:.1f} ms over the "
            "prompts.",
            "",
            "| Batch | DynamicCache tok/s | StaticCache tok/s | Faster | tok/s (prefill "
            "included) | decode tok/s | step ms | prefill ms |",
            "|---:|---:|---:|:---|---:|---:|---:|---:|",
        ]
        for p in ceiling["points"]:
            lines.append(
                f"| {p['batch_size']} | {p['dynamic_tok_s']:.1f} | {p['static_tok_s']:.1f} "
                f"| {p['faster_path']} | {p['tok_s']:.1f} | {p['decode_tok_s']:.1f} "
                f"| {p['step_ms']:.1f} | {p['prefill_ms']:.1f} |"
            )
    lines += raised_ceiling(report)
    for plot in plots:
        lines += ["", f"![{Path(plot).stem}]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def raised_ceiling(report: dict[str, Any]) -> list[str]:
    """The bare loop in the checkpoint's fp32 against the server's dtype, same run."""
    before, after = report.get("ceiling_float32"), report["systems"].get("ceiling")
    if not before or not after:
        return []
    lines = [
        "",
        "## Raising the ceiling",
        "",
        f"The same bare loop in float32 (before) and in {after['dtype']}, the server's dtype "
        "(after), measured in this run.",
        "",
        "| Batch | float32 tok/s | float32 step ms | "
        f"{after['dtype']} tok/s | {after['dtype']} step ms | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for old, new in zip(before["points"], after["points"]):
        lines.append(
            f"| {old['batch_size']} | {old['tok_s']:.1f} | {old['step_ms']:.1f} "
            f"| {new['tok_s']:.1f} | {new['step_ms']:.1f} | {new['tok_s'] / old['tok_s']:.2f}x |"
        )
    return lines


# --- plots -------------------------------------------------------------------------------------

STYLE = {
    "ours": {"color": "tab:green", "marker": "s"},
    "llama.cpp": {"color": "tab:orange", "marker": "D"},
    "vllm": {"color": "tab:purple", "marker": "v"},
    "toolkit": {"color": "tab:red", "marker": "^"},
    "ours-b8": {"color": "tab:blue", "marker": "o"},
    "ours-b16": {"color": "tab:green", "marker": "s"},
    "peer": {"color": "tab:red", "marker": "^"},
    "ceiling": {"color": "black", "marker": "x"},
}
FAMILY_LABELS = {
    "ours": "ours",
    "llama.cpp": "llama.cpp (Q4_1)",
    "vllm": "vLLM CPU",
    "toolkit": "SageMaker HF toolkit",
}


def family_lines(report: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]], bool]]:
    """One line per system family (ours, llama.cpp, vLLM, toolkit): its levels from all its
    server sizes, by concurrency: (family, label, levels, streaming)."""
    grouped: dict[str, tuple[str, list[dict[str, Any]], bool]] = {}
    for key, system in report["systems"].items():
        if "levels" not in system:
            continue
        family = system.get("family", key)
        label = FAMILY_LABELS.get(family, system["label"])
        entry = grouped.setdefault(family, (label, [], system.get("streaming", True)))
        entry[1].extend(system["levels"])
    return [
        (family, label, sorted(levels, key=lambda lv: lv["concurrency"]), streaming)
        for family, (label, levels, streaming) in grouped.items()
    ]


def plot(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """`<stem>-throughput.png` (tokens/s vs concurrency) and `<stem>-latency.png` (TTFT and ITL
    percentiles vs concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    systems = report["systems"]
    title = machine_line(report).split(",")[0]
    levels = sorted({lv["concurrency"] for s in systems.values() for lv in s.get("levels", [])})

    lines = family_lines(report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, label, family_levels, _ in lines:
        xs = [lv["concurrency"] for lv in family_levels]
        ys = [lv["tok_s"] for lv in family_levels]
        ax.plot(xs, ys, label=label, **STYLE.get(family, {}))
    if systems.get("ceiling"):
        points = [p for p in systems["ceiling"]["points"] if p["batch_size"] in levels]
        ax.plot(
            [p["batch_size"] for p in points],
            [p["tok_s"] for p in points],
            linestyle="--",
            label="ceiling (bare loop, batch = C)",
            **STYLE["ceiling"],
        )
    _concurrency_axis(ax, levels)
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"Throughput, {report['options']['max_new_tokens']} new tokens ({title})")
    ax.legend()
    fig.tight_layout()
    throughput = out_dir / f"{stem}-throughput.png"
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    fig, (ttft_ax, itl_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for family, family_label, family_levels, streaming in lines:
        style = STYLE.get(family, {})
        xs = [lv["concurrency"] for lv in family_levels]
        label = family_label + ("" if streaming else " (end-to-end)")
        for q, dash in (("p50", "-"), ("p90", ":")):
            ys = [lv[f"ttft_{q}_ms"] for lv in family_levels]
            ttft_ax.plot(xs, ys, linestyle=dash, label=f"{label} {q}", **style)
            itl = [lv[f"itl_{q}_ms"] for lv in family_levels]
            if any(v is not None for v in itl):
                itl_ax.plot(xs, itl, linestyle=dash, label=f"{family_label} {q}", **style)
    ceiling = systems.get("ceiling")
    if ceiling:
        ttft_ax.axhline(
            ceiling["prefill_p50_ms"], color="black", linestyle="--", label="bare prefill p50"
        )
        points = [p for p in ceiling["points"] if p["batch_size"] in levels]
        itl_ax.plot(
            [p["batch_size"] for p in points],
            [p["step_ms"] for p in points],
            linestyle="--",
            label="bare decode step (batch = C)",
            **STYLE["ceiling"],
        )
    for ax, name in ((ttft_ax, "time to first token"), (itl_ax, "inter-token latency")):
        _concurrency_axis(ax, levels)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        if high / low < 10:  # less than a decade: label the minor ticks too
            ax.yaxis.set_minor_formatter(plain)
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    latency = out_dir / f"{stem}-latency.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    startup = _plot_startup(report, out_dir / f"{stem}-startup.png", plt)
    return [throughput, latency, *([startup] if startup else [])]


def _plot_startup(report: dict[str, Any], path: Path, plt: Any) -> Path | None:
    """Bars: each server's start-up (first start, restart, eager) and its peak PSS."""
    rows = [
        (key, system)
        for key, system in report["systems"].items()
        if "levels" in system and (system.get("startup") or system.get("peak_pss_mib"))
    ]
    if not rows:
        return None
    fig, (start_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2.5))
    labels = [system["label"] for _, system in rows]
    ys = list(range(len(rows)))
    kinds = (("first", "first start", 0.0), ("restart", "restart", 0.27), ("eager", "eager", 0.54))
    for kind, name, offset in kinds:
        values = [((s.get("startup") or {}).get(kind) or {}).get("ready_s") for _, s in rows]
        if any(v is not None for v in values):
            start_ax.barh(
                [y - 0.27 + offset for y in ys], [v or 0 for v in values], 0.27, label=name
            )
    start_ax.set_yticks(ys, labels)
    start_ax.invert_yaxis()
    start_ax.set_xlabel("seconds to ready (/health 200)")
    start_ax.set_title("start-up")
    start_ax.legend(fontsize=7)
    memory_ax.barh(
        ys,
        [s.get("peak_pss_mib") or 0 for _, s in rows],
        color=[STYLE.get(s.get("family", k), {}).get("color", "grey") for k, s in rows],
    )
    memory_ax.set_yticks(ys, labels)
    memory_ax.invert_yaxis()
    memory_ax.set_xlabel("MiB")
    memory_ax.set_title("peak PSS while serving")
    for ax in (start_ax, memory_ax):
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _concurrency_axis(ax: Any, levels: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent clients (C)")
    ax.grid(True, alpha=0.3)


# --- README ------------------------------------------------------------------------------------

README_START = "<!-- benchmarks.e2e: start (written by `make bench`) -->"
README_END = "<!-- benchmarks.e2e: end -->"


def readme_block(report: dict[str, Any], results_dir: str) -> str:
    """The README's summary of a run: machine, targets, throughput and latency per level."""
    o = report["options"]
    lines = [
        README_START,
        f"Latest run ({report['started'][:10]}): {machine_line(report)}. {quiet_line(report)} "
        f"{report['prompts']['count']} prompts, {o['max_new_tokens']} new tokens, streaming "
        "`/v1/completions`, greedy, `ignore_eos`, the same load generator for every server; "
        "every ratio is between numbers of this same run. Full tables: "
        f"[`{results_dir}/e2e.md`]({results_dir}/e2e.md).",
        "",
        *skipped_lines(report),
        "| # | Target (issue 15) | System | Measured (bound); ratio | Met |",
        "| ---: | --- | --- | --- | :---: |",
    ]
    for t in targets(report):
        lines.append(f"| {t.number} | {t.name} | {t.system} | {_ratio(t)} | {_mark(t.met)} |")
    lines += [
        "",
        "| System | C | tok/s | TTFT p50 / p90 ms | ITL p50 / p90 ms | mean tokens | PSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system in report["systems"].values():
        for lv in system.get("levels", []):
            server = lv.get("server") or {}
            lines.append(
                f"| {system['label']} | {lv['concurrency']} | {lv['tok_s']:.1f} "
                f"| {_num(lv['ttft_p50_ms'])} / {_num(lv['ttft_p90_ms'])} "
                f"| {_num(lv['itl_p50_ms'], 1)} / {_num(lv['itl_p90_ms'], 1)} "
                f"| {lv['mean_generated_tokens']:.1f} "
                f"| {_num(server.get('peak_pss_mib', server.get('peak_rss_mib')))} |"
            )
    lines += ["", *startup_lines(report)[3:]] if startup_lines(report) else []
    for ceiling in (report["systems"].get("ceiling"), report.get("ceiling_float32")):
        if ceiling:
            cells = ", ".join(
                f"batch {p['batch_size']} {p['tok_s']:.1f} tok/s ({p['faster_path']})"
                for p in ceiling["points"]
            )
            lines += ["", f"Ceiling ({ceiling['dtype']}, prefill included): {cells}."]
    lines += [
        "",
        f"![Throughput vs concurrency]({results_dir}/e2e-throughput.png)",
        f"![TTFT and ITL vs concurrency]({results_dir}/e2e-latency.png)",
        f"![Start-up and peak memory]({results_dir}/e2e-startup.png)",
        README_END,
    ]
    return "\n".join(lines)


def update_readme(
    readme: Path, block: str, markers: tuple[str, str] = (README_START, README_END)
) -> None:
    """Replace the README's text from the start marker to the end marker with `block` (which
    starts and ends with them)."""
    start_marker, end_marker = markers
    text = readme.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no {start_marker!r} ... {end_marker!r} markers")
    readme.write_text(text[:start] + block + text[end + len(end_marker) :])


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and alignment rows; a column name ending in `:` is aligned
    right, in `^` centred, otherwise left."""
    names, rules = [], []
    for column in columns:
        align = {":": "---:", "^": ":---:"}.get(column[-1:], "---")
        names.append(column.rstrip(":^"))
        rules.append(align)
    return ["| " + " | ".join(names) + " |", "| " + " | ".join(rules) + " |"]


def publish(
    report: dict[str, Any], text: str, out: Path, readme: Path | None, name: str, target: str
) -> None:
    """Write a benchmark's `report` to `out` (JSON) and its markdown `text` next to it, and,
    with `readme`, into the README between the markers of `benchmarks.<name>` (`make <target>`
    writes them), its title one level down to sit under the README's own heading."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    if readme is not None:
        markers = (
            f"<!-- benchmarks.{name}: start (written by `make {target}`) -->",
            f"<!-- benchmarks.{name}: end -->",
        )
        block = "###" + text if text.startswith("# ") else text
        update_readme(readme, f"{markers[0]}\n{block}{markers[1]}", markers)


def write(report: dict[str, Any], out: Path) -> str:
    """Write `out` (JSON), its `.md` and the plots beside it; return the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report["targets"] = [{**asdict(t), "met": t.met} for t in targets(report)]
    report["engine_targets"] = [{**asdict(t), "met": t.met} for t in engine_targets(report)]
    out.write_text(json.dumps(report, indent=2) + "\n")
    plots = plot(report, out.parent, out.stem)
    markdown = to_markdown(report, [str(p) for p in plots])
    out.with_suffix(".md").write_text(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("json", type=Path, help="a report written by benchmarks.e2e")
    parser.add_argument("--readme", type=Path, default=None, help="also update this README")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    print(write(report, args.json))
    if args.readme:
        update_readme(args.readme, readme_block(report, relative_dir(args.json, args.readme)))


def relative_dir(out: Path, readme: Path) -> str:
    """The results folder as a link from the README."""
    return os.path.relpath(out.resolve().parent, readme.resolve().parent)


if __name__ == "__main__":
    main()
