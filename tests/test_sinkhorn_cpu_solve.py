"""The cpu backend's whole-solve Sinkhorn op (fdiv::sinkhorn_solve_cpu, one problem per task,
cost built once per problem in a per-thread scratch) and its totals op: the per-update loop of
``transport._solver.solve`` (same backend, forced) and the torch backend are the oracles."""

import math

import pytest
import torch

from helpers import F64, assert_close, centered, points, weights
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels.core._dispatch import BackendUnavailableError, select
from fdiv_kernels.transport import _dual
from fdiv_kernels.transport._costs import COST_KINDS, pairwise_cost
from fdiv_kernels.transport._solver import eps_schedule

try:
    select("cpu", torch.empty(1), "sinkhorn_fwd")
    from fdiv_kernels.transport import _ops_cpu as SC
except (ImportError, BackendUnavailableError):
    SC = None
pytestmark = pytest.mark.skipif(SC is None, reason="cpu sinkhorn ops not built")


@pytest.fixture
def force():
    """force(True / False): the whole-solve / per-update path of sinkhorn_fwd_cpu."""
    yield lambda v: setattr(SC, "FORCE_WHOLE_SOLVE", v)
    SC.FORCE_WHOLE_SOLVE = None


def _batch(B, n, m, d, dtype=F64, seed=70):
    # Problems of different spreads converge at different iterations.
    scale = torch.tensor([0.5, 1.0, 2.0, 1.5][:B], dtype=dtype)[:, None, None]
    x = points(B, n, d, seed=seed, dtype=dtype) * scale
    y = points(B, m, d, seed=seed + 1, dtype=dtype) + 0.3
    a = weights(B, n, seed=seed + 2, dtype=dtype)
    if n > 1:
        a[0, min(2, n - 1)] = 0.0  # a zero-weight point, excluded exactly
        a = a / a.sum(-1, keepdim=True)
    b = weights(B, m, seed=seed + 3, dtype=dtype)
    return x, y, a, b


def _both(force, **kw):
    out = []
    for whole in (True, False):
        force(whole)
        out.append(fk.sinkhorn(backend="cpu", **kw))
    return out


def _assert_same(rw, rl, tol, what):
    assert torch.equal(rw.n_iter, rl.n_iter), f"{what}: n_iter {rw.n_iter} vs {rl.n_iter}"
    assert torch.equal(rw.converged, rl.converged), what
    for name in ("value", "cost", "f", "g", "marginal_error"):
        assert_close(getattr(rw, name), getattr(rl, name), (tol, tol), f"{what}: {name}")


@pytest.mark.parametrize("cost_fn", list(COST_KINDS))
@pytest.mark.parametrize("shape", [(3, 13, 29, 5), (2, 3, 4, 2), (2, 1, 17, 3), (2, 40, 1, 30)])
def test_whole_solve_matches_loop_per_cost(force, cost_fn, shape):
    B, n, m, d = shape  # (2, 3, 4, 2): below kTinyMacs, the cost from ATen
    x, y, a, b = _batch(B, n, m, d)
    kw = dict(x=x, y=y, a=a, b=b, cost_fn=cost_fn, epsilon=0.2, tol=1e-9, max_iter=400,
              check_every=3)
    rw, rl = _both(force, **kw)
    _assert_same(rw, rl, 1e-10, cost_fn)
    assert rw.converged.any()


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reach", [None, 1.0, (None, 2.0)])
@pytest.mark.parametrize("scaling", [None, 0.5])
def test_whole_solve_matches_loop_options(force, dense, symmetric, reach, scaling):
    x, y, a, b = _batch(3, 11, 14, 4)
    if reach is not None:
        b = b * 1.7  # unbalanced: any positive mass
    src = dict(cost=pairwise_cost(x, y, 0)) if dense else dict(x=x, y=y)
    kw = dict(**src, a=a, b=b, epsilon=0.1, tol=1e-9, max_iter=300, check_every=4,
              symmetric=symmetric, reach=reach, scaling=scaling)
    rw, rl = _both(force, **kw)
    _assert_same(rw, rl, 1e-10, f"dense={dense} symmetric={symmetric} reach={reach}")
    if not symmetric and reach is None and scaling is None:
        assert len(set(rw.n_iter.tolist())) > 1, "problems should stop at different iterations"


