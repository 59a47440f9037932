"""Sinkhorn at its edges (issue 16), each case on every backend it concerns, against float64:
the gradient of every returned field, infinite and NaN costs under eps-scaling, conflicting and
low-precision arguments, the plan ops past one row block, torch.compile(fullgraph=True)."""

import pytest
import torch
from helpers import (F32, F64, SINKHORN_BACKENDS, assert_close, points, sinkhorn_backends,
                     weights)

import fdiv_kernels as fk
from fdiv_kernels.transport import _dual
from fdiv_kernels.transport._costs import pairwise_cost

F64_BACKENDS = sinkhorn_backends(F64)


@pytest.fixture(params=SINKHORN_BACKENDS)
def sinkhorn_backend(request):
    return request.param


def _dtype(backend):
    return F64 if backend in F64_BACKENDS else F32


# ---------------------------------------------------------------------------------------------
# The gradient of every returned field


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unrolled"])
def test_every_field_is_differentiable_or_says_it_is_not(sinkhorn_backend, grad):
    """value: differentiable in every mode; f, g: with implicit / unrolled; cost (<C, P>): with
    unrolled only, elsewhere it does not require grad (backward raises: never a silent zero);
    marginal_error, n_iter, converged: never."""
    dt = _dtype(sinkhorn_backend)
    x = points(2, 7, 2, seed=200, dtype=dt).requires_grad_()
    y = points(2, 6, 2, seed=201, dtype=dt)
    r = fk.sinkhorn(x=x, y=y, epsilon=0.5, grad=grad, max_iter=30, backend=sinkhorn_backend)
    assert r.value.requires_grad
    assert r.f.requires_grad == r.g.requires_grad == (grad != "envelope")
    assert r.cost.requires_grad == (grad == "unrolled")
    assert not r.marginal_error.requires_grad
    assert not r.n_iter.is_floating_point() and r.converged.dtype == torch.bool
    if grad != "unrolled":
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(r.cost.sum(), x)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(r.marginal_error.sum(), x)


def test_unrolled_cost_gradient_matches_finite_differences():
    """d<C, P>/dx through the iterations (the field POT's sinkhorn2 users differentiate)."""
    x, y = points(1, 5, 2, seed=202), points(1, 4, 2, seed=203)

    def cost(xv):
        return fk.sinkhorn(x=xv, y=y, epsilon=0.5, grad="unrolled", max_iter=40,
                           backend="torch").cost.sum()

    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(cost(xr), xr)
    h = 1e-6
    for idx in ((0, 0, 0), (0, 3, 1)):
        xp, xm = x.clone(), x.clone()
        xp[idx] += h
        xm[idx] -= h
        assert_close(gx[idx], (cost(xp) - cost(xm)) / (2 * h), (1e-5, 1e-8), f"d cost/dx{idx}")


# ---------------------------------------------------------------------------------------------
# Infinite and NaN costs under eps-scaling


def test_scaling_with_infinite_cost_entries(sinkhorn_backend):
    """A +inf entry is a forbidden pair: no OverflowError, a zero plan entry, and the fixed
    point of the same problem solved without scaling."""
    dt = _dtype(sinkhorn_backend)
    C = pairwise_cost(points(2, 6, 2, seed=204), points(2, 5, 2, seed=205), 0)
    C[0, 1, 2] = float("inf")
    C[1, 4, 0] = float("inf")
    kw = dict(cost=C.to(dt), epsilon=0.2, max_iter=2000, tol=1e-6 if dt == F32 else 1e-10)
    r = fk.sinkhorn(**kw, scaling=0.5, backend=sinkhorn_backend)
    ref = fk.sinkhorn(**kw, backend="torch") if dt == F64 else fk.sinkhorn(
        cost=C, epsilon=0.2, max_iter=2000, tol=1e-12, backend="torch")
    assert r.converged.all() and torch.isfinite(r.value).all()
    P = r.plan()
    assert P[0, 1, 2] == 0 and P[1, 4, 0] == 0
    tol = (1e-8, 1e-10) if dt == F64 else (1e-4, 1e-6)
    assert_close(r.value, ref.value, tol, "value")


def test_scaling_with_nan_cost_reports_that_problem_alone(sinkhorn_backend):
    dt = _dtype(sinkhorn_backend)
    C = pairwise_cost(points(2, 6, 2, seed=206), points(2, 5, 2, seed=207), 0).to(dt)
    clean = fk.sinkhorn(cost=C, epsilon=0.3, scaling=0.5, backend=sinkhorn_backend)
    C[1, 2, 3] = float("nan")
    r = fk.sinkhorn(cost=C, epsilon=0.3, scaling=0.5, backend=sinkhorn_backend)
    assert r.converged.tolist() == [True, False]
    assert r.marginal_error[1] == float("inf")
    assert torch.equal(r.value[0], clean.value[0]) and torch.equal(r.f[0], clean.f[0])


