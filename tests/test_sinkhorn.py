"""Batched Sinkhorn: POT (float64) as the oracle, edge cases, bad input, the three gradient modes,
the Triton kernels under TRITON_INTERPRET=1, the divergence and the SinKD loss."""

import math

import pytest
import torch
from helpers import (
    assert_close,
    F64,
    HAS_TRITON,
    SINKHORN_BACKENDS,
    centered,
    kl,
    needs_pot,
    needs_triton,
    ot,
    points,
    pot_dist,
    sinkhorn_precision,
    weights,
)
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels.core._dispatch import BackendUnavailableError, select
from fdiv_kernels.transport._costs import COST_KINDS, pairwise_cost
from fdiv_kernels.transport._solver import lse_torch


@pytest.fixture(params=SINKHORN_BACKENDS)
def sinkhorn_backend(request):
    """Each backend that solves Sinkhorn here (Triton under the interpreter on a CPU)."""
    return request.param


# ---------------------------------------------------------------------------------------------
# POT as the oracle


def _t(tol, factor):
    """A float64 tolerance (rtol, atol) scaled for a backend that computes in float32."""
    return tuple(min(t * factor, 1e-2) for t in tol)


@needs_pot
@pytest.mark.parametrize("cost_fn", list(COST_KINDS))
def test_balanced_points_match_pot(sinkhorn_backend, cost_fn):
    dt, solve_kw, k_tol = sinkhorn_precision(sinkhorn_backend)
    # One problem under the Triton interpreter (it runs the programs one after another, ~17 s
    # each); the batch's independence is tested in test_sinkhorn_triton_solve.
    B, n, m, d, eps = (1 if sinkhorn_backend == "triton" else 3), 9, 7, 3, 0.1
    x, y = points(B, n, d, seed=1), points(B, m, d, seed=2)
    a, b = weights(B, n, seed=3), weights(B, m, seed=4)
    r = fk.sinkhorn(x=x.to(dt), y=y.to(dt), a=a.to(dt), b=b.to(dt), epsilon=eps, cost_fn=cost_fn,
                    backend=sinkhorn_backend, **solve_kw)
    assert r.converged.all()
    P = r.plan()
    for k in range(B):
        M = pot_dist(x[k].to(dt), y[k].to(dt), cost_fn)
        G, log = ot.sinkhorn(a[k].to(dt).double().numpy(), b[k].to(dt).double().numpy(), M, eps,
                             method="sinkhorn_log", stopThr=1e-14, numItermax=100000, log=True)
        G = torch.from_numpy(G)
        assert_close(P[k], G, _t((1e-7, 1e-10), k_tol), "plan")
        assert_close(r.cost[k], (torch.from_numpy(M) * G).sum(), _t((1e-8, 1e-10), k_tol), "cost")
        value = float((torch.from_numpy(M) * G).sum()) + eps * kl(
            G.numpy(), torch.outer(a[k], b[k]).numpy())
        assert_close(r.value[k], value, _t((1e-8, 1e-10), k_tol), "value")
        # POT's log-scalings: P = diag(u) K diag(v), so eps log u = f + eps log a + constant.
        fu = torch.from_numpy(log["log_u"]) * eps
        gv = torch.from_numpy(log["log_v"]) * eps
        assert_close(centered(r.f[k] + eps * a[k].log()), centered(fu), _t((1e-6, 1e-8), k_tol),
                     "f")
        assert_close(centered(r.g[k] + eps * b[k].log()), centered(gv), _t((1e-6, 1e-8), k_tol),
                     "g")


@needs_pot
def test_dense_unbatched_and_low_precision_cost_match_pot():
    n, m, eps = 8, 11, 0.05
    x, y = points(1, n, 4, seed=5)[0], points(1, m, 4, seed=6)[0]
    M = torch.from_numpy(pot_dist(x, y, "sqeuclidean"))
    G = torch.from_numpy(ot.sinkhorn2(torch.full((n,), 1 / n, dtype=F64).numpy(),
                                      torch.full((m,), 1 / m, dtype=F64).numpy(), M.numpy(), eps,
                                      method="sinkhorn_log", stopThr=1e-14, numItermax=100000,
                                      log=False)[None])
    r = fk.sinkhorn(cost=M, epsilon=eps, tol=1e-12, max_iter=20000)
    assert r.f.shape == (n,) and r.g.shape == (m,) and r.value.shape == ()
    assert r.plan().shape == (n, m)
    assert_close(r.cost, G[0], (1e-8, 1e-10), "cost")
    # fp32 / bf16 cost storage, fp32 accumulation: the same problem to fp32 accuracy.
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        r32 = fk.sinkhorn(cost=M.to(dt), epsilon=eps, tol=1e-5)
        assert r32.f.dtype == torch.float32
        assert_close(r32.cost, G[0], (tol, 1e-5), f"cost {dt}")


