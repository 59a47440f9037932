"""What each backend offers for Sinkhorn, declared in one record it fills, and the fakes of every
``fdiv::sinkhorn_*`` op, registered in one loop.

A backend's ops module (``_ops_torch``, ``_ops_cpu``, ``_ops_triton``) registers its ops and calls
``register(SinkhornOps(...))``; the autograd functions and the public module read the record
(``ops_for(backend)``), never probe ``torch.ops.fdiv`` for what a backend may lack. A capability
left None falls back to the chunked torch statement of record (``_dual``, ``_unrolled``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from fdiv_kernels.core import _dispatch
from fdiv_kernels.core._ops import qualname
from fdiv_kernels.transport import _solver as solver


@dataclass(frozen=True)
class SinkhornOps:
    """One backend's Sinkhorn ops. ``forward`` is required; the rest are optional.

    forward:     fdiv::sinkhorn_fwd_<b>(x, y, cost, log_a, log_b, f0, g0, eps0, eps, kind, rho_a,
                 rho_b, max_iter, tol, check_every, scaling, symmetric) -> (f, g, n_iter, err)
    totals:      (x, y, cost, a, b, f, g, eps, kind) -> (sum P, <C, P>)        (else _dual)
    grads:       the value's gradients at fixed potentials (signature of sinkhorn_grads_cpu)
    plan_apply:  (x, y, cost, a, b, f, g, eps, kind, vf, vg) -> (P vg, P^T vf, P 1, P^T 1)
    unrolled_fwd, unrolled_bwd: the fused unrolled pair (signatures of sinkhorn_unrolled_*_cpu),
                 both or neither (else the checkpointed torch loop of ``_unrolled``)
    """

    name: str
    forward: Callable
    totals: Optional[Callable] = None
    grads: Optional[Callable] = None
    plan_apply: Optional[Callable] = None
    unrolled_fwd: Optional[Callable] = None
    unrolled_bwd: Optional[Callable] = None

    def __post_init__(self) -> None:
        if (self.unrolled_fwd is None) != (self.unrolled_bwd is None):
            raise ValueError("unrolled_fwd and unrolled_bwd come as a pair")

    def provides(self, op: str) -> bool:
        """The dispatch's question: the family's entry point is the forward solve."""
        return op == "sinkhorn_fwd"

    def reasons(self, op: str, base: int, plain: bool) -> list[str]:
        return []  # the optional pieces fall back to the torch statements, never a refusal


_OPS: dict[str, SinkhornOps] = {}


def register(ops: SinkhornOps) -> None:
    _OPS[ops.name] = ops
    _dispatch.register(ops)


def ops_for(backend: str) -> SinkhornOps:
    """The record of ``backend`` (one the dispatch selected for ``sinkhorn_fwd``)."""
    return _OPS[backend]


def register_fwd(backend: str, lse_op: Callable, solve: Optional[Callable] = None) -> Callable:
    """Register ``fdiv::sinkhorn_fwd_<backend>``: the solve loop of ``_solver`` around ``lse_op``,
    or ``solve`` (same arguments as the op, the eps-scaling levels in place of eps0 and scaling)
    where a backend solves whole problems itself and returns None for those it leaves to the
    loop. The eps-scaling schedule is computed here, once, for whichever path runs."""

    @torch.library.custom_op(f"fdiv::sinkhorn_fwd_{backend}", mutates_args=())
    def fwd(
        x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], log_a: Tensor,
        log_b: Tensor, f0: Optional[Tensor], g0: Optional[Tensor], eps0: Optional[Tensor],
        eps: float, kind: int, rho_a: float, rho_b: float, max_iter: int, tol: float,
        check_every: int, scaling: float, symmetric: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        levels = solver.eps_schedule(eps0, eps, scaling, log_a.dtype)
        # check_every 0 (auto): every iteration where the check is free (a whole-solve kernel
        # has the row LSE at hand), every solver.CHECK_EVERY where it costs a host sync.
        if solve is not None:
            out = solve(x, y, cost, log_a, log_b, f0, g0, levels, eps, kind, rho_a, rho_b,
                        max_iter, tol, check_every or 1, symmetric)
            if out is not None:
                return out
        return solver.solve(lse_op, x, y, cost, log_a, log_b, eps, kind, rho_a, rho_b, max_iter,
                            tol, check_every or solver.CHECK_EVERY, f0, g0, levels, symmetric)

    return fwd


# ---------------------------------------------------------------------------------------------
# Fakes (shape functions for torch.compile and opcheck), one per op family.


def _n_m(x, y, cost):
    return (cost.shape[1], cost.shape[2]) if cost is not None else (x.shape[1], y.shape[1])


def _fake_lse(x, y, cost, h, eps_inv, kind, transpose, active):
    n = (cost.shape[2] if transpose else cost.shape[1]) if cost is not None else x.shape[1]
    return h.new_empty(h.shape[0], n)


def _fake_solve(x, y, cost, log_a, log_b, f0, g0, eps_levels, *args):
    # fdiv::sinkhorn_fwd_<b> and fdiv::sinkhorn_solve_cpu: (f, g, n_iter, err)
    B = log_a.shape[0]
    return (torch.empty_like(log_a), torch.empty_like(log_b),
            log_a.new_empty(B, dtype=torch.int32), log_a.new_empty(B))


def _fake_totals(x, y, cost, a, b, f, g, eps, kind):
    return f.new_empty(f.shape[0]), f.new_empty(f.shape[0])


def _fake_grads(x, y, cost, a, b, f, g, g_value, lam_f, lam_g, eps, kind, rho_a, rho_b, need):
    def out(t, w):
        return f.new_empty(t.shape) if w and t is not None else f.new_empty(0)
    return (out(x if cost is None else None, need[0]),
            out(y if cost is None else None, need[1]), out(cost, need[2]),
            out(a, need[3]), out(b, need[4]))


def _fake_plan_apply(x, y, cost, a, b, f, g, eps, kind, vf, vg):
    return (torch.empty_like(f), torch.empty_like(g), torch.empty_like(f), torch.empty_like(g))


def _unrolled_ctype(x, cost):
    ref = cost if cost is not None else x
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def _fake_unrolled_fwd(x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b, n_iter, symmetric):
    B = (cost if cost is not None else x).shape[0]
    n, m = _n_m(x, y, cost)
    ref = cost if cost is not None else x
    opt = {"dtype": _unrolled_ctype(x, cost), "device": ref.device}
    return (ref.new_empty(B, **opt), ref.new_empty(B, **opt), ref.new_empty(B, n, **opt),
            ref.new_empty(B, m, **opt), ref.new_empty(B, **opt),
            ref.new_empty(B, (2 * n_iter + 1) * (n + m), **opt))


def _fake_unrolled_bwd(x, y, cost, a, b, tape, g_value, g_lin, g_f, g_g, eps, kind, rho_a, rho_b,
                       n_iter, symmetric, need):
    ct = _unrolled_ctype(x, cost)
    B = (cost if cost is not None else x).shape[0]
    n, m = _n_m(x, y, cost)

    def like(t, want, dtype=None):  # unwanted: empty (and not aliasing another output)
        if t is None or not want:
            return tape.new_empty(0)
        return tape.new_empty(t.shape, dtype=dtype or t.dtype)

    return (like(x, need[0]), like(y, need[1]), like(cost, need[2]), like(a, need[3], ct),
            like(b, need[4], ct), tape.new_empty(B, n), tape.new_empty(B, m))


FAKES = {
    "sinkhorn_lse": _fake_lse,
    "sinkhorn_fwd": _fake_solve,
    "sinkhorn_solve": _fake_solve,
    "sinkhorn_totals": _fake_totals,
    "sinkhorn_grads": _fake_grads,
    "sinkhorn_plan_apply": _fake_plan_apply,
    "sinkhorn_unrolled_fwd": _fake_unrolled_fwd,
    "sinkhorn_unrolled_bwd": _fake_unrolled_bwd,
}
_FAKED: set[str] = set()


def register_fakes(ops: dict[str, Callable]) -> None:
    """The fake of each given op, keyed like ``FAKES`` (``{"sinkhorn_lse": torch.ops.fdiv.
    sinkhorn_lse_cpu, ...}``), once each."""
    for key, op in ops.items():
        name = qualname(op)
        if name not in _FAKED:
            torch.library.register_fake(name)(FAKES[key])
            _FAKED.add(name)
