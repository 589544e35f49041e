"""hf-neuron-serving: TGI, OpenAI and SageMaker routes over a static-batch generator.

Importing this package loads nothing and reads no environment: `python -m handler serve` does.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["EndpointHandler", "__version__"]


def __getattr__(name: str) -> Any:
    """`handler.EndpointHandler`, imported on first use (it loads torch and transformers)."""
    if name == "EndpointHandler":
        from handler.endpoint_handler import EndpointHandler

        return EndpointHandler
    raise AttributeError(f"module 'handler' has no attribute {name!r}")
