"""The Sinkhorn ops of the cpu backend, registered on import (needs fdiv_kernels._C built with
csrc/cpu/sinkhorn*.cpp):

    fdiv::sinkhorn_lse_cpu     the batched row/column LSE update (C++, cost on the fly or dense)
    fdiv::sinkhorn_solve_cpu   whole problems, one per task, the cost in a per-thread scratch
                               (C++, csrc/cpu/sinkhorn_solve.cpp)
    fdiv::sinkhorn_totals_cpu      (sum P, <C, P>) per problem
    fdiv::sinkhorn_grads_cpu       the value's gradients (envelope + implicit terms)
    fdiv::sinkhorn_plan_apply_cpu  P v, P^T v, P 1, P^T 1 for the implicit gradient's CG
                                   (all three apply the plan problem by problem, never store it)
    fdiv::sinkhorn_fwd_cpu     the solve: ``sinkhorn_solve_cpu`` where a problem fits the
                               scratch (``whole_solve``), else the loop of ``transport._solver`` around
                               ``sinkhorn_lse_cpu``
"""

from __future__ import annotations

import types

import torch

import fdiv_kernels._C  # noqa: F401  (defines torch.ops.fdiv.sinkhorn_*_cpu)
from fdiv_kernels.transport._ops_torch import register_fwd, register_lse_fake

# Per-thread scratch of the whole-solve path: C and C^T of one problem. 8 MiB keeps them within
# reach of a core's L2/L3 (n = m = 1024 in fp32); beyond it the per-update op streams the cost.
SOLVE_SCRATCH_BYTES = 8 << 20
# Below this many cost entries per problem, one thread per problem beats splitting each update
# across threads even when there are fewer problems than threads (the loop's per-update op calls
# cost more than the update itself).
SMALL_PROBLEM = 256 * 256
# None: choose by size; True / False: force the whole-solve / per-update path (for tests).
FORCE_WHOLE_SOLVE: bool | None = None


def whole_solve(B: int, n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``sinkhorn_fwd_cpu`` solves whole problems per task for this batch."""
    if FORCE_WHOLE_SOLVE is not None:
        return FORCE_WHOLE_SOLVE
    elt = 8 if dtype == torch.float64 else 4
    fits = 2 * n * m * elt <= SOLVE_SCRATCH_BYTES
    return fits and (B >= torch.get_num_threads() or n * m <= SMALL_PROBLEM)


def _solve(x, y, cost, log_a, log_b, f0, g0, eps0, eps, kind, rho_a, rho_b, max_iter, tol,
           check_every, scaling, symmetric):
    B, n = log_a.shape
    if not whole_solve(B, n, log_b.shape[1], log_a.dtype):
        return None
    return torch.ops.fdiv.sinkhorn_solve_cpu(x, y, cost, log_a, log_b, f0, g0, eps0, eps, kind,
                                             rho_a, rho_b, max_iter, tol, check_every, scaling,
                                             symmetric)


if hasattr(torch.ops.fdiv, "sinkhorn_lse_cpu") and not hasattr(torch.ops.fdiv, "sinkhorn_fwd_cpu"):
    # register_lse_fake wants an object with .register_fake (a custom_op): the C++ op's stands in.
    register_lse_fake(types.SimpleNamespace(
        register_fake=torch.library.register_fake("fdiv::sinkhorn_lse_cpu")))

    def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
        return torch.ops.fdiv.sinkhorn_lse_cpu(x, y, cost, h, eps_inv, kind, transpose, active)

    register_fwd("cpu", _lse, solve=_solve)

    @torch.library.register_fake("fdiv::sinkhorn_totals_cpu")
    def _(x, y, cost, a, b, f, g, eps, kind):
        return f.new_empty(f.shape[0]), f.new_empty(f.shape[0])

    @torch.library.register_fake("fdiv::sinkhorn_solve_cpu")
    def _(x, y, cost, log_a, log_b, f0, g0, eps0, eps, kind, rho_a, rho_b, max_iter, tol,
          check_every, scaling, symmetric):
        B = log_a.shape[0]
        return (torch.empty_like(log_a), torch.empty_like(log_b),
                log_a.new_empty(B, dtype=torch.int32), log_a.new_empty(B))

    @torch.library.register_fake("fdiv::sinkhorn_grads_cpu")
    def _(x, y, cost, a, b, f, g, g_value, lam_f, lam_g, eps, kind, rho_a, rho_b, need):
        def out(t, w):
            return f.new_empty(t.shape) if w and t is not None else f.new_empty(0)
        return (out(x if cost is None else None, need[0]),
                out(y if cost is None else None, need[1]), out(cost, need[2]),
                out(a, need[3]), out(b, need[4]))

    @torch.library.register_fake("fdiv::sinkhorn_plan_apply_cpu")
    def _(x, y, cost, a, b, f, g, eps, kind, vf, vg):
        return (torch.empty_like(f), torch.empty_like(g), torch.empty_like(f),
                torch.empty_like(g))
