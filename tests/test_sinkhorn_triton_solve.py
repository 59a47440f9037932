"""The triton backend's whole-solve Sinkhorn kernel (``triton_kernels/sinkhorn_solve.py``, one
program per problem, every iteration in one launch): the torch backend and the per-update triton
path (forced) are the oracles. Interpreted on the CPU: small shapes, tens of iterations."""

import math

import pytest
import torch
from helpers import F32, HAS_TRITON, assert_close, centered, points, weights

import fdiv_kernels as fk
from fdiv_kernels.transport._costs import COST_KINDS, pairwise_cost

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton sinkhorn ops unavailable")
if HAS_TRITON:
    import fdiv_kernels.transport._ops_triton as ST
    import fdiv_kernels.triton_kernels.sinkhorn_solve as SK


@pytest.fixture
def force():
    """force(True / False): the whole-solve / per-update path of sinkhorn_fwd_triton."""
    yield lambda v: setattr(ST, "FORCE_WHOLE_SOLVE", v)
    ST.FORCE_WHOLE_SOLVE = None


def _batch(B, n, m, d, seed=100, zero=True):
    # Problems of different spreads converge at different iterations.
    scale = torch.tensor([0.5, 1.0, 2.0][:B], dtype=F32)[:, None, None]
    x = points(B, n, d, seed=seed, dtype=F32) * scale
    y = points(B, m, d, seed=seed + 1, dtype=F32) + 0.3
    a = weights(B, n, seed=seed + 2, dtype=F32)
    b = weights(B, m, seed=seed + 3, dtype=F32)
    if zero and n > 2 and m > 2:  # zero-weight points on both sides, excluded exactly
        a[0, 2] = 0.0
        b[B - 1, 1] = 0.0
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return x, y, a, b


def _check(force, balanced=True, **kw):
    """Solve with the whole-solve kernel, the per-update triton loop and the torch backend;
    assert they agree on everything. Returns the whole-solve result."""
    force(True)
    rw = fk.sinkhorn(backend="triton", **kw)
    force(False)
    rl = fk.sinkhorn(backend="triton", **kw)
    rt = fk.sinkhorn(backend="torch", **kw)
    for other, name in ((rt, "torch"), (rl, "loop")):
        what = f"vs {name}"
        assert torch.equal(rw.n_iter, other.n_iter), f"{what}: n_iter {rw.n_iter} {other.n_iter}"
        assert torch.equal(rw.converged, other.converged), what
        # Balanced potentials are defined up to f + c, g - c; same iterations, same c here, but
        # the spec only promises the plan.
        fix = centered if balanced else (lambda t: t)
        assert_close(fix(rw.f), fix(other.f), (2e-5, 2e-5), f"{what}: f")
        assert_close(fix(rw.g), fix(other.g), (2e-5, 2e-5), f"{what}: g")
        assert_close(rw.value, other.value, (2e-5, 2e-5), f"{what}: value")
        # An error near tol is a difference of nearly equal fp32 numbers: a loose relative bound.
        assert_close(rw.marginal_error, other.marginal_error, (3e-2, 1e-6), f"{what}: error")
    return rw


@pytest.mark.parametrize("cost_fn", list(COST_KINDS))
def test_each_cost_kind(force, cost_fn):
    x, y, a, b = _batch(2, 11, 14, 3)
    r = _check(force, x=x, y=y, a=a, b=b, cost_fn=cost_fn, epsilon=1.0, tol=1e-3, max_iter=30,
               check_every=1)
    assert r.converged.all()


@pytest.mark.parametrize("cdtype", [F32, torch.bfloat16])
def test_dense_cost_any_strides_and_16bit(force, cdtype):
    x, y, a, b = _batch(2, 12, 9, 3)
    # The (m, n) cost transposed: a strided read, no copy.
    C = pairwise_cost(y, x, 0).to(cdtype).transpose(1, 2)
    r = _check(force, cost=C, a=a, b=b, epsilon=1.0, tol=1e-3, max_iter=30, check_every=1)
    assert r.converged.all() and r.f.dtype == F32


@pytest.mark.parametrize("symmetric,reach,scaling", [
    (False, None, 0.5),        # eps-scaling, then alternating
    (True, None, None),        # symmetric (averaged) updates
    (False, 1.0, None),        # unbalanced on both sides
    (False, (None, 2.0), 0.5),  # unbalanced on one side, with eps-scaling
    (True, (1.5, None), 0.5),  # symmetric, unbalanced on the other side, eps-scaling
    (True, 1.0, None),         # symmetric, unbalanced on both sides
])
def test_options(force, symmetric, reach, scaling):
    x, y, a, b = _batch(2, 10, 13, 2)
    ra, rb = reach if isinstance(reach, tuple) else (reach, reach)
    a, b = a * (1.3 if ra else 1), b * (0.8 if rb else 1)  # a relaxed side: any positive mass
    # n_iter here: [0, 4] (the levels reach tol), [12, 16], [2, 4], [2, 4], [16, 16], [12, 8].
    _check(force, balanced=reach is None, x=x, y=y, a=a, b=b, epsilon=1.0, tol=2e-2,
           max_iter=16, check_every=2, symmetric=symmetric, reach=reach, scaling=scaling)


