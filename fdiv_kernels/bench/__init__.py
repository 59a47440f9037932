"""Benchmarks: ``python -m fdiv_kernels.bench`` (the main job) and bench/ (pytest-benchmark)."""
