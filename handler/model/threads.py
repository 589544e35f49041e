"""One OpenMP team per process: the one that runs the model step.

torch's CPU operators (and the compiled step's kernels) run their parallel regions on OpenMP.
libgomp gives each thread that starts a parallel region a pool of worker threads of its own,
kept until that thread exits. Once the pools' threads outnumber the cores, libgomp stops
spinning at its barriers (100 spins, then a futex sleep), and every one of the hundreds of
parallel regions in a model step pays for putting its workers to sleep and waking them: on 2
cores the compiled decode step at 8 rows took 36 ms instead of 18 when the thread that had
loaded the model kept its pool, and a server's tokens/s halved for good after one request with a
grammar (whose masks are computed on a helper thread).

So a thread other than the scheduler's frees its pool when it is done with the model
(`release_pool`), and a helper thread that runs torch operators beside the step runs them on
itself alone (`serial_helper`, a thread pool initializer).
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

import torch

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
"""`omp_pause_soft` (OpenMP 5.0): free the calling thread's pool, keep the runtime."""


@cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on (the loaded `libgomp.so.1`, found by its soname), or
    None when torch's CPU operators do not run on libgomp."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except (OSError, AttributeError):  # not loaded (another runtime), or no RTLD_NOLOAD
        return None
    if not hasattr(lib, "omp_pause_resource_all"):
        return None
    return lib


def release_pool() -> bool:
    """Free the calling thread's OpenMP worker pool (made again if it runs a parallel region).
    Returns whether there was a runtime to ask."""
    lib = _libgomp()
    if lib is None:
        return False
    if lib.omp_pause_resource_all(OMP_PAUSE_SOFT) != 0:
        logger.debug("libgomp did not free this thread's pool (inside a parallel region?)")
    return True


def serial_helper() -> None:
    """Make the calling thread run torch's CPU operators on itself alone, with no OpenMP pool of
    its own (a `ThreadPoolExecutor` initializer for helpers that run beside the model step)."""
    lib = _libgomp()
    if lib is None:
        return
    # torch sets a thread's OpenMP thread count at its first parallel operator: run one now so
    # that the count set after it stays.
    torch.zeros(1 << 16).add_(1)
    lib.omp_set_num_threads(1)
    release_pool()
