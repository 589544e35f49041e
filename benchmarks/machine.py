"""The machine and library versions a benchmark ran on."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import torch
import transformers


def machine() -> dict[str, object]:
    """The machine and library versions the numbers were taken on."""
    lscpu = _lscpu()
    sockets = _int_or_none(lscpu.get("Socket(s)"))
    cores_per_socket = _int_or_none(lscpu.get("Core(s) per socket"))
    return {
        "processor": platform.processor() or None,
        "cpu_model": lscpu.get("Model name"),
        "physical_cores": sockets * cores_per_socket if sockets and cores_per_socket else None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def matmul_gflops(repeats: int = 30) -> float:
    """How fast this machine multiplies bf16 matrices right now (GFLOP/s; median of `repeats`
    products of `[64, 2048] x [2048, 2048]`, about the shapes of a model step). Measured at the
    start, middle and end of a run: a host that slows down under a neighbour (invisible to the
    quiet check, which sees this machine's processes only) shows here."""
    a = torch.randn(64, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            started = time.perf_counter()
            a @ b
            if i >= 3:
                times.append(time.perf_counter() - started)
    return 2 * 64 * 2048 * 2048 / statistics.median(times) / 1e9


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None
