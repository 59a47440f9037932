"""Shared test helpers (next to the float64 reference in reference.py): imported by the test
modules, never imported from another test module.

Sinkhorn: seeded points and weights, the POT cost matrices, KL, and the backends that solve.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fdiv_kernels as fk
from reference import logits

F64 = torch.float64
F32 = torch.float32

try:
    import ot
except ImportError:  # POT is optional: its oracle tests skip
    ot = None

needs_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")


def sinkhorn_backends(dtype: torch.dtype = F32) -> list[str]:
    """Backends that solve Sinkhorn on CPU tensors of ``dtype`` here (Triton: the interpreter)."""
    out = []
    for name in fk.dispatch.BACKENDS:
        try:
            fk.dispatch.select(name, torch.empty(1, dtype=dtype), "sinkhorn_fwd")
        except fk.BackendUnavailableError:
            continue
        out.append(name)
    return out


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