@needs_pot
@pytest.mark.parametrize("reach", [0.5, (0.3, 2.0)])
@pytest.mark.parametrize("dense", [False, True])
def test_unbalanced_matches_pot(sinkhorn_backend, reach, dense):
    dt, solve_kw, k_tol = sinkhorn_precision(sinkhorn_backend)
    B, n, m, eps = 2, 8, 6, 0.1
    x, y = points(B, n, 2, seed=7, dtype=dt), points(B, m, 2, seed=8, dtype=dt)
    a, b = weights(B, n, seed=9, dtype=dt) * 1.5, weights(B, m, seed=10, dtype=dt)  # masses differ
    rho_a, rho_b = (reach, reach) if not isinstance(reach, tuple) else reach
    C = torch.stack([torch.from_numpy(pot_dist(x[k], y[k], "sqeuclidean")) for k in range(B)])
    a, b = a.double(), b.double()
    kw = dict(cost=C.to(dt)) if dense else dict(x=x, y=y)
    r = fk.sinkhorn(**kw, a=a.to(dt), b=b.to(dt), epsilon=eps, reach=reach,
                    backend=sinkhorn_backend, **solve_kw)
    assert r.converged.all()
    P = r.plan()
    for k in range(B):
        G = ot.unbalanced.sinkhorn_unbalanced(
            a[k].numpy(), b[k].numpy(), C[k].numpy(), eps, (rho_a, rho_b), method="sinkhorn",
            reg_type="kl", stopThr=1e-15, numItermax=100000)
        G = torch.from_numpy(G)
        assert_close(P[k], G, _t((1e-6, 1e-10), k_tol), "plan")
        Gn = G.numpy()
        value = (float((C[k] * G).sum()) + eps * kl(Gn, torch.outer(a[k], b[k]).numpy())
                 + rho_a * kl(Gn.sum(1), a[k].numpy()) + rho_b * kl(Gn.sum(0), b[k].numpy()))
        assert_close(r.value[k], value, _t((1e-6, 1e-9), k_tol), "value")
        assert_close(r.cost[k], (C[k] * G).sum(), _t((1e-6, 1e-9), k_tol), "cost")


@needs_pot
def test_zero_weights_exclude_points_exactly(sinkhorn_backend):
    dt, solve_kw, k_tol = sinkhorn_precision(sinkhorn_backend)
    n, m, eps = 7, 6, 0.1
    x, y = points(1, n, 2, seed=11, dtype=dt), points(1, m, 2, seed=12, dtype=dt)
    a, b = weights(1, n, seed=13), weights(1, m, seed=14)
    a[0, [1, 4]] = 0
    b[0, 2] = 0
    a, b = (a / a.sum()).to(dt), (b / b.sum()).to(dt)
    x[0, 1] = 1e3  # a far point with zero weight must not matter at all
    r = fk.sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, backend=sinkhorn_backend, **solve_kw)
    ka, kb = a[0] > 0, b[0] > 0
    M = pot_dist(x[0][ka], y[0][kb], "sqeuclidean")
    G = torch.from_numpy(ot.sinkhorn(a[0][ka].numpy(), b[0][kb].numpy(), M, eps,
                                     method="sinkhorn_log", stopThr=1e-14, numItermax=100000))
    P = r.plan()[0]
    assert torch.isfinite(r.f).all() and torch.isfinite(r.g).all()
    assert (P[~ka] == 0).all() and (P[:, ~kb] == 0).all()
    assert_close(P[ka][:, kb], G, _t((1e-7, 1e-10), k_tol), "plan")
    assert_close(r.cost[0], (torch.from_numpy(M) * G).sum(), _t((1e-8, 1e-10), k_tol), "cost")


# ---------------------------------------------------------------------------------------------
# Solver behaviour


