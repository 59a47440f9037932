"""Shared test setup: the Triton interpreter, the tolerance table, the backends to test."""

import os

# Must be set before Triton (or any kernel module) is imported: CI has no GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fdiv_kernels as fk  # noqa: E402

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


def available_backends(op: str, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` tensors of ``dtype`` here (on the CPU, Triton
    runs in the interpreter; on a GPU, only compiled Triton counts)."""
    x = torch.empty(1, dtype=dtype, device=device)
    out = []
    for name in fk.dispatch.BACKENDS:
        if device != "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            continue
        try:
            fk.dispatch.select(name, x, op)
        except fk.BackendUnavailableError:
            continue
        out.append(name)
    return out


BACKENDS = available_backends("divergence_fwd")
STATS_BACKENDS = available_backends("softmax_stats_fwd")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend that implements the divergence op here."""
    return request.param


def backend_cfg_fixture(backends: list[str], kernel_module: str):
    """A fixture over each backend, plus Triton with its block capped (``MAX_BLOCK = 64`` in
    ``kernel_module``) so short rows run the multi-block online loop of real vocabularies."""
    configs = [(b, False) for b in backends] + ([("triton", True)] if "triton" in backends else [])

    @pytest.fixture(params=configs, ids=[f"{b}{'-small_block' if c else ''}" for b, c in configs])
    def backend_cfg(request, monkeypatch):
        name, small = request.param
        if small:
            import importlib

            monkeypatch.setattr(importlib.import_module(kernel_module), "MAX_BLOCK", 64)
        return name

    return backend_cfg


def assert_close(actual, expected, tol, what=""):
    """``actual`` matches ``expected`` (tensors or numbers, compared in float64) within
    ``tol = (rtol, atol)``."""
    rtol, atol = tol
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol,
        equal_nan=True, msg=lambda m: f"{what}: {m}",
    )