def test_whole_solve_warm_start_and_not_converged(force):
    x, y, a, b = _batch(3, 12, 10, 3)
    kw = dict(x=x, y=y, a=a, b=b, epsilon=0.05, tol=1e-10, check_every=1)
    force(True)
    ref = fk.sinkhorn(**kw, max_iter=5000, backend="cpu")
    assert ref.converged.all()
    warm = fk.sinkhorn(**kw, max_iter=5000, init=(ref.f, ref.g), backend="cpu")
    assert (warm.n_iter == 0).all()
    short = fk.sinkhorn(**kw, max_iter=3, backend="cpu")
    assert (short.n_iter == 3).all() and not short.converged.any()
    assert (short.marginal_error > 1e-10).all()
    force(False)
    _assert_same(short, fk.sinkhorn(**kw, max_iter=3, backend="cpu"), 1e-10, "max_iter=3")


def test_whole_solve_fp32_and_16bit_costs(force):
    x, y, a, b = _batch(3, 24, 19, 6, dtype=torch.float32)
    kw = dict(a=a, b=b, epsilon=0.2, tol=1e-5, max_iter=500, check_every=1)
    force(True)
    r32 = fk.sinkhorn(x=x, y=y, **kw, backend="cpu")
    r64 = fk.sinkhorn(x=x.double(), y=y.double(), **{**kw, "a": a.double(), "b": b.double()},
                     backend="torch")
    assert r32.f.dtype == torch.float32 and r32.converged.all()
    assert_close(centered(r32.f), centered(r64.f), (1e-4, 1e-4), "fp32 f")
    assert_close(r32.value, r64.value, (1e-5, 1e-5), "fp32 value")
    C = pairwise_cost(x, y, 0)
    for dt in (torch.bfloat16, torch.float16):
        c16 = C.to(dt)
        rw = fk.sinkhorn(cost=c16, **kw, backend="cpu")
        rt = fk.sinkhorn(cost=c16.double(), **{**kw, "a": a.double(), "b": b.double()},
                        backend="torch")
        assert_close(centered(rw.f), centered(rt.f), (1e-4, 1e-4), f"{dt} cost f")


def test_whole_solve_nan_problem_is_reported_alone(force):
    x, y, a, b = _batch(3, 9, 8, 2)
    C = pairwise_cost(x, y, 0)
    C[1, 2, 3] = float("nan")
    force(True)
    r = fk.sinkhorn(cost=C, a=a, b=b, epsilon=0.5, tol=1e-8, max_iter=2000, check_every=2,
                   backend="cpu")
    assert r.converged.tolist() == [True, False, True]
    assert r.marginal_error[1] == float("inf")
    force(False)
    rl = fk.sinkhorn(cost=C, a=a, b=b, epsilon=0.5, tol=1e-8, max_iter=2000, check_every=2,
                    backend="cpu")
    assert torch.equal(r.n_iter, rl.n_iter)


def test_auto_check_every_stops_sooner_at_the_same_tolerance():
    x, y, a, b = _batch(4, 30, 26, 3, dtype=torch.float32)
    kw = dict(x=x, y=y, a=a, b=b, epsilon=0.5, tol=1e-4, max_iter=2000, backend="cpu")
    auto = fk.sinkhorn(**kw)  # whole-solve: checks every iteration
    every10 = fk.sinkhorn(**kw, check_every=10)
    assert auto.converged.all() and (auto.marginal_error <= 1e-4).all()
    assert (auto.n_iter <= every10.n_iter).all() and (auto.n_iter < every10.n_iter).any()
    assert (every10.n_iter % 10 == 0).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("dense", [False, True])
def test_totals_op_matches_plan_totals(dtype, dense):
    x, y, a, b = _batch(3, 21, 33, 5, dtype=dtype)
    f = logits((3, 21), dtype, seed=80) * 0.1
    g = logits((3, 33), dtype, seed=81) * 0.1
    kw = dict(x=None, y=None, cost=pairwise_cost(x, y, 0)) if dense else dict(x=x, y=y,
                                                                                   cost=None)
    got = torch.ops.fdiv.sinkhorn_totals_cpu(kw["x"], kw["y"], kw["cost"], a, b, f, g, 0.3, 0)
    want = _dual.plan_totals(kw["x"], kw["y"], kw["cost"], a, b, f, g, 0.3, 0)
    tol = 1e-12 if dtype == F64 else 1e-5
    for gt, w in zip(got, want):
        assert_close(gt, w, (tol, tol), "totals")
    assert got[0][0] > 0 and torch.isfinite(got[1]).all()