def test_batched_equals_one_by_one_and_per_problem_stopping():
    B, n, m, eps = 4, 10, 12, 0.05
    x, y = points(B, n, 3, seed=15), points(B, m, 3, seed=16)
    y[0] = y[0] * 4  # a harder problem next to easy ones
    r = fk.sinkhorn(x=x, y=y, epsilon=eps, tol=1e-9, max_iter=5000, check_every=5)
    assert r.converged.all()
    assert len(set(r.n_iter.tolist())) > 1  # problems stopped at their own iteration
    for k in range(B):
        rk = fk.sinkhorn(x=x[k], y=y[k], epsilon=eps, tol=1e-9, max_iter=5000, check_every=5)
        assert int(rk.n_iter) == int(r.n_iter[k])
        assert_close(rk.value, r.value[k], (1e-12, 1e-12), "value")


def test_non_converged_is_reported():
    x, y = points(2, 16, 2, seed=17), points(2, 16, 2, seed=18)
    r = fk.sinkhorn(x=x, y=y, epsilon=1e-3, max_iter=3, tol=1e-9)
    assert not r.converged.any()
    assert (r.marginal_error > 1e-9).all()
    assert (r.n_iter == 3).all()


def test_warm_start_scaling_and_symmetric_reach_the_same_solution():
    x, y = points(2, 12, 2, seed=19), points(2, 10, 2, seed=20)
    kw = dict(x=x, y=y, epsilon=0.05, tol=1e-10, max_iter=20000)
    ref = fk.sinkhorn(**kw)
    assert ref.converged.all()
    warm = fk.sinkhorn(**kw, init=(ref.f, ref.g))
    assert (warm.n_iter == 0).all()  # converged at the first check
    scaled = fk.sinkhorn(**kw, scaling=0.5)
    assert scaled.converged.all() and (scaled.n_iter < ref.n_iter).all()
    sym = fk.sinkhorn(**kw, symmetric=True)
    for r in (warm, scaled, sym):
        assert_close(r.value, ref.value, (1e-8, 1e-10), "value")
        assert_close(r.plan(), ref.plan(), (1e-6, 1e-9), "plan")


@pytest.mark.parametrize("cost_fn", ["sqeuclidean", "euclidean", "cosine"])
def test_tiny_epsilon_fp32_is_finite(cost_fn):
    x, y = points(2, 32, 4, seed=21, dtype=torch.float32), points(2, 24, 4, seed=22,
                                                                   dtype=torch.float32)
    C = pairwise_cost(x, y, COST_KINDS[cost_fn])
    eps = 1e-4 * float(C.median())
    r = fk.sinkhorn(x=x, y=y, cost_fn=cost_fn, epsilon=eps, max_iter=50, tol=1e-5)
    for t in (r.value, r.cost, r.f, r.g, r.marginal_error, r.plan()):
        assert torch.isfinite(t).all()
    assert torch.isfinite(r.plan()).all() and (r.plan() >= 0).all()


def test_identical_single_point_and_constant_cost():
    x = points(1, 10, 3, seed=23, dtype=torch.float32)
    r = fk.sinkhorn(x=x, y=x.clone(), epsilon=1e-3, max_iter=2000, tol=1e-5, scaling=0.5)
    assert torch.isfinite(r.value).all() and r.cost.abs().max() < 1e-3
    one = fk.sinkhorn(x=x[:, :1], y=x, epsilon=0.1)
    assert one.converged.all() and one.n_iter.max() <= 10  # the first check after iteration 0
    assert_close(one.plan()[0, 0], torch.full((10,), 0.1), (1e-6, 1e-7), "single point plan")
    flat = fk.sinkhorn(cost=torch.full((2, 5, 4), 3.0), epsilon=0.01)
    assert flat.converged.all()
    assert_close(flat.plan(), torch.full((2, 5, 4), 0.05), (1e-6, 1e-7), "uniform plan")
    assert_close(flat.cost, torch.full((2,), 3.0), (1e-6, 1e-6), "cost")


