"""The autograd functions of Sinkhorn, made of one backend's registered ops (its ``SinkhornOps``
record): the solve with envelope / implicit gradients, and the fused unrolled pair."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fdiv_kernels.transport import _dual as dual
from fdiv_kernels.transport._problem import Config, log_weights
from fdiv_kernels.transport._registry import ops_for

# Conjugate-gradient iterations of the implicit adjoint (per backward).
CG_ITER = 30


class SinkhornFunction(torch.autograd.Function):
    """(value, f, g, <C, P>, n_iter, error) of the solve. value is differentiable w.r.t.
    (x, y, cost, a, b) by the envelope theorem; f and g too with grad="implicit" (implicit
    differentiation of the fixed point). <C, P>, n_iter and the error are not differentiable
    here (<C, P> is not stationary in the potentials: its gradient needs the unrolled path)."""

    @staticmethod
    def forward(ctx, x, y, cost, a, b, f0, g0, eps0, cfg: Config):
        ops = ops_for(cfg.backend)
        f, g, n_iter, err = ops.forward(x, y, cost, log_weights(a), log_weights(b), f0, g0, eps0,
                                        cfg.eps, cfg.kind, cfg.rho_a, cfg.rho_b, cfg.max_iter,
                                        cfg.tol, cfg.check_every, cfg.scaling, cfg.symmetric)
        totals = ops.totals or dual.plan_totals
        total, lin = totals(x, y, cost, a, b, f, g, cfg.eps, cfg.kind)
        value = dual.dual_value(a, b, f, g, total, cfg.eps, cfg.rho_a, cfg.rho_b)
        ctx.save_for_backward(x, y, cost, a, b, f, g)
        ctx.cfg = cfg
        # One call: a second mark_non_differentiable replaces the first.
        if cfg.grad == "envelope":
            ctx.mark_non_differentiable(f, g, lin, n_iter, err)
        else:
            ctx.mark_non_differentiable(lin, n_iter, err)
        return value, f, g, lin, n_iter, err

    @staticmethod
    def backward(ctx, g_value, g_f, g_g, _lin, _n, _err):
        x, y, cost, a, b, f, g = ctx.saved_tensors
        cfg = ctx.cfg
        ops = ops_for(cfg.backend)
        lam_f = lam_g = None
        if cfg.grad == "implicit" and (g_f is not None or g_g is not None):
            uf = torch.zeros_like(f) if g_f is None else g_f.to(f.dtype)
            ug = torch.zeros_like(g) if g_g is None else g_g.to(g.dtype)
            with torch.no_grad():
                lam_f, lam_g = dual.implicit_adjoint(
                    x, y, cost, a, b, f, g, cfg.eps, cfg.kind, cfg.rho_a, cfg.rho_b, uf, ug,
                    cg_iter=CG_ITER, apply_op=ops.plan_apply)
        gv = torch.zeros_like(f[:, 0]) if g_value is None else g_value
        need = tuple(ctx.needs_input_grad[:5])
        if ops.grads is not None:
            out = ops.grads(x, y, cost, a, b, f, g, gv, lam_f, lam_g, cfg.eps, cfg.kind,
                            cfg.rho_a, cfg.rho_b, list(need))
            grads = [d if w and t is not None else None
                     for d, w, t in zip(out, need, (x, y, cost, a, b))]
        else:
            grads = dual.dual_grads(x, y, cost, a, b, f, g, cfg.eps, cfg.kind, cfg.rho_a,
                                    cfg.rho_b, gv, lam_f, lam_g, need)
        grads = [d.to(t.dtype) if d is not None else None
                 for d, t in zip(grads, (x, y, cost, a, b))]
        return (*grads, None, None, None, None)


class UnrolledFunction(torch.autograd.Function):
    """(value, <C, P>, f, g, marginal error) after exactly ``n_iter`` iterations by a backend's
    fused unrolled pair, differentiable w.r.t. x, y, cost, a, b, f0, g0 (the error is not).
    Weights are differentiated in a, not log a: a zero-weight point gets its one-sided
    derivative (the torch loop's log cuts it)."""

    @staticmethod
    def forward(ctx, backend: str, x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b, n_iter,
                symmetric):
        ops = ops_for(backend)
        value, lin, f, g, err, tape = ops.unrolled_fwd(x, y, cost, a, b, f0, g0, eps, kind,
                                                       rho_a, rho_b, n_iter, symmetric)
        ctx.save_for_backward(x, y, cost, a, b, tape)
        ctx.cfg = (eps, kind, rho_a, rho_b, n_iter, symmetric)
        ctx.backend = backend
        ctx.mark_non_differentiable(err)
        ctx.set_materialize_grads(False)
        return value, lin, f, g, err

    @staticmethod
    @once_differentiable
    def backward(ctx, g_value, g_lin, g_f, g_g, _err):
        x, y, cost, a, b, tape = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        grads = ops_for(ctx.backend).unrolled_bwd(x, y, cost, a, b, tape, g_value, g_lin, g_f,
                                                  g_g, *ctx.cfg, list(need[:5]))
        return (None, *(t if w else None for t, w in zip(grads, need[:7])),
                None, None, None, None, None, None)
