"""The Sinkhorn ops of the cpu backend (C++, fdiv_kernels._C built with csrc/cpu/sinkhorn_*.cpp),
registered on import, and its capability record:

    fdiv::sinkhorn_lse_cpu         the batched row/column LSE update (cost on the fly or dense)
    fdiv::sinkhorn_solve_cpu       whole problems, one per task, the cost in a per-thread scratch
    fdiv::sinkhorn_fwd_cpu         the solve: ``sinkhorn_solve_cpu`` where a problem fits the
                                   scratch (``whole_solve``), else the loop of ``_solver`` around
                                   ``sinkhorn_lse_cpu``
    fdiv::sinkhorn_totals_cpu      (sum P, <C, P>) per problem
    fdiv::sinkhorn_grads_cpu       the value's gradients (envelope + implicit terms)
    fdiv::sinkhorn_plan_apply_cpu  P v, P^T v, P 1, P^T 1 for the implicit gradient's CG
                                   (the three apply the plan a row block at a time, never store it)
    fdiv::sinkhorn_unrolled_{fwd,bwd}_cpu  grad="unrolled" in one call each way: the iterations
                                   with a tape of their potentials and LSEs, and its reverse
"""

from __future__ import annotations

import torch

import fdiv_kernels._C  # noqa: F401  (defines torch.ops.fdiv.sinkhorn_*_cpu)
from fdiv_kernels.transport import _registry as registry

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


def _solve(x, y, cost, log_a, log_b, f0, g0, eps_levels, eps, kind, rho_a, rho_b, max_iter, tol,
           check_every, symmetric):
    B, n = log_a.shape
    if not whole_solve(B, n, log_b.shape[1], log_a.dtype):
        return None
    return torch.ops.fdiv.sinkhorn_solve_cpu(x, y, cost, log_a, log_b, f0, g0, eps_levels, eps,
                                             kind, rho_a, rho_b, max_iter, tol, check_every,
                                             symmetric)


def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
    return torch.ops.fdiv.sinkhorn_lse_cpu(x, y, cost, h, eps_inv, kind, transpose, active)


fdiv = torch.ops.fdiv
_fwd = registry.register_fwd("cpu", _lse, solve=_solve)
registry.register(registry.SinkhornOps(
    "cpu",
    forward=_fwd,
    totals=fdiv.sinkhorn_totals_cpu,
    grads=fdiv.sinkhorn_grads_cpu,
    plan_apply=fdiv.sinkhorn_plan_apply_cpu,
    unrolled_fwd=fdiv.sinkhorn_unrolled_fwd_cpu.default,
    unrolled_bwd=fdiv.sinkhorn_unrolled_bwd_cpu.default,
))
registry.register_fakes({
    "sinkhorn_fwd": _fwd, "sinkhorn_lse": fdiv.sinkhorn_lse_cpu,
    "sinkhorn_solve": fdiv.sinkhorn_solve_cpu, "sinkhorn_totals": fdiv.sinkhorn_totals_cpu,
    "sinkhorn_grads": fdiv.sinkhorn_grads_cpu, "sinkhorn_plan_apply": fdiv.sinkhorn_plan_apply_cpu,
    "sinkhorn_unrolled_fwd": fdiv.sinkhorn_unrolled_fwd_cpu,
    "sinkhorn_unrolled_bwd": fdiv.sinkhorn_unrolled_bwd_cpu,
})