def test_bad_input_errors():
    x, y = points(2, 5, 3, seed=24), points(2, 4, 3, seed=25)
    a = torch.full((2, 5), 0.2, dtype=F64)
    with pytest.raises(ValueError, match="non-negative"):
        fk.sinkhorn(x=x, y=y, a=a - 0.3)
    with pytest.raises(ValueError, match="sum to 1"):
        fk.sinkhorn(x=x, y=y, a=a * 2)
    fk.sinkhorn(x=x, y=y, a=a * 2, reach=1.0)  # unbalanced: any positive mass
    with pytest.raises(ValueError, match="shape"):
        fk.sinkhorn(x=x, y=y, a=a[:, :4])
    with pytest.raises(ValueError, match="point dimension"):
        fk.sinkhorn(x=x, y=y[..., :2])
    with pytest.raises(ValueError, match="batch size"):
        fk.sinkhorn(x=x, y=y[:1])
    with pytest.raises(ValueError, match="epsilon"):
        fk.sinkhorn(x=x, y=y, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        fk.sinkhorn(x=x, y=y, epsilon=-1.0)
    with pytest.raises(ValueError, match="cost_fn"):
        fk.sinkhorn(x=x, y=y, cost_fn="mahalanobis")
    with pytest.raises(ValueError, match="not both"):
        fk.sinkhorn(cost=torch.rand(2, 5, 4), x=x, y=y)
    with pytest.raises(ValueError, match="cost, or both"):
        fk.sinkhorn(x=x)
    with pytest.raises(ValueError, match="grad"):
        fk.sinkhorn(x=x, y=y, grad="magic")
    with pytest.raises(ValueError, match="scaling"):
        fk.sinkhorn(x=x, y=y, scaling=1.5)
    with pytest.raises(ValueError, match="reach"):
        fk.sinkhorn(x=x, y=y, reach=-1.0)
    with pytest.raises(TypeError, match="cost"):
        fk.sinkhorn(cost=torch.ones(2, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="init"):
        fk.sinkhorn(x=x, y=y, init=(torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)))
    with pytest.raises(ValueError, match="backend"):
        fk.sinkhorn(x=x, y=y, backend="tpu")


# ---------------------------------------------------------------------------------------------
# Gradients


def _fd(fn, t, h=1e-6):
    """Central finite differences of scalar fn w.r.t. every entry of t (float64)."""
    g = torch.zeros_like(t)
    flat = t.view(-1)
    for i in range(flat.numel()):
        old = float(flat[i])
        flat[i] = old + h
        up = float(fn())
        flat[i] = old - h
        dn = float(fn())
        flat[i] = old
        g.view(-1)[i] = (up - dn) / (2 * h)
    return g


@pytest.mark.parametrize("cost_fn", ["sqeuclidean", "l1", "cosine"])
@pytest.mark.parametrize("reach", [None, 0.7])
def test_envelope_gradient_matches_finite_differences(cost_fn, reach):
    B, n, m, eps = 2, 5, 4, 0.2
    x, y = points(B, n, 2, seed=26), points(B, m, 2, seed=27)
    a = weights(B, n, seed=28) * (1.0 if reach is None else 1.3)
    b = weights(B, m, seed=29)
    w = torch.tensor([1.0, -0.5], dtype=F64)
    kw = dict(epsilon=eps, cost_fn=cost_fn, reach=reach, tol=1e-13, max_iter=50000)

    def loss(x, y, a, b):
        return (fk.sinkhorn(x=x, y=y, a=a, b=b, **kw).value * w).sum()

    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    ar = a.clone().requires_grad_() if reach is not None else a
    gx, gy, *ga = torch.autograd.grad(loss(xr, yr, ar, b), [xr, yr] + ([ar] if reach else []))
    with torch.no_grad():
        assert_close(gx, _fd(lambda: loss(x, y, a, b), x), (1e-5, 1e-7), "d/dx")
        assert_close(gy, _fd(lambda: loss(x, y, a, b), y), (1e-5, 1e-7), "d/dy")
        if reach is not None:
            assert_close(ga[0], _fd(lambda: loss(x, y, a, b), a), (1e-5, 1e-7), "d/da")


def test_envelope_gradient_wrt_dense_cost_is_the_plan():
    C = logits((2, 4, 6), F64, seed=30).abs()
    C.requires_grad_()
    r = fk.sinkhorn(cost=C, epsilon=0.1, tol=1e-12, max_iter=20000)
    (gC,) = torch.autograd.grad(r.value.sum(), C)
    assert_close(gC, r.plan().detach(), (1e-9, 1e-12), "dV/dC = P")


def _plain_loop(x, y, a, b, eps, n_iter):
    """The eager loop a user writes: autograd straight through every iteration."""
    C = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    la, lb = a.log(), b.log()
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for _ in range(n_iter):
        f = -eps * torch.logsumexp(lb[:, None] + (g[:, None] - C) / eps, -1)
        g = -eps * torch.logsumexp(la[:, :, None] + (f[:, :, None] - C) / eps, 1)
    P = torch.exp(la[:, :, None] + lb[:, None] + (f[:, :, None] + g[:, None] - C) / eps)
    return f, g, (P * C).sum((1, 2)), (a * f).sum(-1) + (b * g).sum(-1) - eps * (P.sum((1, 2)) - a.sum(-1) * b.sum(-1))


def test_unrolled_matches_plain_autograd_loop():
    B, n, m, eps, iters = 2, 6, 5, 0.1, 7
    x, y = points(B, n, 2, seed=31), points(B, m, 2, seed=32)
    a, b = weights(B, n, seed=33), weights(B, m, seed=34)
    wf = logits((B, n), F64, seed=35)
    outs = []
    for impl in ("ours", "plain"):
        xr, ar = x.clone().requires_grad_(), a.clone().requires_grad_()
        if impl == "ours":
            r = fk.sinkhorn(x=xr, y=y, a=ar, b=b, epsilon=eps, max_iter=iters, grad="unrolled")
            f, cost, value = r.f, r.cost, r.value
        else:
            f, _, cost, value = _plain_loop(xr, y, ar, b, eps, iters)
        loss = (f * wf).sum() + cost.sum() + 0.3 * value.sum()
        outs.append((f.detach(), cost.detach(), *torch.autograd.grad(loss, (xr, ar))))
    for o, p, what in zip(outs[0], outs[1], ("f", "cost", "d/dx", "d/da")):
        assert_close(o, p, (1e-10, 1e-12), what)


def test_implicit_matches_unrolled_at_convergence_and_envelope_on_value():
    B, n, m, eps = 2, 6, 5, 0.2
    x, y = points(B, n, 2, seed=36), points(B, m, 2, seed=37)
    a, b = weights(B, n, seed=38), weights(B, m, seed=39)
    wf = centered(logits((B, n), F64, seed=40))  # invariant to the potentials' constant
    grads = {}
    for mode, iters in (("implicit", 20000), ("unrolled", 300), ("envelope", 20000)):
        xr = x.clone().requires_grad_()
        r = fk.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=eps, grad=mode, max_iter=iters, tol=1e-13)
        loss = r.value.sum() + (0 if mode == "envelope" else (r.f * wf).sum())
        grads[mode] = torch.autograd.grad(loss, xr)[0]
    assert_close(grads["implicit"], grads["unrolled"], (1e-6, 1e-8), "implicit vs unrolled")
    xr = x.clone().requires_grad_()
    ri = fk.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=eps, grad="implicit", tol=1e-13,
                    max_iter=20000)
    gi = torch.autograd.grad(ri.value.sum(), xr)[0]
    assert_close(gi, grads["envelope"], (1e-9, 1e-12), "implicit vs envelope on the value")


