"""The Sinkhorn ops of the triton backend, registered on import (imports Triton):

    fdiv::sinkhorn_lse_triton   the batched row/column LSE update, cost on the fly
    fdiv::sinkhorn_fwd_triton   the solve: whole problems in one launch, one program each
                                (``triton_kernels/sinkhorn_solve.py``) where ``whole_solve``
                                says so, else the loop of ``transport._solver`` around the LSE op

``custom_op`` (not ``triton_op``) so fake-tensor tracing also works under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from fdiv_kernels.transport import _ops_torch  # noqa: F401  (fdiv::sinkhorn_grads_torch)
from fdiv_kernels.transport import _registry as registry
from fdiv_kernels.triton_kernels.sinkhorn_lse import sinkhorn_lse
from fdiv_kernels.triton_kernels.sinkhorn_solve import sinkhorn_solve

# The whole-solve rule. One program per problem runs a problem on one SM; the per-update loop
# spreads it over row tiles but pays, every iteration, two launches and a few torch ops (tens of
# microseconds) and a host sync per check. A problem of one 64 x 64 tile does an iteration in a
# few microseconds in one program: always whole-solve. Up to 256 per side (16 tiles, its vectors
# a few KiB) a program still does an iteration in about the loop's launch overhead, so it wins
# once the batch keeps SMs busy: B >= 16. Beyond, the loop's parallelism within a problem wins.
# (Thresholds reasoned, not yet measured on a GPU.)
WHOLE_SOLVE_MAX_SIDE = 256
WHOLE_SOLVE_MIN_BATCH = 16
WHOLE_SOLVE_TINY = 64 * 64
# None: choose by ``whole_solve``; True / False: force the whole-solve / per-update path (tests).
FORCE_WHOLE_SOLVE: bool | None = None


def whole_solve(B: int, n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``sinkhorn_fwd_triton`` solves whole problems per program for this batch.
    Never for float64: the kernel computes in fp32; the loop keeps fp64 potentials."""
    if dtype == torch.float64:
        return False
    if FORCE_WHOLE_SOLVE is not None:
        return FORCE_WHOLE_SOLVE
    if n * m <= WHOLE_SOLVE_TINY:
        return True
    return max(n, m) <= WHOLE_SOLVE_MAX_SIDE and B >= WHOLE_SOLVE_MIN_BATCH


def _on(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("fdiv::sinkhorn_lse_triton", mutates_args=())
def sinkhorn_lse_triton(
    x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], h: Tensor,
    eps_inv: Tensor, kind: int, transpose: bool, active: Optional[Tensor],
) -> Tensor:
    with _on(h):
        return sinkhorn_lse(x, y, cost, h, eps_inv, kind, transpose, active)


def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
    with _on(h):
        return sinkhorn_lse(x, y, cost, h, eps_inv, kind, transpose, active)


def _solve(x, y, cost, log_a, log_b, f0, g0, eps_levels, eps, kind, rho_a, rho_b, max_iter, tol,
           check_every, symmetric):
    B, n = log_a.shape
    if not whole_solve(B, n, log_b.shape[1], log_a.dtype):
        return None
    with _on(log_a):
        return sinkhorn_solve(x, y, cost, log_a, log_b, f0, g0, eps_levels, eps, kind, rho_a,
                              rho_b, max_iter, tol, check_every, symmetric)


# The value's gradients: the torch backend's op (chunked torch, on the tensors' device).
_fwd = registry.register_fwd("triton", _lse, solve=_solve)
registry.register(registry.SinkhornOps("triton", forward=_fwd,
                                       grads=torch.ops.fdiv.sinkhorn_grads_torch))
registry.register_fakes({"sinkhorn_fwd": _fwd, "sinkhorn_lse": sinkhorn_lse_triton})