def test_nan_points_are_not_converged(sinkhorn_backend):
    """A problem whose points hold a NaN is reported not converged (on the Triton whole-solve
    path too), the other problems of the batch untouched."""
    dt = _dtype(sinkhorn_backend)
    x, y = points(3, 6, 2, seed=208, dtype=dt), points(3, 5, 2, seed=209, dtype=dt)
    clean = fk.sinkhorn(x=x, y=y, epsilon=0.3, backend=sinkhorn_backend)
    x[1, 2, 0] = float("nan")
    r = fk.sinkhorn(x=x, y=y, epsilon=0.3, backend=sinkhorn_backend)
    assert r.converged.tolist() == [True, False, True]
    assert torch.equal(r.value[[0, 2]], clean.value[[0, 2]])


# ---------------------------------------------------------------------------------------------
# Arguments


def test_cost_fn_with_a_dense_cost_raises():
    C = pairwise_cost(points(1, 4, 2, seed=210), points(1, 3, 2, seed=211), 0)
    with pytest.raises(ValueError, match="cost_fn"):
        fk.sinkhorn(cost=C, cost_fn="l1")
    with pytest.raises(ValueError, match="cost_fn"):
        fk.sinkhorn(cost=C, cost_fn="sqeuclidean")
    fk.sinkhorn(cost=C)  # the default: the cost as given


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_within_their_rounding_are_accepted(sinkhorn_backend, dtype):
    """A softmax computed in bf16 / fp16 sums to 1 only within its rounding: accepted and
    renormalized in fp32 (the solve is that of the renormalized fp32 weights); a real mismatch
    is still rejected."""
    x, y = points(2, 40, 2, seed=212, dtype=F32), points(2, 30, 2, seed=213, dtype=F32)
    a = torch.softmax(points(2, 40, 1, seed=214, dtype=dtype)[..., 0] * 3, -1)
    sums = a.double().sum(-1)
    assert (sums - 1).abs().max() > 1e-4  # the case the issue reports
    r = fk.sinkhorn(x=x, y=y, a=a, epsilon=0.3, backend=sinkhorn_backend)
    a32 = a.float() / a.float().sum(-1, keepdim=True)
    ref = fk.sinkhorn(x=x, y=y, a=a32, epsilon=0.3, backend=sinkhorn_backend)
    assert r.converged.all()
    assert_close(r.value, ref.value, (1e-6, 1e-7), "value")
    with pytest.raises(ValueError, match="must sum to 1"):
        fk.sinkhorn(x=x, y=y, a=(a.float() * 1.05).to(dtype), epsilon=0.3,
                    backend=sinkhorn_backend)


# ---------------------------------------------------------------------------------------------
# The cpu plan ops past one row block (csrc/cpu/sinkhorn_problem.h for_each_row_block)


@pytest.mark.skipif("cpu" not in SINKHORN_BACKENDS, reason="cpu sinkhorn ops not built")
@pytest.mark.parametrize("kind", [0, 2, 4])
def test_cpu_plan_ops_stream_row_blocks(kind):
    """n * m past one block (2^20 entries): the totals, gradients and plan products are those of
    the chunked torch statement of record, the cost never held whole."""
    n, m, d = 1100, 1000, 3
    x, y = points(1, n, d, seed=215), points(1, m, d, seed=216)
    a, b = weights(1, n, seed=217), weights(1, m, seed=218)
    f = 0.1 * points(1, n, 1, seed=219)[..., 0]
    g = 0.1 * points(1, m, 1, seed=220)[..., 0]
    eps = 0.5
    tot = torch.ops.fdiv.sinkhorn_totals_cpu(x, y, None, a, b, f, g, eps, kind)
    want = _dual.plan_totals(x, y, None, a, b, f, g, eps, kind)
    for o, w, what in zip(tot, want, ("sum P", "<C, P>")):
        assert_close(o, w, (1e-10, 1e-12), what)
    gv = torch.ones(1, dtype=F64)
    lam_f, lam_g = 0.1 * f, 0.1 * g
    need = [True, True, False, True, True]
    got = torch.ops.fdiv.sinkhorn_grads_cpu(x, y, None, a, b, f, g, gv, lam_f, lam_g, eps, kind,
                                            0.0, 0.0, need)
    ref = _dual.dual_grads(x, y, None, a, b, f, g, eps, kind, 0.0, 0.0, gv, lam_f, lam_g,
                           tuple(need))
    for o, w, what in zip(got, ref, ("dx", "dy", "dC", "da", "db")):
        if w is not None:
            assert_close(o, w, (1e-9, 1e-12), what)
    vf, vg = points(1, n, 1, seed=221)[..., 0], points(1, m, 1, seed=222)[..., 0]
    got = torch.ops.fdiv.sinkhorn_plan_apply_cpu(x, y, None, a, b, f, g, eps, kind, vf, vg)
    ref = _dual.plan_apply(x, y, None, a, b, f, g, eps, kind, vf, vg)
    for o, w, what in zip(got, ref, ("P vg", "P^T vf", "P 1", "P^T 1")):
        assert_close(o, w, (1e-10, 1e-13), what)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True), forward and backward