def test_implicit_unbalanced_matches_finite_differences():
    B, n, m, eps = 1, 5, 4, 0.3
    x, y = points(B, n, 2, seed=41), points(B, m, 2, seed=42)
    wf, wg = logits((B, n), F64, seed=43), logits((B, m), F64, seed=44)
    kw = dict(epsilon=eps, reach=0.5, tol=1e-13, max_iter=50000)

    def loss(x):
        r = fk.sinkhorn(x=x, y=y, grad="implicit", **kw)
        return (r.f * wf).sum() + (r.g * wg).sum()

    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(loss(xr), xr)
    with torch.no_grad():
        assert_close(gx, _fd(lambda: loss(x), x), (1e-5, 1e-7), "implicit d/dx")


def test_fp32_gradients_are_finite_and_in_input_dtype():
    x = points(2, 8, 3, seed=45, dtype=torch.bfloat16).requires_grad_()
    y = points(2, 6, 3, seed=46, dtype=torch.bfloat16)
    r = fk.sinkhorn(x=x, y=y, epsilon=0.1)
    r.value.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# Triton (interpreted on the CPU: small shapes, few iterations)


@needs_triton
@pytest.mark.parametrize("cost_fn", list(COST_KINDS))
def test_triton_lse_matches_torch(cost_fn):
    from fdiv_kernels.triton_kernels.sinkhorn_lse import sinkhorn_lse

    kind = COST_KINDS[cost_fn]
    B, n, m, d = 2, 37, 45, 5  # ragged tiles on both sides, d below the block
    x = points(B, n, d, seed=47, dtype=torch.float32)
    y = points(B, m, d, seed=48, dtype=torch.float32)
    h = logits((B, m), torch.float32, seed=49)
    h[0, 3] = float("-inf")  # a zero-weight point
    ei = torch.tensor([2.0, 5.0])
    out = sinkhorn_lse(x, y, None, h, ei, kind, False, None)
    assert_close(out, lse_torch(x, y, None, h, ei, kind, False), (2e-5, 2e-5), cost_fn)
    skipped = sinkhorn_lse(x, y, None, h, ei, kind, False, torch.tensor([True, False]))
    assert_close(skipped[0], out[0], (0, 0), "active problem")
    assert (skipped[1] == float("-inf")).all()


