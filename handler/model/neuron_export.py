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
from handler.model.neuron_contract import ALIGN_TARGET, EXPORT, GET_NEURON_CONFIG, load_optimum
from handler.model.neuron_loader import text_config

logger = logging.getLogger("handler.model.neuron_export")

INSTANCE_TYPES = ("inf2", "trn1", "trn1n", "trn2")


def _dtype(text: str) -> str:
    key = text.strip().lower()
    if key not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(f"{text!r}: use bf16, fp16 or fp32")
    return DTYPE_ALIASES[key]


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: use true or false")
    return value == "true"


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
    parser.add_argument(
        "--on-device-sampling",
        type=_switch,
        metavar="{true,false}",
        help="choose tokens on the device (true) or on the host (false: seeds, penalties, "
        "typical_p and log-probabilities work); default: optimum-neuron's choice for the "
        "architecture (Llama: true). Served as NEURON_ON_DEVICE_SAMPLING",
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
    on_device_sampling: bool | None = None,
) -> Path:
    """Compile `model_id` for these shapes and save it, with its tokenizer, to `output`.

    `on_device_sampling`: None keeps optimum-neuron's choice for the architecture. Raises
    `ConfigError` when the model or the compilation target cannot be exported here.
    """
    get_neuron_config = load_optimum(GET_NEURON_CONFIG)
    export = load_optimum(EXPORT)
    # With the configured dtype applied: get_neuron_config takes the dtype from the config.
    config = text_config(model_id, revision=revision, token=None, auto_cast_type=auto_cast_type)
    neuron_config = get_neuron_config(
        model_id,
        config=config,
        token=None,
        revision=revision,
        instance_type=instance_type,
        batch_size=batch_size,
        sequence_length=sequence_length,
        tensor_parallel_size=num_cores,
    )
    check_target(neuron_config.target, instance_type)
    if on_device_sampling is not None:
        neuron_config.on_device_sampling = on_device_sampling
    logger.info("Exporting %s with %s", model_id, neuron_config)
    model = export(
        model_id, neuron_config=neuron_config, token=None, revision=revision, load_weights=False
    )
    model.save_pretrained(str(output))
    save_tokenizer_files(model_id, output, revision=revision)
    logger.info("Exported %s to %s", model_id, output)
    return output


def check_target(target: str, instance_type: str | None) -> None:
    """Refuse before compiling when optimum-neuron would not compile for `target` here.

    `target` is the normalized compilation target of the neuron config (inf2 and trn1n compile
    as `trn1`). optimum-neuron's export aligns it with this machine and with
    `NEURON_PLATFORM_TARGET_OVERRIDE` (`align_compilation_target`, `utils/instance.py`) and
    raises a `ValueError` on a mismatch; the same call here turns it into a message.
    """
    align = load_optimum(ALIGN_TARGET)
    family = instance_type or target
    try:
        aligned = align(target, override=False)
    except ValueError as exc:
        raise ConfigError(
            f"Cannot compile for {family} (compilation target {target}) on this machine: {exc}. "
            f"Run the export on a {family} instance, or set "
            f"NEURON_PLATFORM_TARGET_OVERRIDE={target} to compile for it from here"
        ) from exc
    if aligned != target:
        raise ConfigError(
            f"NEURON_PLATFORM_TARGET_OVERRIDE={aligned} contradicts --instance-type {family} "
            f"(compilation target {target}): unset it, set it to {target}, or export for the "
            f"instance family of {aligned}"
        )


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
        # The ignore: `transformers` annotates `revision: str` here, but hands None on to the
        # hub, which reads it as the default branch.
        GenerationConfig.from_pretrained(
            model_id,
            revision=revision,  # type: ignore[arg-type]
        ).save_pretrained(output)
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
            on_device_sampling=args.on_device_sampling,
        )
    except ConfigError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
