"""Command line: `python -m handler serve [flags]` and `python -m handler generate PROMPT [flags]`.

`serve` is what SageMaker runs (`docker run IMAGE serve`): gunicorn with one worker that owns
the model (see `handler.server.launcher`), or with `SERVING_STACK=mms` Multi Model Server through
the SageMaker inference toolkit (see `handler.mms.launcher`). Configuration errors stop start-up
with exit status 2 before anything is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from handler.config import ConfigError, Settings, read_settings

logger = logging.getLogger("handler")


def log_settings(settings: Settings) -> None:
    """Log the effective configuration once, secrets redacted."""
    described = " ".join(f"{key}={value}" for key, value in settings.describe().items())
    logger.info("effective configuration: %s", described)
    if settings.sm_num_gpus is not None:
        logger.info(
            "SM_NUM_GPUS=%s is ignored: it has no meaning for this server", settings.sm_num_gpus
        )


def generate(prompt: str, settings: Settings) -> int:
    """Stream one greedy answer for `prompt` to stdout (a smoke test of the generator)."""
    from handler.engine import build_torch_engine
    from handler.generation.request import FinalEvent, GenerationRequest, TokenEvent

    if settings.model_id is not None:
        model_path: str | Path = settings.model_id
    else:
        try:
            from handler.testing.smollm2 import ensure_model
        except ModuleNotFoundError:  # the runtime image ships without the test helpers
            sys.stderr.write("generate: name a model (--model-id or HF_MODEL_ID)\n")
            return 2
        model_path = ensure_model()
    engine = build_torch_engine(settings, model_path)
    prompt_ids = engine.tokenizer(prompt).input_ids
    handle = engine.generator.submit(GenerationRequest(prompt_ids, max_new_tokens=64))
    for event in handle.events():
        if isinstance(event, TokenEvent) and not event.token.special:
            sys.stdout.write(event.token.text)
            sys.stdout.flush()
        elif isinstance(event, FinalEvent):
            sys.stdout.write(f"\n[finish_reason={event.finish_reason.value}]\n")
    engine.generator.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "serve"
    prompt = argv.pop(0) if command == "generate" and argv else "Hello"
    try:
        settings = read_settings(argv, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log_settings(settings)
    if command == "generate":
        return generate(prompt, settings)
    if command == "serve" and settings.serving_stack == "mms":
        from handler.mms.launcher import serve as serve_mms

        return serve_mms(settings, argv, dict(os.environ))
    if command == "serve":
        from handler.server.launcher import serve

        return serve(settings, dict(os.environ))
    sys.stderr.write(f"Unknown command {command!r}: use serve or generate\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