@needs_triton
@pytest.mark.parametrize("transpose", [False, True])
def test_triton_lse_dense_matches_torch(transpose):
    from fdiv_kernels.triton_kernels.sinkhorn_lse import sinkhorn_lse

    C = logits((2, 33, 40), torch.float32, seed=50).abs().to(torch.bfloat16)
    h = logits((2, 33 if transpose else 40), torch.float32, seed=51)
    ei = torch.tensor([1.0, 3.0])
    assert_close(sinkhorn_lse(None, None, C, h, ei, 0, transpose, None),
                 lse_torch(None, None, C, h, ei, 0, transpose), (2e-5, 2e-5), "dense")


def _assert_solve_matches_torch(backend, dense):
    """One unbalanced fp32 solve on ``backend`` equals the torch backend's, iteration counts too."""
    B, n, m = 3, 20, 24
    x = points(B, n, 4, seed=52, dtype=torch.float32)
    y = points(B, m, 4, seed=53, dtype=torch.float32)
    a = weights(B, n, seed=54, dtype=torch.float32)
    kw = dict(cost=pairwise_cost(x, y, 0)) if dense else dict(x=x, y=y)
    common = dict(a=a, epsilon=0.5, max_iter=6, tol=1e-4, check_every=3, reach=(None, 2.0))
    rb = fk.sinkhorn(**kw, **common, backend=backend)
    rr = fk.sinkhorn(**kw, **common, backend="torch")
    assert torch.equal(rb.n_iter, rr.n_iter)
    for what in ("value", "cost", "f", "g"):
        assert_close(getattr(rb, what), getattr(rr, what), (2e-5, 2e-5), what)


@needs_triton
@pytest.mark.parametrize("dense", [False, True])
def test_triton_solve_matches_torch(dense):
    _assert_solve_matches_torch("triton", dense)


# ---------------------------------------------------------------------------------------------
# The C++ cpu backend (fdiv::sinkhorn_lse_cpu): the torch primitive as the oracle


def _has_cpu_sinkhorn():
    try:
        select("cpu", torch.empty(1), "sinkhorn_fwd")
        return True
    except BackendUnavailableError:
        return False


needs_cpu = pytest.mark.skipif(not _has_cpu_sinkhorn(), reason="cpu sinkhorn ops not built")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cost_fn", list(COST_KINDS))
def test_cpu_lse_matches_torch(cost_fn, dtype):
    kind = COST_KINDS[cost_fn]
    op = torch.ops.fdiv.sinkhorn_lse_cpu
    for B, n, m, d in [(2, 37, 45, 5), (2, 70, 600, 17), (2, 1, 1, 1)]:
        x = points(B, n, d, seed=47, dtype=dtype)
        y = points(B, m, d, seed=48, dtype=dtype)
        h = logits((B, m), dtype, seed=49)
        h[0, 0] = float("-inf")  # a zero-weight point
        h[1] = float("-inf")  # all zero weight: -inf
        ei = torch.tensor([2.0, 5.0], dtype=dtype)
        out = op(x, y, None, h, ei, kind, False, None)
        # fp32: |x|^2 + |y|^2 - 2 x.y cancels, and torch's bmm may sum over d in another order
        # (MKL's path depends on alignment): a few ulps of a cost, times eps_inv = 5.
        tol = 1e-4 if dtype == torch.float32 else 1e-12
        assert_close(out, lse_torch(x, y, None, h, ei, kind, False), (tol, tol), cost_fn)
        assert (out[1] == float("-inf")).all()
        skipped = op(x, y, None, h, ei, kind, False, torch.tensor([True, False]))
        assert_close(skipped[0], out[0], (0, 0), "active problem")
        assert (skipped[1] == float("-inf")).all()


