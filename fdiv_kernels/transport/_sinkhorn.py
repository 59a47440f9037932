"""Batched entropic optimal transport: ``sinkhorn``, ``sinkhorn_divergence``, the SinKD loss.

    r = fk.sinkhorn(cost=C, a=a, b=b, epsilon=0.05)                  # C: (B, n, m) or (n, m)
    r = fk.sinkhorn(x=x, y=y, cost_fn="sqeuclidean", epsilon=0.05)   # cost computed on the fly
    r.value, r.cost, r.f, r.g, r.n_iter, r.converged, r.marginal_error, r.plan()

Log-domain updates with a running max (see ``transport._solver`` for the conventions), solved by the
registered op ``fdiv::sinkhorn_fwd_<backend>`` chosen by the one dispatch; gradients from the
final potentials (envelope), through a fixed number of iterations (unrolled, checkpointed), or by
implicit differentiation of the fixed point (CG on the dual's Hessian).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from fdiv_kernels import _validation as V
from fdiv_kernels.transport import _solver as core
from fdiv_kernels.transport import _ops_torch as _sinkhorn_torch  # noqa: F401  (registers the ops)
from fdiv_kernels.dispatch import load_error, select

COST_FNS = tuple(core.COST_KINDS)
GRADS = ("envelope", "unrolled", "implicit")
CG_ITER = 30


@dataclass
class SinkhornResult:
    """Per-problem outputs; shapes (B,), (B, n), (B, m), or without B for an unbatched call.

    value: the entropic OT value <C, P> + eps KL(P | a x b) (+ the reach terms), i.e. the dual at
    (f, g), differentiable (per ``grad``). cost: the transport cost <C, P> (differentiable only
    with grad="unrolled"). f, g: the potentials, P = a b exp((f + g - C) / eps); differentiable
    with grad="unrolled" or "implicit". marginal_error: sum_i |(P 1)_i - target_i| (plus the
    column error with symmetric updates). converged: marginal_error <= tol.
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
            C = core.pairwise_cost(c["x"].to(ctype), c["y"].to(ctype), c["kind"])
        P = (c["a"][:, :, None] * c["b"][:, None, :]
             * torch.exp((f[:, :, None] + g[:, None, :] - C) / c["eps"]))
        return P[0] if c["unbatched"] else P


@dataclass(frozen=True)
class _Config:
    eps: float
    kind: int
    rho_a: float
    rho_b: float
    max_iter: int
    tol: float
    check_every: int
    scaling: float
    symmetric: bool
    grad: str
    backend: str


# ---------------------------------------------------------------------------------------------
# Validation