def test_problems_stop_at_their_own_iteration(force):
    x, y, a, b = _batch(3, 9, 12, 2)
    r = _check(force, x=x, y=y, a=a, b=b, epsilon=1.0, tol=1e-2, max_iter=40, check_every=1)
    assert r.converged.all()
    assert len(set(r.n_iter.tolist())) == 3, r.n_iter


def test_not_converged_is_reported(force):
    x, y, a, b = _batch(2, 10, 8, 2)
    r = _check(force, x=x, y=y, a=a, b=b, epsilon=0.1, tol=1e-6, max_iter=3, check_every=1)
    assert (r.n_iter == 3).all() and not r.converged.any()
    assert (r.marginal_error > 1e-6).all()


def test_warm_start(force):
    x, y, a, b = _batch(2, 10, 11, 2)
    kw = {"x": x, "y": y, "a": a, "b": b, "epsilon": 0.5, "tol": 1e-3, "check_every": 1}
    force(True)
    part = fk.sinkhorn(backend="triton", max_iter=2, **kw)
    assert not part.converged.any()
    # From a partial solve: the same iterations as every backend from that start.
    r = _check(force, init=(part.f, part.g), max_iter=30, **kw)
    assert r.converged.all()
    force(True)
    again = fk.sinkhorn(backend="triton", init=(r.f, r.g), max_iter=30, **kw)
    assert (again.n_iter == 0).all() and again.converged.all()
    assert torch.equal(again.f, r.f) and torch.equal(again.g, r.g)


@pytest.mark.parametrize("n,m", [(1, 17), (19, 1)])
def test_a_single_point_side(force, n, m):
    x, y, a, b = _batch(2, n, m, 3)
    r = _check(force, x=x, y=y, a=a, b=b, epsilon=0.5, tol=1e-4, max_iter=8, check_every=1,
               symmetric=n == 1)
    assert r.converged.all() or n == 1  # symmetric (averaged) updates approach it slowly


@pytest.mark.parametrize("cost_fn,d", [("l1", 1), ("l1", 40), ("sqeuclidean", 1),
                                       ("sqeuclidean", 40)])
def test_point_dimension_edges(force, cost_fn, d):
    # d = 1: a one-wide l1 tile; d = 40: several BLOCK_D chunks (l1: 16 at 16 x 16, dots: 32).
    x, y, a, b = _batch(2, 7, 6, d)
    _check(force, x=x / math.sqrt(d), y=y / math.sqrt(d), a=a, b=b, cost_fn=cost_fn,
           epsilon=1.0, tol=1e-3, max_iter=3, check_every=1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_many_tiles_ragged(force, monkeypatch, symmetric):
    # 16-wide tiles and vector blocks: 3 x 2 tiles per pass, ragged on both sides.
    monkeypatch.setattr(SK, "MAX_BLOCK", 16)
    monkeypatch.setattr(SK, "BLOCK_V", 16)
    x, y, a, b = _batch(2, 37, 23, 5)
    _check(force, x=x, y=y, a=a, b=b, epsilon=0.5, tol=1e-3, max_iter=5, check_every=2,
           symmetric=symmetric, reach=(None, 1.0), balanced=False)


def test_nan_problem_is_reported_alone(force):
    x, y, a, b = _batch(2, 8, 7, 2)
    C = pairwise_cost(x, y, 0)
    C[1, 2, 3] = float("nan")
    kw = {"cost": C, "a": a, "b": b, "epsilon": 1.0, "tol": 1e-3, "max_iter": 12,
          "check_every": 2}
    force(True)
    r = fk.sinkhorn(backend="triton", **kw)
    assert r.converged.tolist() == [True, False]
    assert r.marginal_error[1] == float("inf") and r.n_iter[1] == 12
    assert torch.equal(r.n_iter, fk.sinkhorn(backend="torch", **kw).n_iter)


def test_dispatch_rule(force):
    ws = ST.whole_solve
    assert ws(1, 40, 60, F32)  # one tile: always
    assert ws(16, 256, 256, F32) and not ws(8, 256, 256, F32)
    assert not ws(64, 257, 100, F32)
    assert not ws(64, 10, 10, torch.float64)  # fp64: the loop keeps fp64 potentials
    force(True)
    assert ws(1, 4096, 4096, F32) and not ws(1, 4, 4, torch.float64)
    force(False)
    assert not ws(64, 4, 4, F32)


def test_auto_check_every_is_every_iteration(force):
    x, y, a, b = _batch(2, 6, 7, 2)
    kw = {"x": x, "y": y, "a": a, "b": b, "epsilon": 1.0, "tol": 1e-3, "max_iter": 30}
    force(True)
    r = fk.sinkhorn(backend="triton", **kw)  # check_every=None: the check is free here
    assert torch.equal(r.n_iter, fk.sinkhorn(backend="torch", check_every=1, **kw).n_iter)
    assert (r.n_iter % 10 != 0).any()
