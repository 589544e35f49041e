"""Two Neuron cores, as on an inf2.xlarge."""


def get_available_cores() -> int:
    return 2
