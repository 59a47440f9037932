"""Sinkhorn differentiated through exactly ``n_iter`` iterations on the CPU, fused in C++
(csrc/cpu/sinkhorn_unrolled.cpp), registered on import:

    fdiv::sinkhorn_unrolled_fwd_cpu   the iterations, one problem per task, the cost in a
                                      per-thread scratch; returns the value, <C, P>, f, g, the
                                      marginal error and a tape of every iteration's potentials
                                      and LSEs: O(n_iter B (n + m)), never a plan
    fdiv::sinkhorn_unrolled_bwd_cpu   reverse mode through the tape: the Jacobian of one
                                      half-iteration is a row (column) softmax rebuilt from the
                                      saved LSEs

``UnrolledCpuFunction`` makes the pair differentiable; ``transport._solver.unrolled`` (a checkpointed
torch loop) is the statement of record and the path of every other device.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import fdiv_kernels._C  # noqa: F401  (defines torch.ops.fdiv.sinkhorn_unrolled_*_cpu)

_FWD = torch.ops.fdiv.sinkhorn_unrolled_fwd_cpu.default
_BWD = torch.ops.fdiv.sinkhorn_unrolled_bwd_cpu.default


def _ctype(x: Tensor | None, cost: Tensor | None) -> torch.dtype:
    ref = cost if cost is not None else x
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fdiv::sinkhorn_unrolled_fwd_cpu")
def _(x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b, n_iter, symmetric):
    B, n = (cost.shape[0], cost.shape[1]) if cost is not None else x.shape[:2]
    m = cost.shape[2] if cost is not None else y.shape[1]
    ref = cost if cost is not None else x
    opt = {"dtype": _ctype(x, cost), "device": ref.device}
    return (ref.new_empty(B, **opt), ref.new_empty(B, **opt), ref.new_empty(B, n, **opt),
            ref.new_empty(B, m, **opt), ref.new_empty(B, **opt),
            ref.new_empty(B, (2 * n_iter + 1) * (n + m), **opt))


@torch.library.register_fake("fdiv::sinkhorn_unrolled_bwd_cpu")
def _(x, y, cost, a, b, tape, g_value, g_lin, g_f, g_g, eps, kind, rho_a, rho_b, n_iter,
      symmetric, need):
    ct = _ctype(x, cost)
    B, n = (cost.shape[0], cost.shape[1]) if cost is not None else x.shape[:2]
    m = cost.shape[2] if cost is not None else y.shape[1]

    def like(t, want, dtype=None):  # unwanted: empty (and not aliasing another output)
        if t is None or not want:
            return tape.new_empty(0)
        return tape.new_empty(t.shape, dtype=dtype or t.dtype)

    return (like(x, need[0]), like(y, need[1]), like(cost, need[2]), like(a, need[3], ct),
            like(b, need[4], ct), tape.new_empty(B, n), tape.new_empty(B, m))


class UnrolledCpuFunction(torch.autograd.Function):
    """(value, <C, P>, f, g, marginal error) after exactly ``n_iter`` iterations, differentiable
    w.r.t. x, y, cost, a, b, f0, g0 (the error is not). Weights are differentiated in a, not
    log a: a zero-weight point gets its one-sided derivative (the torch loop's log cuts it)."""

    @staticmethod
    def forward(ctx, x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b, n_iter, symmetric):
        value, lin, f, g, err, tape = _FWD(x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b,
                                           n_iter, symmetric)
        ctx.save_for_backward(x, y, cost, a, b, tape)
        ctx.cfg = (eps, kind, rho_a, rho_b, n_iter, symmetric)
        ctx.mark_non_differentiable(err)
        ctx.set_materialize_grads(False)
        return value, lin, f, g, err

    @staticmethod
    @once_differentiable
    def backward(ctx, g_value, g_lin, g_f, g_g, _err):
        x, y, cost, a, b, tape = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _BWD(x, y, cost, a, b, tape, g_value, g_lin, g_f, g_g, *ctx.cfg, list(need[:5]))
        return (*(t if w else None for t, w in zip(grads, need[:7])),
                None, None, None, None, None, None)


def unrolled_cpu(x: Tensor | None, y: Tensor | None, cost: Tensor | None,
                 a: Tensor | None, b: Tensor | None, f0: Tensor | None,
                 g0: Tensor | None, eps: float, kind: int, rho_a: float, rho_b: float,
                 n_iter: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(value, <C, P>, f, g, marginal error) per problem, as ``transport._solver.unrolled`` followed
    by ``plan_totals`` and ``dual_value``; a, b None: uniform weights (no tensor built)."""
    return UnrolledCpuFunction.apply(x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b, n_iter,
                                     symmetric)
