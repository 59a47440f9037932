"""The Sinkhorn loop, backend-independent: the torch LSE primitive, the marginal error, the one
eps-scaling schedule, and ``solve`` around any backend's LSE op.

Conventions (those of OTT / GeomLoss, for a batch of B problems):
    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)
    f_i  = -tau_a eps LSE_j(log b_j + (g_j - C_ij) / eps),   tau = rho / (rho + eps) (1: balanced)
    D(f, g) = <a, phi_a(f)> + <b, phi_b(g)> - eps (sum P - sum a sum b),
    phi(f) = f (balanced) or -rho (exp(-f / rho) - 1) (KL-relaxed marginal with reach rho).
D is the entropic OT value <C, P> + eps KL(P | a x b) [+ rho KL(P1 | a) + rho KL(P^T 1 | b)].

A backend supplies one primitive, ``lse(x, y, cost, h, eps_inv, kind, transpose, active)``:
    out[b, i] = LSE_j(h[b, j] - c(b, i, j) * eps_inv[b]),
with c from points (x: (B, n, d), y: (B, m, d), computed on the fly) or from a dense ``cost``
((B, n, m); ``transpose`` reduces over its rows instead). Every cost kind here is symmetric, so
the column update of a point-cloud problem is the same call with x and y swapped.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from fdiv_kernels.core._rows import row_chunks
from fdiv_kernels.transport._costs import CHUNK_ELEMENTS, cost_rows

# Iterations between marginal-error checks where each check costs a host sync (the per-update
# loop); whole-solve kernels check every iteration, the row LSE being at hand.
CHECK_EVERY = 10

LseFn = Callable[..., Tensor]


def eps_schedule(eps0: Optional[Tensor], eps: float, scaling: float,
                 dtype: torch.dtype) -> Optional[Tensor]:
    """The eps-scaling levels, (levels, B) in ``dtype``: ev_k = max(eps, eps0 scaling^k), one
    iteration each, before the iterations at ``eps``; None without scaling. One level count for
    the batch, from its largest eps0 (one host sync). The only place the schedule is written:
    every backend's solve (torch loop, Triton and C++ whole-solve kernels) reads this table."""
    if eps0 is None or scaling <= 0:
        return None
    top = float(eps0.max())
    # eps0 is the largest finite cost (finite, >= 0); a NaN here would mean a caller's bug.
    if not top > eps:
        return None
    levels = math.ceil(math.log(top / eps) / -math.log(scaling))
    return torch.stack([torch.clamp(eps0.to(dtype) * scaling**k, min=eps)
                        for k in range(levels)]).contiguous()


def lse_torch(x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], h: Tensor,
              eps_inv: Tensor, kind: int, transpose: bool) -> Tensor:
    """The torch primitive: out[b, i] = LSE_j(h[b, j] - c_ij eps_inv[b]), chunked over i."""
    B, m = h.shape
    n = (cost.shape[2] if transpose else cost.shape[1]) if cost is not None else x.shape[1]
    out = h.new_empty(B, n)
    for rows in row_chunks(n, B * m, CHUNK_ELEMENTS):
        c = cost_rows(x, y, cost, rows, kind, h.dtype, transpose)
        out[:, rows] = torch.logsumexp(h[:, None, :] - c * eps_inv[:, None, None], dim=-1)
    return out


def tau(rho: float, eps: Tensor) -> Tensor:
    return torch.ones_like(eps) if rho <= 0 else rho / (rho + eps)


def marginal_error(f: Tensor, lse_r: Tensor, la: Tensor, eps: Tensor, rho: float) -> Tensor:
    """sum_i |(P 1)_i - target_i| with (P 1)_i = a_i exp(f_i / eps + lse_i) computed from the
    row LSE of the next update; target a_i (balanced) or a_i exp(-f_i / rho) (stationarity)."""
    marg = torch.exp(f / eps[:, None] + lse_r)
    target = torch.ones_like(f) if rho <= 0 else torch.exp(-f / rho)
    terms = torch.where(la > float("-inf"), la.exp() * (marg - target).abs(), torch.zeros_like(f))
    err = terms.sum(-1)
    return torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)


def solve(lse: LseFn, x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor],
          la: Tensor, lb: Tensor, eps: float, kind: int, rho_a: float, rho_b: float,
          max_iter: int, tol: float, check_every: int, f0: Optional[Tensor],
          g0: Optional[Tensor], eps_levels: Optional[Tensor], symmetric: bool,
          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the Sinkhorn loop. Returns f (B, n), g (B, m), n_iter (B,) int32, error (B,).

    Per-problem stopping: every ``check_every`` iterations the marginal error is computed on the
    device and problems under ``tol`` stop updating (masked updates; kernels skip them); the
    only host sync is the one ``any()`` per check. ``eps_levels`` (levels, B), from
    ``eps_schedule``: one iteration per level first.
    """
    B, n = la.shape
    m = lb.shape[1]
    ctype = la.dtype
    xs, ys = (x, y) if cost is None else (None, None)
    f = torch.zeros(B, n, dtype=ctype, device=la.device) if f0 is None else f0.to(ctype).clone()
    g = torch.zeros(B, m, dtype=ctype, device=la.device) if g0 is None else g0.to(ctype).clone()

    def rows_lse(g, ev, active):  # LSE_j(lb_j + g_j / eps - C_ij / eps)
        return lse(xs, ys, cost, lb + g / ev[:, None], 1 / ev, kind, False, active)

    def cols_lse(f, ev, active):
        return lse(ys, xs, cost, la + f / ev[:, None], 1 / ev, kind, True, active)

    if eps_levels is not None:
        for ev in eps_levels.to(ctype):
            if symmetric:
                lr, lc = rows_lse(g, ev, None), cols_lse(f, ev, None)
                f = 0.5 * (f - (tau(rho_a, ev) * ev)[:, None] * lr)
                g = 0.5 * (g - (tau(rho_b, ev) * ev)[:, None] * lc)
            else:
                f = -(tau(rho_a, ev) * ev)[:, None] * rows_lse(g, ev, None)
                g = -(tau(rho_b, ev) * ev)[:, None] * cols_lse(f, ev, None)
    ev = torch.full((B,), eps, dtype=ctype, device=la.device)
    ta, tb = (tau(rho_a, ev) * ev)[:, None], (tau(rho_b, ev) * ev)[:, None]
    active = torch.ones(B, dtype=torch.bool, device=la.device)
    n_iter = torch.zeros(B, dtype=torch.int32, device=la.device)
    for it in range(max_iter):
        lr = rows_lse(g, ev, active)
        lc = cols_lse(f, ev, active) if symmetric else None
        if it % check_every == 0:
            err = marginal_error(f, lr, la, ev, rho_a)
            if symmetric:
                err = err + marginal_error(g, lc, lb, ev, rho_b)
            active = active & (err > tol)
            if not bool(active.any()):
                break
        keep = active[:, None]
        if symmetric:
            f, g = (torch.where(keep, 0.5 * (f - ta * lr), f),
                    torch.where(keep, 0.5 * (g - tb * lc), g))
        else:
            f = torch.where(keep, -ta * lr, f)
            g = torch.where(keep, -tb * cols_lse(f, ev, active), g)
        n_iter += active.to(torch.int32)
    err = marginal_error(f, rows_lse(g, ev, None), la, ev, rho_a)
    if symmetric:
        err = err + marginal_error(g, cols_lse(f, ev, None), lb, ev, rho_b)
    return f, g, n_iter, err