def _points(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (B, n, d) or (n, d), got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def _weights(name: str, w: object, B: int, n: int, unbatched: bool, ctype, device,
             balanced: bool) -> Tensor:
    if w is None:
        return torch.full((B, n), 1.0 / n, dtype=ctype, device=device)
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {w.dtype}")
    want = (n,) if unbatched else (B, n)
    if tuple(w.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} must be on {device}, got {w.device}")
    w2 = w.reshape(B, n)
    if not torch.compiler.is_compiling():
        # One host sync buys a clear error.
        if bool((~torch.isfinite(w2)).any()) or bool((w2 < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative")
        sums = w2.detach().to(torch.float64).sum(-1)
        if bool((sums <= 0).any()):
            raise ValueError(f"{name} must have a positive total mass in every problem")
        if balanced and bool(((sums - 1).abs() > 1e-4).any()):
            bad = float(sums[((sums - 1).abs() > 1e-4)][0])
            raise ValueError(
                f"{name} must sum to 1 in every problem for balanced OT (reach=None), got a sum "
                f"of {bad:.6g}; normalize it or pass reach for unbalanced OT"
            )
    return w2


def _reach(reach: object) -> tuple[float, float]:
    """reach -> (rho_a, rho_b), 0 meaning a hard (balanced) marginal."""
    if reach is None:
        return 0.0, 0.0
    if isinstance(reach, (tuple, list)):
        if len(reach) != 2:
            raise ValueError(f"reach must be a number or a pair, got {len(reach)} values")
        return tuple(0.0 if r is None else V.check_real("reach", r, positive=True)
                     for r in reach)  # type: ignore[return-value]
    r = V.check_real("reach", reach, positive=True)
    return r, r


def _int(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _pot(name: str, t: object, B: int, n: int, unbatched: bool, device) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point torch.Tensor")
    want = (n,) if unbatched else (B, n)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t.reshape(B, n).detach()


def _log(w: Tensor) -> Tensor:
    return torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, float("-inf")))


def _max_cost(x, y, cost, kind, ctype) -> Tensor:
    """Per-problem largest cost entry: the start of the eps-scaling schedule."""
    with torch.no_grad():
        if cost is not None:
            return cost.to(ctype).abs().amax((1, 2))
        B, n = x.shape[:2]
        out = torch.zeros(B, dtype=ctype, device=x.device)
        for rows in core.row_chunks(n, B * y.shape[1]):
            out = torch.maximum(out, core.cost_rows(x, y, None, rows, kind, ctype).abs().amax((1, 2)))
        return out


# ---------------------------------------------------------------------------------------------
# Autograd


class _SinkhornFunction(torch.autograd.Function):
    """Envelope / implicit gradients of (value, f, g) w.r.t. (x, y, cost, a, b)."""

    @staticmethod
    def forward(ctx, x, y, cost, a, b, f0, g0, eps0, cfg: _Config):
        op = getattr(torch.ops.fdiv, f"sinkhorn_fwd_{cfg.backend}")
        f, g, n_iter, err = op(x, y, cost, _log(a), _log(b), f0, g0, eps0, cfg.eps, cfg.kind,
                               cfg.rho_a, cfg.rho_b, cfg.max_iter, cfg.tol, cfg.check_every,
                               cfg.scaling, cfg.symmetric)
        # A backend may compute the plan's totals itself (fdiv::sinkhorn_totals_<backend>).
        totals = getattr(torch.ops.fdiv, f"sinkhorn_totals_{cfg.backend}", None)
        if totals is not None:
            total, lin = totals(x, y, cost, a, b, f, g, cfg.eps, cfg.kind)
        else:
            total, lin = core.plan_totals(x, y, cost, a, b, f, g, cfg.eps, cfg.kind)
        value = core.dual_value(a, b, f, g, total, cfg.eps, cfg.rho_a, cfg.rho_b)
        ctx.save_for_backward(x, y, cost, a, b, f, g)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lin, n_iter, err)
        if cfg.grad == "envelope":
            ctx.mark_non_differentiable(f, g)
        return value, f, g, lin, n_iter, err

    @staticmethod
    def backward(ctx, g_value, g_f, g_g, _lin, _n, _err):
        x, y, cost, a, b, f, g = ctx.saved_tensors
        cfg = ctx.cfg
        lam_f = lam_g = None
        if cfg.grad == "implicit" and (g_f is not None or g_g is not None):
            uf = torch.zeros_like(f) if g_f is None else g_f.to(f.dtype)
            ug = torch.zeros_like(g) if g_g is None else g_g.to(g.dtype)
            with torch.no_grad():
                apply = getattr(torch.ops.fdiv, f"sinkhorn_plan_apply_{cfg.backend}", None)
                lam_f, lam_g = core.implicit_adjoint(
                    x, y, cost, a, b, f, g, cfg.eps, cfg.kind, cfg.rho_a, cfg.rho_b, uf, ug,
                    cg_iter=CG_ITER, plan_apply=apply)
        gv = torch.zeros_like(f[:, 0]) if g_value is None else g_value
        need = tuple(ctx.needs_input_grad[:5])
        # A backend may apply the plan itself (fdiv::sinkhorn_grads_<backend>).
        grads_op = getattr(torch.ops.fdiv, f"sinkhorn_grads_{cfg.backend}", None)
        if grads_op is not None:
            out = grads_op(x, y, cost, a, b, f, g, gv, lam_f, lam_g, cfg.eps, cfg.kind,
                           cfg.rho_a, cfg.rho_b, list(need))
            grads = [d if w and t is not None else None
                     for d, w, t in zip(out, need, (x, y, cost, a, b))]
        else:
            grads = core.dual_grads(x, y, cost, a, b, f, g, cfg.eps, cfg.kind, cfg.rho_a,
                                    cfg.rho_b, gv, lam_f, lam_g, need)
        grads = [d.to(t.dtype) if d is not None else None
                 for d, t in zip(grads, (x, y, cost, a, b))]
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public API


def sinkhorn(
    cost: Optional[Tensor] = None,
    x: Optional[Tensor] = None,
    y: Optional[Tensor] = None,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    epsilon: float = 0.05,
    cost_fn: str = "sqeuclidean",
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
    (|x - y|^2, as ``ot.dist``), "euclidean", "l1", "dot" (-<x, y>), "cosine" (1 - cos): then the
    cost is computed on the fly, never held beyond a (B, rows, m) chunk. ``a`` (B, n), ``b``
    (B, m): non-negative weights, uniform by default; zero weights exclude points exactly.
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
    if cost_fn not in core.COST_KINDS:
        raise ValueError(f"cost_fn must be one of {COST_FNS}, got {cost_fn!r}")
    eps = V.check_real("epsilon", epsilon, positive=True)
    max_iter = _int("max_iter", max_iter, 1 if grad != "unrolled" else 0)
    # 0: the backend's choice (every iteration in a whole-solve kernel, else every 10).
    check_every = 0 if check_every is None else _int("check_every", check_every, 1)
    tol = V.check_real("tol", tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if scaling is not None:
        scaling = V.check_real("scaling", scaling)
        if not 0 < scaling < 1:
            raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    rho_a, rho_b = _reach(reach)
    kind = core.COST_KINDS[cost_fn]

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
        x, y = _points("x", x), _points("y", y)
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
    ctype = core.compute_dtype(ref.dtype)
    a = _weights("a", a, B, n, unbatched, ctype, ref.device, rho_a <= 0)
    b = _weights("b", b, B, m, unbatched, ctype, ref.device, rho_b <= 0)
    f0 = g0 = None
    if init is not None:
        if not isinstance(init, (tuple, list)) or len(init) != 2:
            raise TypeError("init must be a pair (f, g) of potentials")
        f0 = _pot("init[0] (f)", init[0], B, n, unbatched, ref.device).to(ctype)
        g0 = _pot("init[1] (g)", init[1], B, m, unbatched, ref.device).to(ctype)

    ctx = dict(unbatched=unbatched, cost=cost, x=x, y=y, kind=kind, eps=eps,
               a=a.to(ctype), b=b.to(ctype))
    if grad == "unrolled":
        res = _unrolled(x, y, cost, a.to(ctype), b.to(ctype), eps, kind, rho_a, rho_b,
                        max_iter, tol, f0, g0, symmetric, backend)
    else:
        if backend in ("auto", "triton") and not load_error("triton"):
            load_error("fdiv_kernels.transport._ops_triton")  # registers the triton ops when it can
        name = select(backend, ref, "sinkhorn_fwd")
        eps0 = _max_cost(x, y, cost, kind, ctype) if scaling is not None else None
        cfg = _Config(eps, kind, rho_a, rho_b, max_iter, tol, check_every, scaling or 0.0,
                      symmetric, grad, name)
        value, f, g, lin, n_iter, err = _SinkhornFunction.apply(
            x, y, cost, a.to(ctype) if a.dtype != ctype else a,
            b.to(ctype) if b.dtype != ctype else b, f0, g0, eps0, cfg)
        res = (value, lin, f, g, n_iter, err <= tol, err)
    value, lin, f, g, n_iter, conv, err = res
    if unbatched:
        value, lin, f, g, n_iter, conv, err = (t[0] for t in res)
    return SinkhornResult(value, lin, f, g, n_iter, conv, err, ctx)


def _unrolled(x, y, cost, a, b, eps, kind, rho_a, rho_b, n_iter, tol, f0, g0, symmetric,
              backend="auto"):
    if select(backend, x if cost is None else cost, "sinkhorn_fwd") == "cpu":
        # One fused C++ call each way (csrc/cpu/sinkhorn_unrolled.cpp); the loop below is the
        # spec and the path of every other backend (no other has an unrolled kernel).
        from fdiv_kernels.transport._unrolled import unrolled_cpu

        value, lin, f, g, err = unrolled_cpu(x, y, cost, a, b, f0, g0, eps, kind, rho_a, rho_b,
                                             n_iter, symmetric)
        n = torch.full_like(err, n_iter, dtype=torch.int32)
        return value, lin, f, g, n, err <= tol, err

    from torch.utils.checkpoint import checkpoint

    f, g = core.unrolled(x, y, cost, a, b, eps, kind, rho_a, rho_b, n_iter, f0, g0, symmetric)

    def totals(x, y, cost, a, b, f, g):
        return core.plan_totals(x, y, cost, a, b, f, g, eps, kind)

    total, lin = checkpoint(totals, x, y, cost, a, b, f, g, use_reentrant=False)
    value = core.dual_value(a, b, f, g, total, eps, rho_a, rho_b)
    with torch.no_grad():
        ev = torch.full_like(a[:, 0], eps)
        xs, ys = (x, y) if cost is None else (None, None)
        lr = core.lse_torch(xs, ys, cost, _log(b) + g / eps, 1 / ev, kind, False)
        err = core.marginal_error(f.detach(), lr, _log(a), ev, rho_a)
        if symmetric:
            lc = core.lse_torch(ys, xs, cost, _log(a) + f / eps, 1 / ev, kind, True)
            err = err + core.marginal_error(g.detach(), lc, _log(b), ev, rho_b)
    n = torch.full_like(err, n_iter, dtype=torch.int32)
    return value, lin, f, g, n, err <= tol, err


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
    terms use symmetric (averaged) updates unless ``symmetric=False`` is given. ``debias=False`` gives OT(a, b). Other keywords go to ``sinkhorn``.
    """
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a bool, got {type(debias).__name__}")
    kw = dict(epsilon=epsilon, reach=reach, cost_fn=cost_fn, **kwargs)
    if not debias:
        return sinkhorn(x=x, y=y, a=a, b=b, **kw).value
    # Symmetric updates for all three terms: the same iteration on x = y gives S = 0 exactly.
    kw.setdefault("symmetric", True)
    xy = sinkhorn(x=x, y=y, a=a, b=b, **kw)
    xx = sinkhorn(x=x, y=x, a=a, b=a, **kw)
    yy = sinkhorn(x=y, y=y, a=b, b=b, **kw)
    s = xy.value - 0.5 * (xx.value + yy.value)
    if reach is not None:
        ma, mb = xy._ctx["a"].sum(-1), xy._ctx["b"].sum(-1)
        d = 0.5 * epsilon * (ma - mb) ** 2
        s = s + (d[0] if xy._ctx["unbatched"] else d)
    return s


class SinkhornDistillationLoss(nn.Module):
    """Batch-wise Sinkhorn knowledge distillation (SinKD): the OT cost between the batch of
    softened student distributions and the batch of softened teacher distributions.

    For logits (N, C): p_s = softmax(student / T), p_t = softmax(teacher / T) (teacher detached),
    cost C_ij = |p_s,i - p_t,j|_1 (N x N), uniform marginals, ``n_iter`` log-domain Sinkhorn
    iterations at ``epsilon``, loss = <C, P>, differentiated through the iterations.
    Logits with more dims are flattened to rows. On the cpu backend the iterations and their
    backward are one fused C++ call each (``fdiv_kernels.transport._unrolled``).
    """

    def __init__(self, temperature: float = 2.0, epsilon: float = 0.1, n_iter: int = 20,
                 backend: str = "auto") -> None:
        super().__init__()
        self.temperature = V.check_real("temperature", temperature, positive=True)
        self.epsilon = V.check_real("epsilon", epsilon, positive=True)
        self.n_iter = _int("n_iter", n_iter, 1)
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        V.check_logits("student_logits", student_logits)
        V.check_logits("teacher_logits", teacher_logits)
        V.check_pair(student_logits, teacher_logits)
        s = student_logits.reshape(-1, student_logits.shape[-1])
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
        ctype = core.compute_dtype(s.dtype)
        ps = torch.softmax(s.to(ctype) / self.temperature, -1)
        pt = torch.softmax(t.to(ctype) / self.temperature, -1)
        if select(self.backend, ps, "sinkhorn_fwd") == "cpu":
            # SinKD is tiny: per-call overhead is the cost, so straight to the fused op (one
            # problem, uniform weights passed as None), skipping sinkhorn()'s checks and tensors.
            from fdiv_kernels.transport._unrolled import unrolled_cpu

            lin = unrolled_cpu(ps[None], pt[None], None, None, None, None, None, self.epsilon,
                               core.COST_KINDS["l1"], 0.0, 0.0, self.n_iter, False)[1]
            return lin[0]
        r = sinkhorn(x=ps, y=pt, cost_fn="l1", epsilon=self.epsilon, max_iter=self.n_iter,
                     tol=0.0, grad="unrolled", backend=self.backend)
        return r.cost

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}, n_iter={self.n_iter}"
