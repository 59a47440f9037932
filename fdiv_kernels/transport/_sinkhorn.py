"""Batched entropic optimal transport: ``sinkhorn``, ``sinkhorn_divergence``, ``SinkhornResult``.

    r = fk.sinkhorn(cost=C, a=a, b=b, epsilon=0.05)                  # C: (B, n, m) or (n, m)
    r = fk.sinkhorn(x=x, y=y, cost_fn="sqeuclidean", epsilon=0.05)   # cost computed on the fly
    r.value, r.cost, r.f, r.g, r.n_iter, r.converged, r.marginal_error, r.plan()

Log-domain updates with a running max (see ``transport._solver`` for the conventions), solved by the
registered op ``fdiv::sinkhorn_fwd_<backend>`` chosen by the one dispatch; gradients from the
final potentials (envelope), through a fixed number of iterations (unrolled, checkpointed), or by
implicit differentiation of the fixed point (CG on the dual's Hessian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._dispatch import select
from fdiv_kernels.transport import _ops_torch  # noqa: F401  (the torch backend's record)
from fdiv_kernels.transport import _problem as problem
from fdiv_kernels.transport import _unrolled as unrolled
from fdiv_kernels.transport._autograd import SinkhornFunction
from fdiv_kernels.transport._costs import COST_KINDS, compute_dtype, max_finite_cost, pairwise_cost

COST_FNS = tuple(COST_KINDS)
GRADS = ("envelope", "unrolled", "implicit")


@dataclass
class SinkhornResult:
    """Per-problem outputs; shapes (B,), (B, n), (B, m), or without B for an unbatched call.

    value: the entropic OT value <C, P> + eps KL(P | a x b) (+ the reach terms), i.e. the dual at
    (f, g), differentiable (per ``grad``). cost: the transport cost <C, P>, differentiable only
    with grad="unrolled" (elsewhere it does not require grad: backward through it raises).
    f, g: the potentials, P = a b exp((f + g - C) / eps); differentiable
    with grad="unrolled" or "implicit". marginal_error: sum_i |(P 1)_i - target_i| (plus the
    column error with symmetric updates). converged: marginal_error <= tol. n_iter: the
    iterations each problem ran (int64).
    """

    value: Tensor
    cost: Tensor
    f: Tensor
    g: Tensor
    n_iter: Tensor
    converged: Tensor
    marginal_error: Tensor
    _ctx: dict

    def plan(self) -> Tensor:
        """The transport plan (B, n, m) (or (n, m)), materialized only on request."""
        c = self._ctx
        f = self.f if not c["unbatched"] else self.f[None]
        g = self.g if not c["unbatched"] else self.g[None]
        ctype = f.dtype
        if c["cost"] is not None:
            C = c["cost"].to(ctype)
        else:
            C = pairwise_cost(c["x"].to(ctype), c["y"].to(ctype), c["kind"])
        P = (c["a"][:, :, None] * c["b"][:, None, :]
             * torch.exp((f[:, :, None] + g[:, None, :] - C) / c["eps"]))
        return P[0] if c["unbatched"] else P


# ---------------------------------------------------------------------------------------------
# Public API


@V.full_precision
def sinkhorn(
    cost: Optional[Tensor] = None,
    x: Optional[Tensor] = None,
    y: Optional[Tensor] = None,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    epsilon: float = 0.05,
    cost_fn: Optional[str] = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    reach=None,
    scaling: Optional[float] = None,
    init: Optional[tuple[Tensor, Tensor]] = None,
    grad: str = "envelope",
    backend: str = "auto",
    *,
    symmetric: bool = False,
    check_every: Optional[int] = None,
) -> SinkhornResult:
    r"""Solve B entropic OT problems at once (B = 1 for an unbatched call).

    Give either a dense ``cost`` (B, n, m) / (n, m) (any float dtype; fp32 accumulation), or
    point clouds ``x`` (B, n, d), ``y`` (B, m, d) with ``cost_fn`` one of "sqeuclidean"
    (|x - y|^2, as ``ot.dist``; the default), "euclidean", "l1", "dot" (-<x, y>), "cosine"
    (1 - cos): then the cost is computed on the fly, never held beyond a (B, rows, m) chunk.
    ``a`` (B, n), ``b`` (B, m): non-negative weights, uniform by default; zero weights exclude
    points exactly.
    Balanced OT (reach=None) needs each to sum to 1; ``reach`` rho (a number, or a pair for
    (a, b), None on one side keeps it hard) relaxes the marginals by rho KL(P 1 | a).

    Stopping: every ``check_every`` iterations the L1 marginal error is computed on the device,
    and problems under ``tol`` stop updating; ``converged`` reports which made it within
    ``max_iter``. ``check_every=None``: every iteration where a backend solves whole problems
    in one kernel (the check is free there), every 10 where a check costs a host sync.
    ``scaling`` in (0, 1): eps-scaling from the largest cost down to ``epsilon`` (one iteration
    per level). ``init=(f, g)``: warm start. ``symmetric``: averaged updates.

    grad: "envelope" (value differentiable through the final potentials, w.r.t. cost, points
    and weights), "unrolled" (autograd through exactly ``max_iter`` iterations, checkpointed per
    iteration; no early stop), "implicit" (also f and g, by implicit differentiation).
    """
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if cost is not None and cost_fn is not None:
        raise ValueError(f"cost_fn={cost_fn!r} applies to points x, y only: give a dense cost or "
                         "points with a cost_fn, not both")
    cost_fn = "sqeuclidean" if cost_fn is None else cost_fn
    if cost_fn not in COST_KINDS:
        raise ValueError(f"cost_fn must be one of {COST_FNS}, got {cost_fn!r}")
    eps = V.check_real("epsilon", epsilon, positive=True)
    max_iter = problem.integer("max_iter", max_iter, 1 if grad != "unrolled" else 0)
    # 0: the backend's choice (every iteration in a whole-solve kernel, else every 10).
    check_every = 0 if check_every is None else problem.integer("check_every", check_every, 1)
    tol = V.check_real("tol", tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if scaling is not None:
        scaling = V.check_real("scaling", scaling)
        if not 0 < scaling < 1:
            raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    rho_a, rho_b = problem.reach_pair(reach)
    kind = COST_KINDS[cost_fn]

    if cost is not None:
        if x is not None or y is not None:
            raise ValueError("give either cost or the points x and y, not both")
        if not isinstance(cost, Tensor):
            raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
        if not cost.is_floating_point():
            raise TypeError(f"cost must be floating point, got dtype {cost.dtype}")
        if cost.dim() not in (2, 3) or cost.numel() == 0:
            raise ValueError(f"cost must have shape (B, n, m) or (n, m), got {tuple(cost.shape)}")
        unbatched = cost.dim() == 2
        cost = cost[None] if unbatched else cost
        B, n, m = cost.shape
        ref = cost
    else:
        if x is None or y is None:
            raise ValueError("give a dense cost, or both point clouds x and y")
        x, y = problem.points("x", x), problem.points("y", y)
        if x.dim() != y.dim():
            raise ValueError(f"x and y must both be batched or both unbatched, got shapes "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        unbatched = x.dim() == 2
        x, y = (x[None], y[None]) if unbatched else (x, y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and "
                             f"{y.shape[0]}")
        if x.shape[2] != y.shape[2]:
            raise ValueError(f"x and y must have the same point dimension, got {x.shape[2]} "
                             f"and {y.shape[2]}")
        if x.device != y.device:
            raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}")
        B, n, m = x.shape[0], x.shape[1], y.shape[1]
        ref = x
    ctype = compute_dtype(ref.dtype)
    a = problem.weights("a", a, B, n, unbatched, ctype, ref.device, rho_a <= 0)
    b = problem.weights("b", b, B, m, unbatched, ctype, ref.device, rho_b <= 0)
    f0 = g0 = None
    if init is not None:
        if not isinstance(init, (tuple, list)) or len(init) != 2:
            raise TypeError("init must be a pair (f, g) of potentials")
        f0 = problem.potential("init[0] (f)", init[0], B, n, unbatched, ref.device).to(ctype)
        g0 = problem.potential("init[1] (g)", init[1], B, m, unbatched, ref.device).to(ctype)

    a, b = a.to(ctype), b.to(ctype)
    ctx = dict(unbatched=unbatched, cost=cost, x=x, y=y, kind=kind, eps=eps, a=a, b=b)
    name = select(backend, ref, "sinkhorn_fwd")
    if grad == "unrolled":
        res = unrolled.solve(name, x, y, cost, a, b, eps, kind, rho_a, rho_b, max_iter, tol, f0,
                             g0, symmetric)
    else:
        eps0 = max_finite_cost(x, y, cost, kind, ctype) if scaling is not None else None
        cfg = problem.Config(eps, kind, rho_a, rho_b, max_iter, tol, check_every, scaling or 0.0,
                       symmetric, grad, name)
        value, f, g, lin, n_iter, err = SinkhornFunction.apply(x, y, cost, a, b, f0, g0, eps0,
                                                               cfg)
        res = (value, lin, f, g, n_iter, err <= tol, err)
    value, lin, f, g, n_iter, conv, err = res
    if unbatched:
        value, lin, f, g, n_iter, conv, err = (t[0] for t in res)
    return SinkhornResult(value, lin, f, g, n_iter, conv, err, ctx)


def _second(t: Optional[Tensor]) -> Optional[Tensor]:
    """t for its second use as an input of one solve: under torch.compile a copy (dynamo does not
    trace an autograd.Function given one tensor twice); eagerly t itself (no copy, same bits)."""
    return t.clone() if t is not None and torch.compiler.is_compiling() else t


@V.full_precision
def sinkhorn_divergence(
    x: Tensor,
    y: Tensor,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    epsilon: float = 0.05,
    debias: bool = True,
    reach=None,
    cost_fn: str = "sqeuclidean",
    **kwargs,
) -> Tensor:
    r"""Debiased Sinkhorn divergence per problem, (B,) (a scalar for unbatched points):

        S = OT(a, b) - (OT(a, a) + OT(b, b)) / 2 [+ eps (m(a) - m(b))^2 / 2 when unbalanced],

    with OT the entropic value (``sinkhorn(...).value``); 0 when x = y and a = b. All three
    terms use symmetric (averaged) updates unless ``symmetric=False`` is given.
    ``debias=False`` gives OT(a, b). Other keywords go to ``sinkhorn``.

    Args:
        x, y: points (B, n, d) and (B, m, d) (or without B).
        a, b: positive weights (B, n), (B, m); None is uniform (mass 1).
        epsilon: the entropic regularization, > 0.
        debias: subtract the two self terms (False: OT(a, b)).
        reach: None (balanced) or the KL-relaxation radius of unbalanced marginals.
        cost_fn: the ground cost between points, as in :func:`sinkhorn` ("sqeuclidean", ...).
    """
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a bool, got {type(debias).__name__}")
    kw = dict(epsilon=epsilon, reach=reach, cost_fn=cost_fn, **kwargs)
    if not debias:
        return sinkhorn(x=x, y=y, a=a, b=b, **kw).value
    # Symmetric updates for all three terms: the same iteration on x = y gives S = 0 exactly.
    kw.setdefault("symmetric", True)
    xy = sinkhorn(x=x, y=y, a=a, b=b, **kw)
    xx = sinkhorn(x=x, y=_second(x), a=a, b=_second(a), **kw)
    yy = sinkhorn(x=y, y=_second(y), a=b, b=_second(b), **kw)
    s = xy.value - 0.5 * (xx.value + yy.value)
    if reach is not None:
        ma, mb = xy._ctx["a"].sum(-1), xy._ctx["b"].sum(-1)
        d = 0.5 * epsilon * (ma - mb) ** 2
        s = s + (d[0] if xy._ctx["unbatched"] else d)
    return s
