"""hf-neuron-serving: TGI, OpenAI and SageMaker routes over a static-batch generator.

Importing this package loads nothing and reads no environment: `python -m handler serve` does.
"""

__version__ = "0.1.0"
