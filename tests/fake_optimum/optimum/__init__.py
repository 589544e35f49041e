"""A stand-in for the `optimum` namespace, put on the server's PYTHONPATH by the Neuron server
tests only (optimum-neuron needs Neuron devices and AWS's SDK, absent here)."""
