"""Benchmark data: file lists, the synthetic benchmark, training triplets, transforms."""
