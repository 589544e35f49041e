"""Benchmarks of the serving engine against bare `transformers` baselines."""
