"""How many Neuron cores this process may use, and whether a model's tensor parallel degree
fits them.

The Neuron runtime takes the cores named by `NEURON_RT_VISIBLE_CORES` and at most
`NEURON_RT_NUM_CORES` of them; optimum-neuron counts the devices' cores (`get_available_cores`).
The settings carry both variables' values: nothing here reads the environment.
"""

from __future__ import annotations

from handler.errors import ConfigError
from handler.model.neuron_contract import AVAILABLE_CORES, OPTIMUM_NEURON_PIN, load_optimum


def parse_visible_cores(spec: str) -> list[int]:
    """Core indices of a `NEURON_RT_VISIBLE_CORES` value in a form optimum-neuron reads too: one
    core index (`3`) or one range (`0-3`).

    The Neuron runtime also takes lists (`0,2,4-5`), but optimum-neuron 0.4.5's
    `get_available_cores` (`utils/system.py`) splits the value on `-` only: it counts `0,1` as
    one core and raises on `0,2,4-5`, so the load would fail inside optimum-neuron. Such values
    stop start-up here with the forms that work.
    """
    text = spec.strip()
    if "," in text:
        raise ConfigError(
            f"NEURON_RT_VISIBLE_CORES={spec!r} is a list, which optimum-neuron "
            f"{OPTIMUM_NEURON_PIN} does not read (it counts '0,1' as one core and fails on "
            "'0,2,4-5'): give one core index (3) or one range of contiguous cores (0-3)"
        )
    first, _, last = text.partition("-")
    try:
        start = int(first)
        end = int(last) if last else start
        if start < 0 or end < start:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"NEURON_RT_VISIBLE_CORES={spec!r} is invalid: use one core index (3) or one range "
            "of contiguous cores (0-3)"
        ) from None
    return list(range(start, end + 1))


def available_cores(
    num_cores_spec: int | str | None = None, visible_cores_spec: str | None = None
) -> int:
    """Neuron cores this process may use.

    optimum-neuron's `get_available_cores()` counts the cores of the Neuron devices; the values
    of `NEURON_RT_NUM_CORES` and `NEURON_RT_VISIBLE_CORES` (passed by the caller, which reads the
    environment) cap it the way the Neuron runtime does. `NEURON_RT_VISIBLE_CORES` is checked
    first: optimum-neuron reads it too, and raises on forms it does not know.
    """
    visible = parse_visible_cores(visible_cores_spec) if visible_cores_spec else None
    cores = int(load_optimum(AVAILABLE_CORES)())
    if num_cores_spec is not None and num_cores_spec != "":
        try:
            cap = int(num_cores_spec)
        except ValueError:
            raise ConfigError(
                f"NEURON_RT_NUM_CORES={num_cores_spec!r} is invalid: it must be a whole number"
            ) from None
        cores = min(cores, cap)
    if visible is not None:
        cores = min(cores, len(visible))
    return cores


def check_available_cores(
    requested: int,
    available: int,
    visible_cores_spec: str | None = None,
    *,
    compiled_model: str | None = None,
) -> None:
    """Raise `ConfigError` when `requested` cores (the tensor parallel degree) cannot run here.

    `compiled_model`: the exported model that fixes `requested`, else `requested` comes from
    `HF_NUM_CORES`. optimum-neuron 0.4.5 pads attention heads to any tensor parallel degree
    (`get_shardable_head_counts` in its GQA module), so the only limit it enforces is the number
    of available cores.
    """
    visible = (
        f"NEURON_RT_VISIBLE_CORES={visible_cores_spec}"
        if visible_cores_spec
        else "NEURON_RT_VISIBLE_CORES is not set: all cores of the instance's Neuron devices"
    )
    if available <= 0:
        raise ConfigError(
            f"No Neuron cores are available to this process ({visible}): run on an inf2, trn1 "
            "or trn2 instance with the Neuron devices passed to the container (docker run "
            "--device /dev/neuron0 ...), check NEURON_RT_VISIBLE_CORES, or set "
            "SERVING_BACKEND=torch"
        )
    if requested <= available:
        return
    where = f"{available} available to this process ({visible})"
    if compiled_model is not None:
        raise ConfigError(
            f"The exported model {compiled_model} was compiled for {requested} Neuron cores but "
            f"only {where}: run it on an instance with at least {requested} cores, widen "
            f"NEURON_RT_VISIBLE_CORES, or export the model again with HF_NUM_CORES between 1 and "
            f"{available}"
        )
    raise ConfigError(
        f"HF_NUM_CORES={requested} Neuron cores requested but only {where}: set HF_NUM_CORES "
        f"(--num-cores) between 1 and {available}, widen NEURON_RT_VISIBLE_CORES, or use a larger "
        "instance"
    )
