"""The machine and library versions a benchmark ran on."""

from __future__ import annotations

import os
import platform
import subprocess

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


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None
