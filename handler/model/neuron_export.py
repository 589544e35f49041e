"""Export a causal LM for Neuron ahead of time, or for the server at start-up.

    python -m handler.model.neuron_export --model-id ID --num-cores N --output DIR

The server runs it in a separate process when a model needs exporting (the Neuron runtime does not
reliably release cores in-process); run it yourself to export ahead of time, then serve `DIR`
(`HF_MODEL_ID=DIR`). It compiles with the artifacts of the hub cache when it has the
configuration (`CUSTOM_CACHE_REPO`, default `aws-neuron/optimum-neuron-cache`), else compiles from
scratch, which can take up to an hour. The token of gated models is read from `HF_TOKEN` by
`huggingface_hub`; never pass it on the command line.

`DIR` gets the compiled model (`neuron_config.json`, `config.json`, the compiled graphs), the
tokenizer and the generation config. Weights are not loaded at export: a hub model's weights are
fetched when the model is loaded; a local model's are saved, sharded, into `DIR`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from handler.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOTAL_TOKENS,
    DTYPE_ALIASES,
    positive_int_argument,
)
from handler.errors import ConfigError
from handler.model.neuron_loader import EXPORT, GET_NEURON_CONFIG, load_optimum

logger = logging.getLogger("handler.model.neuron_export")

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
INSTANCE_TYPES = ("inf2", "trn1", "trn1n", "trn2")


def _dtype(text: str) -> str:
    key = text.strip().lower()
    if key not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(f"{text!r}: use bf16, fp16 or fp32")
    return DTYPE_ALIASES[key]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m handler.model.neuron_export",
        description="Export a causal LM for Neuron (optimum-neuron), then serve the output "
        "directory (HF_MODEL_ID=DIR). Gated models: set HF_TOKEN in the environment.",
    )
    parser.add_argument("--model-id", required=True, help="hub id or local model directory")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--batch-size",
        type=positive_int_argument,
        default=DEFAULT_BATCH_SIZE,
        help=f"static batch size, served as MAX_BATCH_SIZE (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--sequence-length",
        type=positive_int_argument,
        default=DEFAULT_TOTAL_TOKENS,
        help="prompt + generated tokens, served as MAX_TOTAL_TOKENS "
        f"(default {DEFAULT_TOTAL_TOKENS})",
    )
    parser.add_argument(
        "--num-cores",
        type=positive_int_argument,
        required=True,
        help="Neuron cores = tensor parallel degree, served as HF_NUM_CORES",
    )
    parser.add_argument(
        "--auto-cast-type",
        type=_dtype,
        help="bf16, fp16 or fp32 (aliases such as bfloat16 accepted); default: the model's dtype",
    )
    parser.add_argument(
        "--instance-type",
        choices=INSTANCE_TYPES,
        help="instance family to compile for; default: this machine's",
    )
    parser.add_argument("--output", required=True, type=Path, help="directory to write")
    return parser


def export_model(
    model_id: str,
    output: Path,
    *,
    num_cores: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    sequence_length: int = DEFAULT_TOTAL_TOKENS,
    revision: str | None = None,
    auto_cast_type: str | None = None,
    instance_type: str | None = None,
) -> Path:
    """Compile `model_id` for these shapes and save it, with its tokenizer, to `output`."""
    get_neuron_config = load_optimum(GET_NEURON_CONFIG)
    export = load_optimum(EXPORT)
    neuron_config = get_neuron_config(
        model_id,
        token=None,
        revision=revision,
        instance_type=instance_type,
        batch_size=batch_size,
        sequence_length=sequence_length,
        tensor_parallel_size=num_cores,
    )
    if auto_cast_type is not None:
        import torch

        # get_neuron_config takes the dtype from the model's config; the export casts to this.
        neuron_config.torch_dtype = getattr(torch, TORCH_DTYPES[auto_cast_type])
    logger.info("Exporting %s with %s", model_id, neuron_config)
    model = export(
        model_id, neuron_config=neuron_config, token=None, revision=revision, load_weights=False
    )
    model.save_pretrained(str(output))
    save_tokenizer_files(model_id, output, revision=revision)
    logger.info("Exported %s to %s", model_id, output)
    return output


def save_tokenizer_files(model_id: str, output: Path, *, revision: str | None = None) -> None:
    """Save the tokenizer and generation config next to the export, so serving needs no hub."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        AutoTokenizer.from_pretrained(model_id, revision=revision).save_pretrained(output)
    except (OSError, ValueError) as exc:
        logger.warning(
            "No tokenizer saved for %s (%s): serving needs one in %s", model_id, exc, output
        )
    try:
        GenerationConfig.from_pretrained(model_id, revision=revision).save_pretrained(output)
    except OSError:
        logger.info("%s has no generation config", model_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        export_model(
            args.model_id,
            args.output,
            num_cores=args.num_cores,
            batch_size=args.batch_size,
            sequence_length=args.sequence_length,
            revision=args.revision,
            auto_cast_type=args.auto_cast_type,
            instance_type=args.instance_type,
        )
    except ConfigError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
