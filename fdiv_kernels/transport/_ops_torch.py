"""The Sinkhorn ops of the torch backend (the spec), registered on import:

    fdiv::sinkhorn_lse_torch   one batched row (or column) log-sum-exp update, chunked
    fdiv::sinkhorn_fwd_torch   the whole solve: alternating/symmetric updates, eps-scaling,
                               per-problem stopping; returns (f, g, n_iter, marginal error)
    fdiv::sinkhorn_grads_torch the value's gradients at fixed potentials (``_dual.dual_grads``
                               as an op: its inner autograd stays opaque to torch.compile)

The plan's totals and products and the unrolled loop are the torch statement of record
(``_dual``, ``_unrolled``), plain traceable torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fdiv_kernels.transport import _dual
from fdiv_kernels.transport import _registry as registry
from fdiv_kernels.transport._solver import lse_torch


@torch.library.custom_op("fdiv::sinkhorn_lse_torch", mutates_args=())
def sinkhorn_lse_torch(
    x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], h: Tensor,
    eps_inv: Tensor, kind: int, transpose: bool, active: Optional[Tensor],
) -> Tensor:
    """out[b, i] = LSE_j(h[b, j] - c(b, i, j) eps_inv[b]); ``active`` is a hint (ignored here)."""
    return lse_torch(x, y, cost, h, eps_inv, kind, transpose)


def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
    return lse_torch(x, y, cost, h, eps_inv, kind, transpose)


@torch.library.custom_op("fdiv::sinkhorn_grads_torch", mutates_args=())
def sinkhorn_grads_torch(
    x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], a: Tensor, b: Tensor,
    f: Tensor, g: Tensor, g_value: Tensor, lam_f: Optional[Tensor], lam_g: Optional[Tensor],
    eps: float, kind: int, rho_a: float, rho_b: float, need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (x, y, cost, a, b) of the value (and the implicit term), each empty where
    not wanted (a fixed number of outputs, none aliasing another); see ``_dual.dual_grads``."""
    grads = _dual.dual_grads(x, y, cost, a, b, f, g, eps, kind, rho_a, rho_b, g_value, lam_f,
                             lam_g, tuple(need))
    return tuple(d.detach() if d is not None else f.new_empty(0) for d in grads)


_fwd = registry.register_fwd("torch", _lse)
registry.register(registry.SinkhornOps("torch", forward=_fwd, grads=sinkhorn_grads_torch))
registry.register_fakes({"sinkhorn_fwd": _fwd, "sinkhorn_lse": sinkhorn_lse_torch,
                         "sinkhorn_grads": sinkhorn_grads_torch})
