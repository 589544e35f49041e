"""Helpers shared by the tests and benchmarks (test model preparation)."""
