"""The Sinkhorn ops of the torch backend (the spec), registered on import:

    fdiv::sinkhorn_lse_torch   one batched row (or column) log-sum-exp update, chunked
    fdiv::sinkhorn_fwd_torch   the whole solve: alternating/symmetric updates, eps-scaling,
                               per-problem stopping; returns (f, g, n_iter, marginal error)

``fdiv_kernels.transport._ops_triton`` registers the same two ops for the triton backend.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fdiv_kernels.transport import _solver as core


def register_fwd(backend: str, lse_op: Callable, solve: Optional[Callable] = None) -> None:
    """Register ``fdiv::sinkhorn_fwd_<backend>``: the solve loop of ``core`` around ``lse_op``,
    or ``solve`` (same arguments as the op) where a backend solves whole problems itself and
    returns None for those it leaves to the loop."""

    @torch.library.custom_op(f"fdiv::sinkhorn_fwd_{backend}", mutates_args=())
    def fwd(
        x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], log_a: Tensor,
        log_b: Tensor, f0: Optional[Tensor], g0: Optional[Tensor], eps0: Optional[Tensor],
        eps: float, kind: int, rho_a: float, rho_b: float, max_iter: int, tol: float,
        check_every: int, scaling: float, symmetric: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # check_every 0 (auto): every iteration where the check is free (a whole-solve kernel
        # has the row LSE at hand), every core.CHECK_EVERY where it costs a host sync.
        if solve is not None:
            out = solve(x, y, cost, log_a, log_b, f0, g0, eps0, eps, kind, rho_a, rho_b, max_iter,
                        tol, check_every or 1, scaling, symmetric)
            if out is not None:
                return out
        return core.solve(lse_op, x, y, cost, log_a, log_b, eps, kind, rho_a, rho_b, max_iter,
                          tol, check_every or core.CHECK_EVERY, f0, g0, eps0, scaling, symmetric)

    @fwd.register_fake
    def _(x, y, cost, log_a, log_b, f0, g0, eps0, eps, kind, rho_a, rho_b, max_iter, tol,
          check_every, scaling, symmetric):
        B = log_a.shape[0]
        return (torch.empty_like(log_a), torch.empty_like(log_b),
                log_a.new_empty(B, dtype=torch.int32), log_a.new_empty(B))


def register_lse_fake(op) -> None:
    @op.register_fake
    def _(x, y, cost, h, eps_inv, kind, transpose, active):
        n = (cost.shape[2] if transpose else cost.shape[1]) if cost is not None else x.shape[1]
        return h.new_empty(h.shape[0], n)


@torch.library.custom_op("fdiv::sinkhorn_lse_torch", mutates_args=())
def sinkhorn_lse_torch(
    x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], h: Tensor,
    eps_inv: Tensor, kind: int, transpose: bool, active: Optional[Tensor],
) -> Tensor:
    """out[b, i] = LSE_j(h[b, j] - c(b, i, j) eps_inv[b]); ``active`` is a hint (ignored here)."""
    return core.lse_torch(x, y, cost, h, eps_inv, kind, transpose)


register_lse_fake(sinkhorn_lse_torch)


def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
    return core.lse_torch(x, y, cost, h, eps_inv, kind, transpose)


register_fwd("torch", _lse)
