"""logsumexp / token_logprobs under pytest-benchmark: the cases of ``python -m fdiv_kernels.bench``."""

from conftest import DEVICE, DTYPE, case_params, run_case, shapes

from fdiv_kernels.bench.softmax_stats import softmax_stats_cases

CASES = softmax_stats_cases(shapes("256x32000"), DTYPE, DEVICE)


@case_params(CASES)
def test_softmax_stats(benchmark, case, provider):
    run_case(benchmark, case, provider)
