"""Shared test setup: the Triton interpreter, the tolerance table, the backends to test.

Shared functions live in helpers.py; this module holds only configuration and fixtures."""

import os

# Must be set before Triton (or any kernel module) is imported: CI has no GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import available_backends  # noqa: E402

# (rtol, atol) per input dtype. The kernels compute in fp32 from the given (rounded) inputs, so the
# loss is fp32-accurate for every input dtype; gradients are returned in the input dtype.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-5, 2e-6),
    torch.float16: (2e-5, 2e-6),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-5, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-6),
    torch.float16: (2e-3, 1e-7),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


BACKENDS = available_backends("divergence_fwd")
STATS_BACKENDS = available_backends("softmax_stats_fwd")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend that implements the divergence op here."""
    return request.param
