"""The dual side of Sinkhorn at fixed potentials, all chunked torch (the statement of record the
backends' plan ops are tested against): the dual value, the plan's sums, the envelope gradients
and the implicit-differentiation adjoint (CG on the dual's Hessian). Conventions: ``_solver``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fdiv_kernels.core._rows import row_chunks
from fdiv_kernels.transport._costs import CHUNK_ELEMENTS, cost_rows, pairwise_cost


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
    for rows in row_chunks(n, B * g.shape[1], CHUNK_ELEMENTS):
        p, c = plan_rows(x, y, cost, a, b, f, g, rows, eps, kind, ctype)
        total += p.sum((1, 2))
        lin += (p * c).sum((1, 2))
    return total, lin


def dual_value(a, b, f, g, total, eps, rho_a, rho_b) -> Tensor:
    return ((a * phi(f, rho_a)).sum(-1) + (b * phi(g, rho_b)).sum(-1)
            - eps * (total - a.sum(-1) * b.sum(-1)))


def plan_apply(x, y, cost, a, b, f, g, eps, kind, vf, vg):
    """(P vg, P^T vf, P 1, P^T 1) per problem, chunked."""
    ctype = f.dtype
    B, n = f.shape
    pv, ptv = torch.zeros_like(f), torch.zeros_like(g)
    r1, c1 = torch.zeros_like(f), torch.zeros_like(g)
    for rows in row_chunks(n, B * g.shape[1], CHUNK_ELEMENTS):
        p, _ = plan_rows(x, y, cost, a, b, f, g, rows, eps, kind, ctype)
        pv[:, rows] = torch.bmm(p, vg[:, :, None])[..., 0]
        ptv += torch.bmm(vf[:, None, rows], p)[:, 0]
        r1[:, rows] = p.sum(-1)
        c1 += p.sum(1)
    return pv, ptv, r1, c1


def implicit_adjoint(x, y, cost, a, b, f, g, eps, kind, rho_a, rho_b, uf, ug,
                     cg_iter: int = 30, cg_tol: float = 1e-10,
                     apply_op: Optional[Callable] = None) -> tuple[Tensor, Tensor]:
    """Solve K lam = u by preconditioned CG, batched per problem, where -K / eps is the Hessian
    of the dual in (f, g): K = [[diag(P1 + eps a phi''), P], [P^T, diag(P^T 1 + eps b psi'')]].

    Balanced problems have the null direction (1, -1) (the potentials' additive constant): u is
    projected off it. Zero-weight points are outside the fixed point: their lam is 0.
    ``apply_op``: a backend's op with the signature and results of ``plan_apply``.
    """
    apply = apply_op or plan_apply
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
    # The smallest normal number of the dtype: 1e-300 is 0 in float32, and x / 0 is NaN once CG
    # has converged (rz = 0) or the upstream gradient lies along the gauge direction.
    tiny = torch.finfo(f.dtype).tiny
    inv = torch.where(mask & (diag > 0), 1 / diag.clamp_min(tiny), torch.zeros_like(diag))
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
    # A relative tolerance the dtype can reach: below ~eps the residual is rounding, and CG on it
    # drifts until p K p underflows (NaN in float32 at cg_tol = 1e-10).
    tol = max(cg_tol, 8 * torch.finfo(f.dtype).eps)
    stop = (u * u).sum(-1, keepdim=True) * tol**2
    for _ in range(cg_iter):
        kp = K(p)
        pkp = (p * kp).sum(-1, keepdim=True)
        go = (rz > stop) & (pkp > 0)
        alpha = torch.where(go, rz / pkp.clamp_min(tiny), torch.zeros_like(rz))
        lam = lam + alpha * p
        r = r - alpha * kp
        z = inv * r
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + torch.where(go, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz)) * p
        rz = torch.where(go, rz_new, torch.zeros_like(rz))
        # Eager: stop once every problem converged (a host sync). Compiled: no data-dependent
        # branch; the remaining iterations leave lam unchanged (alpha is 0 past convergence).
        if not torch.compiler.is_compiling() and not bool((rz > stop).any()):
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
    leaves = [t.detach().to(ctype) if t is not None else None for t in (x, y, cost, a, b)]
    grads = [torch.zeros_like(t) if t is not None and w else None for t, w in zip(leaves, need)]
    wanted = [i for i, t in enumerate(leaves) if t is not None and need[i]]
    if not wanted:
        return grads
    lam_f = torch.zeros_like(f) if lam_f is None else lam_f
    lam_g = torch.zeros_like(g) if lam_g is None else lam_g
    gv = g_value.to(ctype)
    one = torch.ones((), dtype=ctype, device=f.device)

    def acc(scalar_fn, idx):
        """grads[i] += d scalar_fn(x, y, cost, a, b) / d leaves[i] for i in idx. torch.func.vjp,
        not torch.autograd.grad: it also runs inside a registered op (fdiv::sinkhorn_grads_torch),
        where autograd is below the dispatch."""
        def fn(*ts):
            full = list(leaves)
            for i, t in zip(idx, ts):
                full[i] = t
            return scalar_fn(*full)

        _, vjp = torch.func.vjp(fn, *(leaves[i] for i in idx))
        for i, d in zip(idx, vjp(one)):
            grads[i] = grads[i] + d

    # Separable terms: g_V (<a, phi(f)> + <b, phi(g)> + eps sum a sum b)
    #                  + eps (<lam_f, a phi'(f)> + <lam_g, b phi'(g)>)
    sep_idx = [i for i in (3, 4) if i in wanted]
    if sep_idx:
        def separable(xx, yy, cc, aa, bb):
            s = (gv * ((aa * phi(f, rho_a)).sum(-1) + (bb * phi(g, rho_b)).sum(-1)
                       + eps * aa.sum(-1) * bb.sum(-1))).sum()
            return s + eps * ((lam_f * aa * dphi(f, rho_a)).sum()
                              + (lam_g * bb * dphi(g, rho_b)).sum())
        acc(separable, sep_idx)
    B, n = f.shape
    for rows in row_chunks(n, B * g.shape[1], CHUNK_ELEMENTS):
        def plan_term(xx, yy, cc, aa, bb, rows=rows):
            xr = xx[:, rows] if xx is not None else None
            cr = cc[:, rows] if cc is not None else None
            c = (cr.to(ctype) if cr is not None else pairwise_cost(xr, yy, kind))
            p = (aa[:, rows, None] * bb[:, None, :]
                 * torch.exp((f[:, rows, None] + g[:, None, :] - c) / eps))
            # -eps g_V sum P - eps (<lam_f, P 1> + <lam_g, P^T 1>)
            w = gv[:, None, None] + lam_f[:, rows, None] + lam_g[:, None, :]
            return -eps * (p * w).sum()
        acc(plan_term, wanted)
    return grads
