"""Helpers shared by the test modules: import them from here, never from another test module.

The float64 reference is reference.py; the tolerance tables and the backend fixtures are in
conftest.py (built with ``available_backends`` below).
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.core import _dispatch as dispatch
from reference import logits

# Parameters that exercise each kind away from its degenerate limits (negative and >1 alpha too).
KIND_PARAMS = [
    ("kl", None), ("reverse_kl", None), ("js", 0.5), ("js", 0.1), ("tv", None),
    ("hellinger", None), ("chi2", None), ("alpha", 0.5), ("alpha", -0.5), ("alpha", 1.5),
    ("skew_kl", 0.1), ("skew_reverse_kl", 0.3), ("jeffreys", None),
    # soft_ce is H(p), not 0, at p = q (``zero_at_equal``). The row kinds (renyi,
    # cauchy_schwarz) are left out: they run their own row op, which the cuda C++ backend lacks
    # (test_gpu takes these kinds on every GPU backend); test_row_kinds.py covers them on every
    # backend that has it.
    ("soft_ce", None),
]
PARAM_NAME = {"js": "beta", "alpha": "alpha", "skew_kl": "lam", "skew_reverse_kl": "lam",
              "renyi": "alpha"}


def zero_at_equal(kind: str) -> bool:
    """Whether ``kind`` is 0 at p = q (every divergence; not soft_ce, a cross-entropy)."""
    from fdiv_kernels.kinds._registry import lookup

    return lookup(kind).zero_at_equal


def kind_kwargs(kind: str, param: float | None) -> dict:
    """The keyword ``fk.divergence`` takes ``param`` under for ``kind`` (none without a param)."""
    return {PARAM_NAME[kind]: param} if param is not None else {}


def assert_close(actual, expected, tol: tuple[float, float], what: str = "") -> None:
    """``actual`` == ``expected`` within ``tol = (rtol, atol)``, compared in float64; NaN matches
    NaN. Either side may be a tensor, a number or an array."""
    rtol, atol = tol
    torch.testing.assert_close(
        # dtype given to as_tensor: a Python float must not pass through float32 first.
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}",
    )


def grad_tol(tol: tuple[float, float], ref: torch.Tensor) -> tuple[float, float]:
    """``tol`` with its absolute part raised to 8 fp32 ulps of the largest finite reference
    gradient: a gradient element (h_j - q_j sum h) is formed next to the row's largest terms, so
    its fp32 error scales with them, not with the element (chi2's p^2 / q terms show it most)."""
    rtol, atol = tol
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return rtol, max(atol, 8 * torch.finfo(torch.float32).eps * scale)


def available_backends(op: str, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` tensors of ``dtype`` here (on the CPU, Triton
    runs in the interpreter; on a GPU, only compiled Triton counts)."""
    x = torch.empty(1, dtype=dtype, device=device)
    out = []
    for name in dispatch.BACKENDS:
        if device != "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            continue
        try:
            dispatch.select(name, x, op)
        except fk.BackendUnavailableError:
            continue
        out.append(name)
    return out


def backend_cfg_fixture(backends: list[str], kernel_module: str):
    """A fixture over each backend, plus Triton with its block capped (``MAX_BLOCK = 64`` in
    ``kernel_module``) so short rows run the multi-block online loop of real vocabularies."""
    configs = [(b, False) for b in backends] + ([("triton", True)] if "triton" in backends else [])

    @pytest.fixture(params=configs, ids=[f"{b}{'-small_block' if c else ''}" for b, c in configs])
    def backend_cfg(request, monkeypatch):
        name, small = request.param
        if small:
            monkeypatch.setattr(importlib.import_module(kernel_module), "MAX_BLOCK", 64)
        return name

    return backend_cfg


# ---- Sinkhorn ----

F64 = torch.float64
F32 = torch.float32

try:
    import ot
except ImportError:  # POT is optional: its oracle tests skip
    ot = None

needs_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")


def sinkhorn_backends(dtype: torch.dtype = F32) -> list[str]:
    """Backends that solve Sinkhorn on CPU tensors of ``dtype`` here (Triton: the interpreter)."""
    return available_backends("sinkhorn_fwd", dtype)


SINKHORN_BACKENDS = sinkhorn_backends()
HAS_TRITON = "triton" in SINKHORN_BACKENDS
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton sinkhorn ops unavailable")


def sinkhorn_precision(backend: str) -> tuple[torch.dtype, dict, float]:
    """How a POT-oracle test runs on ``backend``: (input dtype, solve keywords, tolerance
    factor). float64 where the backend computes in it (the oracle's 1e-8 agreement), else
    float32 (fp32 potentials: agreement to ~1e-4 relative, hence the factor)."""
    if backend in sinkhorn_backends(F64):
        return F64, dict(tol=1e-12, max_iter=20000), 1.0
    return F32, dict(tol=1e-6, max_iter=3000), 1e4


def points(B, n, d, seed, dtype=F64):
    return logits((B, n, d), dtype, seed=seed, scale=1.0)


def weights(B, n, seed, dtype=F64):
    w = logits((B, n), F64, seed=seed).exp()
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def pot_dist(x, y, cost_fn):
    """The cost matrix (n, m) as POT / the definition gives it, float64 numpy."""
    x, y = x.to(F64), y.to(F64)
    if cost_fn == "sqeuclidean":
        return ot.dist(x.numpy(), y.numpy())
    if cost_fn == "euclidean":
        return ot.dist(x.numpy(), y.numpy(), metric="euclidean")
    if cost_fn == "l1":
        return ot.dist(x.numpy(), y.numpy(), metric="cityblock")
    if cost_fn == "dot":
        return -(x @ y.T).numpy()
    xn, yn = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    return (1 - xn @ yn.T).numpy()


def kl(p, q):
    """Generalized KL(p | q) = sum p log(p / q) - p + q (0 log 0 = 0), float."""
    p, q = np.asarray(p), np.asarray(q)
    return float((np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0) - p + q).sum())


def centered(t):
    return t - t.mean(-1, keepdim=True)