@needs_cpu
@pytest.mark.parametrize("cdtype", [torch.float32, torch.bfloat16, torch.float16, F64])
@pytest.mark.parametrize("transpose", [False, True])
def test_cpu_lse_dense_matches_torch(transpose, cdtype):
    dtype = F64 if cdtype == F64 else torch.float32
    C = logits((2, 33, 40), F64, seed=50).abs().to(cdtype)
    h = logits((2, 33 if transpose else 40), dtype, seed=51)
    h[0, 1] = float("-inf")
    ei = torch.tensor([1.0, 3.0], dtype=dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    assert_close(torch.ops.fdiv.sinkhorn_lse_cpu(None, None, C, h, ei, 0, transpose, None),
                 lse_torch(None, None, C, h, ei, 0, transpose), (tol, tol), "dense")


@needs_cpu
@pytest.mark.parametrize("dense", [False, True])
def test_cpu_solve_matches_torch(dense):
    _assert_solve_matches_torch("cpu", dense)


# ---------------------------------------------------------------------------------------------
# Divergence and SinKD


def test_sinkhorn_divergence_zero_on_identical_and_positive_otherwise():
    x, y = points(3, 10, 2, seed=55), points(3, 8, 2, seed=56)
    kw = dict(epsilon=0.1, tol=1e-11, max_iter=20000)
    s_same = fk.sinkhorn_divergence(x, x.clone(), **kw)
    assert s_same.shape == (3,) and s_same.abs().max() < 1e-9
    s = fk.sinkhorn_divergence(x, y, **kw)
    assert (s > 0).all()
    assert_close(fk.sinkhorn_divergence(x, y, debias=False, **kw),
                 fk.sinkhorn(x=x, y=y, **kw).value, (1e-12, 1e-12), "debias=False")
    su = fk.sinkhorn_divergence(x, x.clone(), reach=1.0, **kw)
    assert su.abs().max() < 1e-9
    xr = x.clone().requires_grad_()
    fk.sinkhorn_divergence(xr, y, **kw).sum().backward()
    assert torch.isfinite(xr.grad).all()


def test_sinkhorn_divergence_matches_geomloss():
    geomloss = pytest.importorskip("geomloss")
    x, y = points(2, 12, 3, seed=57), points(2, 9, 3, seed=58)
    eps = 0.1
    # GeomLoss's p=2 cost is |x - y|^2 / 2 and its blur is eps^(1/p); anneal slowly.
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), scaling=0.999,
                                debias=True, backend="tensorized")
    ref = loss(x, y)
    ours = fk.sinkhorn_divergence(x / math.sqrt(2), y / math.sqrt(2), epsilon=eps, tol=1e-12,
                                 max_iter=20000)
    assert_close(ours, ref, (1e-3, 1e-5), "vs geomloss")


def _sinkd_eager(s, t, T, eps, n_iter):
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t.detach() / T, -1)
    C = (ps[:, None] - pt[None]).abs().sum(-1)
    N = C.shape[0]
    lw = torch.full((N,), -math.log(N), dtype=C.dtype)
    f, g = torch.zeros(N, dtype=C.dtype), torch.zeros(N, dtype=C.dtype)
    for _ in range(n_iter):
        f = -eps * torch.logsumexp(lw[None] + (g[None] - C) / eps, -1)
        g = -eps * torch.logsumexp(lw[:, None] + (f[:, None] - C) / eps, 0)
    P = torch.exp(2 * lw[0] + (f[:, None] + g[None] - C) / eps)
    return (P * C).sum()


def test_sinkd_loss_matches_eager_loop():
    s = logits((8, 5), F64, seed=59).requires_grad_()
    t = logits((8, 5), F64, seed=60)
    crit = fk.nn.SinkhornDistillationLoss(temperature=2.0, epsilon=0.1, n_iter=20)
    loss = crit(s, t)
    (gs,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_()
    ref = _sinkd_eager(s2, t, 2.0, 0.1, 20)
    (gr,) = torch.autograd.grad(ref, s2)
    assert_close(loss, ref, (1e-10, 1e-12), "loss")
    assert_close(gs, gr, (1e-8, 1e-11), "grad")
    with pytest.raises(ValueError, match="same shape"):
        crit(s, t[:4])
