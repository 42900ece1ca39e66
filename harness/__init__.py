"""Benchmark harness for representation learning and deep clustering without class priors."""
