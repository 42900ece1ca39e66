"""Benchmarks (`python -m harness bench ...`): protocols, training throughput, Sinkhorn, GPU."""
