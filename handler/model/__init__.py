"""Model backends: one narrow interface (`ModelBackend`), a torch and a Neuron implementation."""
