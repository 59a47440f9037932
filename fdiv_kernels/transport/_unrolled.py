"""grad="unrolled": Sinkhorn differentiated through exactly ``n_iter`` iterations (no early stop).

``loop`` is the statement of record: a differentiable torch loop checkpointed per iteration, the
path of every backend without a fused unrolled pair. A backend with one (``SinkhornOps.
unrolled_fwd`` / ``unrolled_bwd``, the cpu backend's csrc/cpu/sinkhorn_unrolled.cpp) runs the
iterations and their reverse in one call each (``fused``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.transport import _dual as dual
from fdiv_kernels.transport import _solver as solver
from fdiv_kernels.transport._autograd import UnrolledFunction
from fdiv_kernels.transport._costs import compute_dtype, pairwise_cost
from fdiv_kernels.transport._problem import log_weights
from fdiv_kernels.transport._registry import ops_for


def lse_diff(x, y, cost, h, eps, kind, transpose):
    """Differentiable LSE_j(h_j - c_ij / eps) (whole block; run under checkpoint)."""
    if cost is not None:
        c = (cost.transpose(1, 2) if transpose else cost).to(h.dtype)
    else:
        c = pairwise_cost(x.to(h.dtype), y.to(h.dtype), kind)
    return torch.logsumexp(h[:, None, :] - c / eps, dim=-1)


def loop(x, y, cost, a, b, eps, kind, rho_a, rho_b, n_iter, f0, g0, symmetric,
             checkpoint: bool = True):
    """f, g after exactly ``n_iter`` iterations, differentiable w.r.t. everything."""
    from torch.utils.checkpoint import checkpoint as ckpt

    ctype = compute_dtype(a.dtype)
    la, lb = log_weights(a), log_weights(b)
    ta = 1.0 if rho_a <= 0 else rho_a / (rho_a + eps)
    tb = 1.0 if rho_b <= 0 else rho_b / (rho_b + eps)
    xs, ys = (x, y) if cost is None else (None, None)
    B, n = a.shape
    f = a.new_zeros(B, n, dtype=ctype) if f0 is None else f0.to(ctype)
    g = b.new_zeros(B, b.shape[1], dtype=ctype) if g0 is None else g0.to(ctype)

    def step(f, g, xs, ys, cost, la, lb):
        if symmetric:
            fn = -ta * eps * lse_diff(xs, ys, cost, lb + g / eps, eps, kind, False)
            gn = -tb * eps * lse_diff(ys, xs, cost, la + f / eps, eps, kind, True)
            return 0.5 * (f + fn), 0.5 * (g + gn)
        f = -ta * eps * lse_diff(xs, ys, cost, lb + g / eps, eps, kind, False)
        g = -tb * eps * lse_diff(ys, xs, cost, la + f / eps, eps, kind, True)
        return f, g

    for _ in range(n_iter):
        if checkpoint:
            f, g = ckpt(step, f, g, xs, ys, cost, la, lb, use_reentrant=False)
        else:
            f, g = step(f, g, xs, ys, cost, la, lb)
    return f, g


def fused(backend: str, x: Tensor | None, y: Tensor | None, cost: Tensor | None,
          a: Tensor | None, b: Tensor | None, f0: Tensor | None, g0: Tensor | None, eps: float,
          kind: int, rho_a: float, rho_b: float, n_iter: int, symmetric: bool,
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(value, <C, P>, f, g, marginal error) per problem by ``backend``'s fused pair, as ``loop``
    followed by ``plan_totals`` and ``dual_value``; a, b None: uniform weights (no tensor)."""
    return UnrolledFunction.apply(backend, x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b,
                                  n_iter, symmetric)


def solve(backend: str, x, y, cost, a, b, eps, kind, rho_a, rho_b, n_iter, tol, f0, g0,
          symmetric):
    """(value, <C, P>, f, g, n_iter, converged, error) after exactly ``n_iter`` iterations, on
    ``backend``'s fused pair when it has one, else the checkpointed torch loop."""
    if ops_for(backend).unrolled_fwd is not None:
        value, lin, f, g, err = fused(backend, x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b,
                                      n_iter, symmetric)
        n = torch.full_like(err, n_iter, dtype=torch.int32)
        return value, lin, f, g, n, err <= tol, err

    from torch.utils.checkpoint import checkpoint

    f, g = loop(x, y, cost, a, b, eps, kind, rho_a, rho_b, n_iter, f0, g0, symmetric)

    def totals(x, y, cost, a, b, f, g):
        return dual.plan_totals(x, y, cost, a, b, f, g, eps, kind)

    total, lin = checkpoint(totals, x, y, cost, a, b, f, g, use_reentrant=False)
    value = dual.dual_value(a, b, f, g, total, eps, rho_a, rho_b)
    with torch.no_grad():
        ev = torch.full_like(a[:, 0], eps)
        xs, ys = (x, y) if cost is None else (None, None)
        lr = solver.lse_torch(xs, ys, cost, log_weights(b) + g / eps, 1 / ev, kind, False)
        err = solver.marginal_error(f.detach(), lr, log_weights(a), ev, rho_a)
        if symmetric:
            lc = solver.lse_torch(ys, xs, cost, log_weights(a) + f / eps, 1 / ev, kind,
                                  True)
            err = err + solver.marginal_error(g.detach(), lc, log_weights(b), ev, rho_b)
    n = torch.full_like(err, n_iter, dtype=torch.int32)
    return value, lin, f, g, n, err <= tol, err
