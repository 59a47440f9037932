"""The backend-independent parts of batched log-domain Sinkhorn: costs, the solve loop, the dual.

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
import torch.nn.functional as F
from torch import Tensor

from fdiv_kernels import _ids

COST_KINDS = {"sqeuclidean": _ids.SQEUCLIDEAN, "euclidean": _ids.EUCLIDEAN, "l1": _ids.L1,
              "dot": _ids.DOT, "cosine": _ids.COSINE}
# Iterations between marginal-error checks where each check costs a host sync (the per-update
# loop); whole-solve kernels check every iteration, the row LSE being at hand.
CHECK_EVERY = 10
# Elements of one (B, rows, m) block: the only memory the torch paths hold beyond O(B(n + m));
# small enough to stay in cache (4x faster on CPU than 1 << 22).
CHUNK_ELEMENTS = 1 << 18

LseFn = Callable[..., Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pairwise_cost(x: Tensor, y: Tensor, kind: int) -> Tensor:
    """(B, r, m) cost between x (B, r, d) and y (B, m, d), differentiable (safe at x_i = y_j)."""
    if kind in (0, 1):
        sq = ((x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
              - 2 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0)
        if kind == 0:
            return sq
        # sqrt has an infinite slope at 0: where two points coincide, take the 0 subgradient.
        return torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))
    if kind == 2:
        return torch.cdist(x, y, p=1)
    if kind == 3:
        return -torch.bmm(x, y.transpose(1, 2))
    if kind == 4:
        xn, yn = F.normalize(x, dim=-1, eps=1e-12), F.normalize(y, dim=-1, eps=1e-12)
        return 1 - torch.bmm(xn, yn.transpose(1, 2))
    raise ValueError(f"unknown cost kind {kind}")


def row_chunks(n: int, per_row: int):
    rows = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    for lo in range(0, n, rows):
        yield slice(lo, min(n, lo + rows))


def cost_rows(x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], rows: slice,
              kind: int, ctype: torch.dtype, transpose: bool = False) -> Tensor:
    """Rows ``rows`` of the (B, n, m) cost (of its transpose when ``transpose``), in ``ctype``."""
    if cost is not None:
        c = cost.transpose(1, 2) if transpose else cost
        return c[:, rows].to(ctype)
    return pairwise_cost(x[:, rows].to(ctype), y.to(ctype), kind)


def lse_torch(x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], h: Tensor,
              eps_inv: Tensor, kind: int, transpose: bool) -> Tensor:
    """The torch primitive: out[b, i] = LSE_j(h[b, j] - c_ij eps_inv[b]), chunked over i."""
    B, m = h.shape
    n = (cost.shape[2] if transpose else cost.shape[1]) if cost is not None else x.shape[1]
    out = h.new_empty(B, n)
    for rows in row_chunks(n, B * m):
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
          g0: Optional[Tensor], eps0: Optional[Tensor], scaling: float, symmetric: bool,
          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the Sinkhorn loop. Returns f (B, n), g (B, m), n_iter (B,) int32, error (B,).

    Per-problem stopping: every ``check_every`` iterations the marginal error is computed on the
    device and problems under ``tol`` stop updating (masked updates; kernels skip them); the
    only host sync is the one ``any()`` per check. ``eps0`` (B,) with ``scaling`` in (0, 1) runs
    one iteration per level of the schedule max(eps, eps0 scaling^k) first.
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

    if eps0 is not None and scaling > 0:
        levels = int(math.ceil(math.log(max(float(eps0.max()), eps) / eps) / -math.log(scaling)))
        for k in range(levels):
            ev = torch.clamp(eps0.to(ctype) * scaling**k, min=eps)
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


# ---------------------------------------------------------------------------------------------
# The dual value, the plan's sums, gradients (envelope and implicit), all chunked torch.


def phi(f: Tensor, rho: float) -> Tensor:
    return f if rho <= 0 else -rho * torch.expm1(-f / rho)


def dphi(f: Tensor, rho: float) -> Tensor:
    return torch.ones_like(f) if rho <= 0 else torch.exp(-f / rho)


def plan_rows(x, y, cost, a, b, f, g, rows, eps, kind, ctype):
    """(P rows, cost rows) as differentiable functions of whatever requires grad."""
    c = cost_rows(x, y, cost, rows, kind, ctype)
    p = (a[:, rows, None] * b[:, None, :]
         * torch.exp((f[:, rows, None] + g[:, None, :] - c) / eps))
    return p, c


def plan_totals(x, y, cost, a, b, f, g, eps, kind) -> tuple[Tensor, Tensor]:
    """(sum P, <C, P>) per problem in one chunked pass, without materializing P."""
    ctype = f.dtype
    B, n = f.shape
    total = f.new_zeros(B)
    lin = f.new_zeros(B)
    for rows in row_chunks(n, B * g.shape[1]):
        p, c = plan_rows(x, y, cost, a, b, f, g, rows, eps, kind, ctype)
        total += p.sum((1, 2))
        lin += (p * c).sum((1, 2))
    return total, lin


def dual_value(a, b, f, g, total, eps, rho_a, rho_b) -> Tensor:
    return ((a * phi(f, rho_a)).sum(-1) + (b * phi(g, rho_b)).sum(-1)
            - eps * (total - a.sum(-1) * b.sum(-1)))


def _plan_apply(x, y, cost, a, b, f, g, eps, kind, vf, vg):
    """(P vg, P^T vf, P 1, P^T 1) per problem, chunked."""
    ctype = f.dtype
    B, n = f.shape
    pv, ptv = torch.zeros_like(f), torch.zeros_like(g)
    r1, c1 = torch.zeros_like(f), torch.zeros_like(g)
    for rows in row_chunks(n, B * g.shape[1]):
        p, _ = plan_rows(x, y, cost, a, b, f, g, rows, eps, kind, ctype)
        pv[:, rows] = torch.bmm(p, vg[:, :, None])[..., 0]
        ptv += torch.bmm(vf[:, None, rows], p)[:, 0]
        r1[:, rows] = p.sum(-1)
        c1 += p.sum(1)
    return pv, ptv, r1, c1


def implicit_adjoint(x, y, cost, a, b, f, g, eps, kind, rho_a, rho_b, uf, ug,
                     cg_iter: int = 30, cg_tol: float = 1e-10,
                     plan_apply: Optional[Callable] = None) -> tuple[Tensor, Tensor]:
    """Solve K lam = u by preconditioned CG, batched per problem, where -K / eps is the Hessian
    of the dual in (f, g): K = [[diag(P1 + eps a phi''), P], [P^T, diag(P^T 1 + eps b psi'')]].

    Balanced problems have the null direction (1, -1) (the potentials' additive constant): u is
    projected off it. Zero-weight points are outside the fixed point: their lam is 0.
    ``plan_apply``: a backend's op with the signature and results of ``_plan_apply``.
    """
    apply = plan_apply or _plan_apply
    ra, rb = a > 0, b > 0
    uf = torch.where(ra, uf, torch.zeros_like(uf))
    ug = torch.where(rb, ug, torch.zeros_like(ug))
    balanced = rho_a <= 0 and rho_b <= 0
    null = torch.cat([ra.to(f.dtype), -rb.to(f.dtype)], -1)
    u = torch.cat([uf, ug], -1)
    if balanced:
        u = u - ((u * null).sum(-1, keepdim=True) / (null * null).sum(-1, keepdim=True)) * null
    _, _, r1, c1 = apply(x, y, cost, a, b, f, g, eps, kind, torch.zeros_like(f),
                         torch.zeros_like(g))
    df = r1 + (0 if rho_a <= 0 else eps * a * torch.exp(-f / rho_a) / rho_a)
    dg = c1 + (0 if rho_b <= 0 else eps * b * torch.exp(-g / rho_b) / rho_b)
    diag = torch.cat([df, dg], -1)
    mask = torch.cat([ra, rb], -1)
    inv = torch.where(mask & (diag > 0), 1 / diag.clamp_min(1e-300), torch.zeros_like(diag))
    n = f.shape[1]

    def K(v):
        pv, ptv, _, _ = apply(x, y, cost, a, b, f, g, eps, kind, v[:, :n], v[:, n:])
        out = diag * v + torch.cat([pv, ptv], -1)
        out = torch.where(mask, out, torch.zeros_like(out))
        if balanced:
            out = out - ((out * null).sum(-1, keepdim=True)
                         / (null * null).sum(-1, keepdim=True)) * null
        return out

    lam = torch.zeros_like(u)
    r = u.clone()
    z = inv * r
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    stop = (u * u).sum(-1, keepdim=True) * cg_tol**2
    for _ in range(cg_iter):
        kp = K(p)
        alpha = rz / (p * kp).sum(-1, keepdim=True).clamp_min(1e-300)
        alpha = torch.where(rz > stop, alpha, torch.zeros_like(alpha))
        lam = lam + alpha * p
        r = r - alpha * kp
        z = inv * r
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
        if not bool((rz > stop).any()):
            break
    return lam[:, :n], lam[:, n:]


def dual_grads(x, y, cost, a, b, f, g, eps, kind, rho_a, rho_b, g_value, lam_f, lam_g,
               need: tuple[bool, bool, bool, bool, bool]):
    """Gradients w.r.t. (x, y, cost, a, b) of
        sum_b g_value[b] D_b(f, g; theta) + eps <lam, grad_(f,g) D_b(f, g; theta)>
    at fixed potentials: the envelope term (lam = 0) plus the implicit-function correction.
    Chunked over rows: a (B, rows, m) block at a time, the plan never materialized.
    """
    ctype = f.dtype
    f, g = f.detach(), g.detach()
    leaves = [t.detach().to(ctype).requires_grad_(w) if t is not None else None
              for t, w in zip((x, y, cost, a, b), need)]
    xx, yy, cc, aa, bb = leaves
    grads = [torch.zeros_like(t) if t is not None and w else None for t, w in zip(leaves, need)]
    wanted = [i for i, t in enumerate(leaves) if t is not None and need[i]]
    if not wanted:
        return grads
    lam_f = torch.zeros_like(f) if lam_f is None else lam_f
    lam_g = torch.zeros_like(g) if lam_g is None else lam_g
    gv = g_value.to(ctype)

    def acc(scalar, inputs_idx):
        ins = [leaves[i] for i in inputs_idx]
        outs = torch.autograd.grad(scalar, ins, allow_unused=True)
        for i, d in zip(inputs_idx, outs):
            if d is not None:
                grads[i] = grads[i] + d

    with torch.enable_grad():
        # Separable terms: g_V (<a, phi(f)> + <b, phi(g)> + eps sum a sum b)
        #                  + eps (<lam_f, a phi'(f)> + <lam_g, b phi'(g)>)
        sep_idx = [i for i in (3, 4) if i in wanted]
        if sep_idx:
            s = (gv * ((aa * phi(f, rho_a)).sum(-1) + (bb * phi(g, rho_b)).sum(-1)
                       + eps * aa.sum(-1) * bb.sum(-1))).sum()
            s = s + eps * ((lam_f * aa * dphi(f, rho_a)).sum() + (lam_g * bb * dphi(g, rho_b)).sum())
            acc(s, sep_idx)
        B, n = f.shape
        for rows in row_chunks(n, B * g.shape[1]):
            xr = xx[:, rows] if xx is not None else None
            cr = cc[:, rows] if cc is not None else None
            c = (cr.to(ctype) if cr is not None else pairwise_cost(xr, yy, kind))
            p = (aa[:, rows, None] * bb[:, None, :]
                 * torch.exp((f[:, rows, None] + g[:, None, :] - c) / eps))
            # -eps g_V sum P - eps (<lam_f, P 1> + <lam_g, P^T 1>)
            w = gv[:, None, None] + lam_f[:, rows, None] + lam_g[:, None, :]
            s = -eps * (p * w).sum()
            acc(s, wanted)
    return grads


# ---------------------------------------------------------------------------------------------
# Unrolled: a differentiable torch loop, checkpointed per iteration.


def lse_diff(x, y, cost, h, eps, kind, transpose):
    """Differentiable LSE_j(h_j - c_ij / eps) (whole block; run under checkpoint)."""
    if cost is not None:
        c = (cost.transpose(1, 2) if transpose else cost).to(h.dtype)
    else:
        c = pairwise_cost(x.to(h.dtype), y.to(h.dtype), kind)
    return torch.logsumexp(h[:, None, :] - c / eps, dim=-1)


def unrolled(x, y, cost, a, b, eps, kind, rho_a, rho_b, n_iter, f0, g0, symmetric,
             checkpoint: bool = True):
    """f, g after exactly ``n_iter`` iterations, differentiable w.r.t. everything."""
    from torch.utils.checkpoint import checkpoint as ckpt

    ctype = compute_dtype(a.dtype)
    la = torch.where(a > 0, a.clamp_min(1e-300).log(), torch.full_like(a, float("-inf")))
    lb = torch.where(b > 0, b.clamp_min(1e-300).log(), torch.full_like(b, float("-inf")))
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
