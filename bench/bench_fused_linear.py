"""fused_linear_divergence under pytest-benchmark (shapes N x H x V via FDIV_BENCH_FL_SHAPES)."""

import os

from conftest import DEVICE, DTYPE, case_params, run_case

from fdiv_kernels.bench.fused_linear import fused_linear_cases

SHAPES = [tuple(int(x) for x in s.split("x"))
          for s in os.environ.get("FDIV_BENCH_FL_SHAPES", "1024x256x32000").split(",")]
CASES = fused_linear_cases(SHAPES, DTYPE, DEVICE)


@case_params(CASES)
def test_fused_linear(benchmark, case, provider):
    run_case(benchmark, case, provider)
