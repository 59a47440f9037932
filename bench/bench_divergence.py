"""pytest-benchmark form of the divergence cases (the same cases as ``python -m fdiv_kernels.bench``).

    pytest bench/ --benchmark-only                      # CPU-sized shapes
    FDIV_BENCH_SHAPES=8192x128256 pytest bench/ ...     # other shapes
"""

import os

import pytest
import torch

from fdiv_kernels.bench.divergence import divergence_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [tuple(int(x) for x in s.split("x"))
          for s in os.environ.get("FDIV_BENCH_SHAPES", "64x32000").split(",")]
CASES = divergence_cases(["js", "kl"], SHAPES, DTYPE, DEVICE, ["full"], peers=("eager", "compile"))
PARAMS = [(c, name) for c in CASES for name in c.providers]


@pytest.mark.parametrize(
    "case,provider", PARAMS,
    ids=[f"{c.op}-{'x'.join(map(str, c.shape))}-{p}" for c, p in PARAMS],
)
def test_divergence(benchmark, case, provider):
    fn = case.providers[provider]()
    fn()  # warm up (and compile) outside the measured rounds
    benchmark.extra_info.update(op=case.op, shape=list(case.shape), dtype=str(case.dtype),
                                compulsory_bytes=case.compulsory_bytes)
    benchmark(fn)