def test_dispatch_rule():
    threads = torch.get_num_threads()
    assert SC.whole_solve(64, 256, 256, torch.float32)
    assert SC.whole_solve(1, 100, 100, torch.float32)  # small: one task beats split updates
    assert not SC.whole_solve(64, 4096, 4096, torch.float32)  # the scratch does not fit
    assert SC.whole_solve(threads, 1024, 1024, torch.float32)
    assert not SC.whole_solve(threads, 1024, 1024, F64)
    if threads > 1:
        assert not SC.whole_solve(1, 1024, 1024, torch.float32)  # one problem: split updates


def test_eps_schedule_table():
    # The one host-side eps-scaling schedule (levels, B): geometric from each problem's start,
    # never below the target.
    levels = eps_schedule(torch.tensor([8.0, 3.0]), 0.5, 0.5, torch.float32)
    assert levels.shape == (4, 2) and (levels >= 0.5).all()


@pytest.mark.parametrize("source", ["dense", *COST_KINDS])
@pytest.mark.parametrize("reach", [(0.0, 0.0), (1.5, 0.0), (0.7, 2.0)])
@pytest.mark.parametrize("implicit", [False, True])
def test_grads_op_matches_dual_grads(source, reach, implicit):
    B, n, m, d = 3, 17, 23, 5
    x, y, a, b = _batch(B, n, m, d)
    x[1, 4] = y[1, 6]  # coincident points: the 0 subgradient of euclidean / l1
    dense = source == "dense"
    kind = 0 if dense else COST_KINDS[source]
    f = logits((B, n), F64, seed=90) * 0.2
    g = logits((B, m), F64, seed=91) * 0.2
    gv = logits((B,), F64, seed=92)
    lam_f = logits((B, n), F64, seed=93) if implicit else None
    lam_g = logits((B, m), F64, seed=94) if implicit else None
    src = (None, None, pairwise_cost(x, y, kind)) if dense else (x, y, None)
    need = [not dense, not dense, dense, True, True]
    got = torch.ops.fdiv.sinkhorn_grads_cpu(*src, a, b, f, g, gv, lam_f, lam_g, 0.3, kind,
                                            *reach, need)
    want = _dual.dual_grads(*src, a, b, f, g, 0.3, kind, *reach, gv, lam_f, lam_g, tuple(need))
    for name, gt, w, wanted in zip(("x", "y", "cost", "a", "b"), got, want, need):
        if wanted:
            assert_close(gt, w, (1e-10, 1e-12), f"{source} d{name}")
        else:
            assert gt.numel() == 0


def test_grads_op_fp32_and_the_backward_uses_it():
    x, y, a, b = _batch(2, 30, 20, 6, dtype=torch.float32)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    r = fk.sinkhorn(x=xr, y=yr, a=a, b=b, epsilon=0.3, tol=1e-6, backend="cpu")
    gx, gy = torch.autograd.grad(r.value.sum(), (xr, yr))
    want = _dual.dual_grads(x, y, None, a, b, r.f, r.g, 0.3, 0, 0.0, 0.0, torch.ones(2), None,
                           None, (True, True, False, False, False))
    assert gx.dtype == torch.float32
    assert_close(gx, want[0], (1e-5, 1e-7), "fp32 dx")
    assert_close(gy, want[1], (1e-5, 1e-7), "fp32 dy")


@pytest.mark.parametrize("dense", [False, True])
def test_plan_apply_op_matches_torch_and_implicit_grads_use_it(dense):
    x, y, a, b = _batch(3, 15, 12, 4)
    f = logits((3, 15), F64, seed=95) * 0.2
    g = logits((3, 12), F64, seed=96) * 0.2
    vf, vg = logits((3, 15), F64, seed=97), logits((3, 12), F64, seed=98)
    src = (None, None, pairwise_cost(x, y, 0)) if dense else (x, y, None)
    got = torch.ops.fdiv.sinkhorn_plan_apply_cpu(*src, a, b, f, g, 0.4, 0, vf, vg)
    want = _dual.plan_apply(*src, a, b, f, g, 0.4, 0, vf, vg)
    for name, gt, w in zip(("P vg", "P^T vf", "P 1", "P^T 1"), got, want):
        assert_close(gt, w, (1e-12, 1e-14), name)
    # The implicit gradient of f through the cpu backend equals the torch backend's.
    outs = []
    for backend in ("cpu", "torch"):
        xr = x.clone().requires_grad_()
        r = fk.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=0.4, tol=1e-12, max_iter=5000,
                       grad="implicit", backend=backend)
        outs.append(torch.autograd.grad((r.f * vf).sum() + r.value.sum(), xr)[0])
    assert_close(outs[0], outs[1], (1e-8, 1e-10), "implicit dx")
