"""The compiled step's attention on CPU as a C++ operator, `hfns::decode_attention`
(`decode_attention.cpp`), built with the compiler inductor already needs and kept beside the
packages.

Inductor writes the graph's masked attention as loops over the longest row's cached length, with
a horizontal sum for every score: on 2 cores of AMD EPYC it took 0.43 ms a layer at 32 rows and 210
keys, a third of the step. The operator reads each row's own keys once for its whole query-head
group, with a vectorized softmax: 0.14 ms for the same layer. The package calls it through
AOTInductor's proxy executor, so this module loads the library before a package that uses it
(`ensure`). Where it cannot be built the step keeps inductor's attention (logged).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
OPERATOR = "hfns::decode_attention"
MAX_GROUP = 8
"""Query heads per key head that the operator handles (its `MAX_GROUP`)."""
BUILD_TIMEOUT = 300.0

_loaded: dict[str, Path] = {}
"""The library loaded in this process, by file name (the name is the digest of what built it)."""


def _vector_isa() -> object | None:
    """Inductor's choice of vector instruction set for this CPU (None: none it vectorizes for)."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return isa if isa else None


def supported(head_dim: int, heads: int, kv_heads: int, device: str) -> str | None:
    """Why the operator cannot serve this model here (None: it can)."""
    if not device.startswith("cpu"):
        return f"the fused attention is for CPU, not {device}"
    isa = _vector_isa()
    if isa is None:
        return "no vector instruction set that inductor builds for"
    lanes = isa.nelements()  # type: ignore[attr-defined]
    dims = (2 * lanes, 4 * lanes, 8 * lanes)
    if head_dim not in dims:
        return f"head_dim {head_dim} is not one of {dims}"
    if heads % kv_heads or heads // kv_heads > MAX_GROUP:
        return f"{heads} query heads over {kv_heads} key heads: at most {MAX_GROUP} per key head"
    return None


def _command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    isa = _vector_isa()
    assert isa is not None
    compiler = os.environ.get("CXX") or shutil.which("g++") or "g++"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [compiler, "-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    command += ["-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    command += [f"-D{macro}" for macro in isa.build_macro()]  # type: ignore[attr-defined]
    command += isa.build_arch_flags().split()  # type: ignore[attr-defined]
    for path in cpp_extension.include_paths():
        command += ["-I", path]
    command += [str(SOURCE), "-o", str(out)]
    for path in cpp_extension.library_paths():
        command += ["-L", path, f"-Wl,-rpath,{path}"]
    return [*command, "-lc10", "-ltorch_cpu", "-ltorch"]


def library_path(root: Path) -> Path:
    """Where the library for this source, torch and instruction set is kept under `root`."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_command(Path("out"))).encode())
    return root / "ops" / f"decode_attention-{digest.hexdigest()[:16]}.so"


def build(out: Path) -> None:
    """Compile the operator to `out` (through a temporary file: the library is whole or absent)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    try:
        result = subprocess.run(
            _command(partial), capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:] or ["no output"]
            raise RuntimeError(f"compiling {SOURCE.name} failed: {' / '.join(tail)}")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


def load(path: Path) -> None:
    """Register the operator from the library at `path` in this process (once)."""
    if path.name in _loaded:
        return
    if _loaded:
        raise RuntimeError(f"{OPERATOR} is already registered from {next(iter(_loaded.values()))}")
    torch.ops.load_library(str(path))

    @torch.library.register_fake(OPERATOR)
    def _(
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        cache: torch.Tensor,
        layer: int,
        positions: torch.Tensor,
        window: int,
        scale: float,
    ) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    _loaded[path.name] = path


def ensure(root: Path) -> Path:
    """Build the library under `root` when it is missing, load it, return its path."""
    path = library_path(root)
    if path.name in _loaded:  # the same library, loaded from another root
        return _loaded[path.name]
    if not path.is_file():
        build(path)
        logger.info("built the fused decode attention: %s", path)
    load(path)
    return path
