"""Shared set-up for the pytest-benchmark cases: device, dtype and shapes from the environment.

    pytest bench/ --benchmark-only                               # CPU-sized defaults
    FDIV_BENCH_SHAPES=8192x128256 pytest bench/ --benchmark-only  # other (N x V) shapes
"""

import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def shapes(default: str) -> list[tuple[int, ...]]:
    text = os.environ.get("FDIV_BENCH_SHAPES", default)
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]


def case_params(cases):
    """(case, provider) pairs with readable ids, for pytest.mark.parametrize."""
    pairs = [(c, name) for c in cases for name in c.providers]
    ids = [f"{c.op}-{c.mode}-{'x'.join(map(str, c.shape))}-{p}" for c, p in pairs]
    return pytest.mark.parametrize("case,provider", pairs, ids=ids)


def run_case(benchmark, case, provider):
    fn = case.providers[provider]()
    fn()  # warm up (and compile) outside the measured rounds
    benchmark.extra_info.update(op=case.op, shape=list(case.shape), dtype=str(case.dtype),
                                compulsory_bytes=case.compulsory_bytes)
    benchmark(fn)
