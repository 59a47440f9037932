"""fk.divergence under pytest-benchmark: the cases of ``python -m fdiv_kernels.bench``."""

from conftest import DEVICE, DTYPE, case_params, run_case, shapes

from fdiv_kernels.bench.divergence import divergence_cases

CASES = divergence_cases(["js", "kl"], shapes("64x32000"), DTYPE, DEVICE, ["full"],
                         peers=("eager", "compile", "liger"))


@case_params(CASES)
def test_divergence(benchmark, case, provider):
    run_case(benchmark, case, provider)