COMPILE_CASES = [("auto", "envelope", False), ("torch", "envelope", False),
                 ("torch", "implicit", False), ("cpu", "envelope", False),
                 ("cpu", "implicit", False), ("torch", "envelope", True),
                 ("cpu", "unrolled", False)]


@pytest.mark.parametrize("backend,grad,dynamic", COMPILE_CASES)
def test_compile_fullgraph(backend, grad, dynamic):
    if backend != "auto" and backend not in F64_BACKENDS:
        pytest.skip(f"{backend} does not solve Sinkhorn here")
    torch._dynamo.reset()

    def loss_fn(x, y, eps):
        r = fk.sinkhorn(x=x, y=y, epsilon=eps, grad=grad, max_iter=50, scaling=None
                        if grad == "unrolled" else 0.5, backend=backend)
        return r.value.sum() + (r.f.sum() if grad != "envelope" else 0)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x, y = points(2, 7, 3, seed=223), points(2, 6, 3, seed=224)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = compiled(x1, y, 0.3)
    a.backward()
    b = loss_fn(x2, y, 0.3)
    b.backward()
    assert_close(a, b, (1e-12, 1e-12), "loss")
    assert_close(x1.grad, x2.grad, (1e-12, 1e-12), "dx")


def test_compile_fullgraph_divergence():
    torch._dynamo.reset()

    def fn(x, y):
        return fk.sinkhorn_divergence(x, y, epsilon=0.3, max_iter=50).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, y = points(2, 7, 3, seed=225), points(2, 6, 3, seed=226)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(x1, y).backward()
    fn(x2, y).backward()
    assert_close(x1.grad, x2.grad, (1e-12, 1e-12), "dx")


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_autocast_keeps_full_precision(backend):
    # Under cpu bf16 autocast the cost matmuls must stay fp32 (before: 4.5e-3 relative error).
    x, y = points(2, 12, 4, seed=71, dtype=F32), points(2, 9, 4, seed=72, dtype=F32)
    ref = fk.sinkhorn(x=x.double(), y=y.double(), epsilon=0.2, tol=1e-10, max_iter=5000,
                      backend="torch")
    with torch.autocast("cpu", torch.bfloat16):
        r = fk.sinkhorn(x=x, y=y, epsilon=0.2, tol=1e-6, max_iter=2000, backend=backend)
        # The divergence only against itself outside autocast: 40 iterations are enough (three
        # solves each, slow in the Triton interpreter).
        d = fk.sinkhorn_divergence(x, y, epsilon=0.2, tol=1e-4, max_iter=40, backend=backend)
    assert r.value.dtype == torch.float32
    assert_close(r.value, ref.value, (2e-5, 1e-6), "value under autocast")
    plain = fk.sinkhorn_divergence(x, y, epsilon=0.2, tol=1e-4, max_iter=40, backend=backend)
    assert_close(d, plain, (1e-6, 1e-7), "divergence under autocast")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("out", ["f", "g", "value"])
def test_implicit_gradient_float32_through_the_potentials(backend, out):
    """grad="implicit" in float32: the adjoint's CG stops at a tolerance float32 can reach (it
    used to iterate on rounding until p K p underflowed: NaN through f or g), and the gradient
    matches the float64 one."""
    if backend == "cpu" and backend not in SINKHORN_BACKENDS:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 6, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    grads = []
    for dtype in (torch.float32, torch.float64):
        xs, ys = (t.to(dtype).requires_grad_(True) for t in (x, y))
        r = fk.sinkhorn(x=xs, y=ys, epsilon=0.1, grad="implicit", backend=backend)
        grads.append(torch.autograd.grad(getattr(r, out).sum(), (xs, ys)))
    for g32, g64 in zip(*grads):
        assert torch.isfinite(g32).all()
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)
