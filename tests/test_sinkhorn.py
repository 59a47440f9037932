"""Batched Sinkhorn: POT (float64) as the oracle, edge cases, bad input, the three gradient modes,
the Triton kernels under TRITON_INTERPRET=1, the divergence and the SinKD loss."""

import importlib
import math

import pytest
import torch

from fdiv_kernels.transport import _solver as core
from fdiv_kernels.dispatch import BackendUnavailableError, select
from reference import logits

# The module, not fk.sinkhorn (the function of the same name once the package exports it).
S = importlib.import_module("fdiv_kernels.transport._sinkhorn")

try:
    import ot
except ImportError:  # POT is optional: its oracle tests skip
    ot = None

needs_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")

try:
    import fdiv_kernels.transport._ops_triton  # noqa: F401  (registers the triton ops)

    select("triton", torch.empty(1), "sinkhorn_fwd")
    HAS_TRITON = True
except (ImportError, BackendUnavailableError):
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton sinkhorn ops unavailable")

F64 = torch.float64


def points(B, n, d, seed, dtype=F64):
    return logits((B, n, d), dtype, seed=seed, scale=1.0)


def weights(B, n, seed, dtype=F64):
    w = logits((B, n), F64, seed=seed).exp()
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def pot_dist(x, y, cost_fn):
    """The cost matrix (n, m) as POT / the definition gives it, float64 numpy."""
    x, y = x.to(F64), y.to(F64)
    if cost_fn == "sqeuclidean":
        return ot.dist(x.numpy(), y.numpy())
    if cost_fn == "euclidean":
        return ot.dist(x.numpy(), y.numpy(), metric="euclidean")
    if cost_fn == "l1":
        return ot.dist(x.numpy(), y.numpy(), metric="cityblock")
    if cost_fn == "dot":
        return -(x @ y.T).numpy()
    xn, yn = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    return (1 - xn @ yn.T).numpy()


def kl(p, q):
    import numpy as np

    p, q = np.asarray(p), np.asarray(q)
    return float((np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0) - p + q).sum())


def centered(t):
    return t - t.mean(-1, keepdim=True)


def assert_close(a, b, rtol, atol, what=""):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# POT as the oracle


@needs_pot
@pytest.mark.parametrize("cost_fn", list(core.COST_KINDS))
def test_balanced_points_match_pot(cost_fn):
    B, n, m, d, eps = 3, 9, 7, 3, 0.1
    x, y = points(B, n, d, seed=1), points(B, m, d, seed=2)
    a, b = weights(B, n, seed=3), weights(B, m, seed=4)
    r = S.sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, cost_fn=cost_fn, tol=1e-12, max_iter=20000)
    assert r.converged.all()
    P = r.plan()
    for k in range(B):
        M = pot_dist(x[k], y[k], cost_fn)
        G, log = ot.sinkhorn(a[k].numpy(), b[k].numpy(), M, eps, method="sinkhorn_log",
                             stopThr=1e-14, numItermax=100000, log=True)
        G = torch.from_numpy(G)
        assert_close(P[k], G, 1e-7, 1e-10, "plan")
        assert_close(r.cost[k], (torch.from_numpy(M) * G).sum(), 1e-8, 1e-10, "cost")
        value = float((torch.from_numpy(M) * G).sum()) + eps * kl(
            G.numpy(), torch.outer(a[k], b[k]).numpy())
        assert_close(r.value[k], value, 1e-8, 1e-10, "value")
        # POT's log-scalings: P = diag(u) K diag(v), so eps log u = f + eps log a + constant.
        fu = torch.from_numpy(log["log_u"]) * eps
        gv = torch.from_numpy(log["log_v"]) * eps
        assert_close(centered(r.f[k] + eps * a[k].log()), centered(fu), 1e-6, 1e-8, "f")
        assert_close(centered(r.g[k] + eps * b[k].log()), centered(gv), 1e-6, 1e-8, "g")


@needs_pot
def test_dense_unbatched_and_low_precision_cost_match_pot():
    n, m, eps = 8, 11, 0.05
    x, y = points(1, n, 4, seed=5)[0], points(1, m, 4, seed=6)[0]
    M = torch.from_numpy(pot_dist(x, y, "sqeuclidean"))
    G = torch.from_numpy(ot.sinkhorn2(torch.full((n,), 1 / n, dtype=F64).numpy(),
                                      torch.full((m,), 1 / m, dtype=F64).numpy(), M.numpy(), eps,
                                      method="sinkhorn_log", stopThr=1e-14, numItermax=100000,
                                      log=False)[None])
    r = S.sinkhorn(cost=M, epsilon=eps, tol=1e-12, max_iter=20000)
    assert r.f.shape == (n,) and r.g.shape == (m,) and r.value.shape == ()
    assert r.plan().shape == (n, m)
    assert_close(r.cost, G[0], 1e-8, 1e-10, "cost")
    # fp32 / bf16 cost storage, fp32 accumulation: the same problem to fp32 accuracy.
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        r32 = S.sinkhorn(cost=M.to(dt), epsilon=eps, tol=1e-5)
        assert r32.f.dtype == torch.float32
        assert_close(r32.cost, G[0], tol, 1e-5, f"cost {dt}")


@needs_pot
@pytest.mark.parametrize("reach", [0.5, (0.3, 2.0)])
@pytest.mark.parametrize("dense", [False, True])
def test_unbalanced_matches_pot(reach, dense):
    B, n, m, eps = 2, 8, 6, 0.1
    x, y = points(B, n, 2, seed=7), points(B, m, 2, seed=8)
    a, b = weights(B, n, seed=9) * 1.5, weights(B, m, seed=10)  # different masses
    rho_a, rho_b = (reach, reach) if not isinstance(reach, tuple) else reach
    C = torch.stack([torch.from_numpy(pot_dist(x[k], y[k], "sqeuclidean")) for k in range(B)])
    kw = dict(cost=C) if dense else dict(x=x, y=y)
    r = S.sinkhorn(**kw, a=a, b=b, epsilon=eps, reach=reach, tol=1e-12, max_iter=20000)
    assert r.converged.all()
    P = r.plan()
    for k in range(B):
        G = ot.unbalanced.sinkhorn_unbalanced(
            a[k].numpy(), b[k].numpy(), C[k].numpy(), eps, (rho_a, rho_b), method="sinkhorn",
            reg_type="kl", stopThr=1e-15, numItermax=100000)
        G = torch.from_numpy(G)
        assert_close(P[k], G, 1e-6, 1e-10, "plan")
        Gn = G.numpy()
        value = (float((C[k] * G).sum()) + eps * kl(Gn, torch.outer(a[k], b[k]).numpy())
                 + rho_a * kl(Gn.sum(1), a[k].numpy()) + rho_b * kl(Gn.sum(0), b[k].numpy()))
        assert_close(r.value[k], value, 1e-6, 1e-9, "value")
        assert_close(r.cost[k], (C[k] * G).sum(), 1e-6, 1e-9, "cost")


@needs_pot
def test_zero_weights_exclude_points_exactly():
    n, m, eps = 7, 6, 0.1
    x, y = points(1, n, 2, seed=11), points(1, m, 2, seed=12)
    a, b = weights(1, n, seed=13), weights(1, m, seed=14)
    a[0, [1, 4]] = 0
    b[0, 2] = 0
    a, b = a / a.sum(), b / b.sum()
    x[0, 1] = 1e3  # a far point with zero weight must not matter at all
    r = S.sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, tol=1e-12, max_iter=20000)
    ka, kb = a[0] > 0, b[0] > 0
    M = pot_dist(x[0][ka], y[0][kb], "sqeuclidean")
    G = torch.from_numpy(ot.sinkhorn(a[0][ka].numpy(), b[0][kb].numpy(), M, eps,
                                     method="sinkhorn_log", stopThr=1e-14, numItermax=100000))
    P = r.plan()[0]
    assert torch.isfinite(r.f).all() and torch.isfinite(r.g).all()
    assert (P[~ka] == 0).all() and (P[:, ~kb] == 0).all()
    assert_close(P[ka][:, kb], G, 1e-7, 1e-10, "plan")
    assert_close(r.cost[0], (torch.from_numpy(M) * G).sum(), 1e-8, 1e-10, "cost")


# ---------------------------------------------------------------------------------------------
# Solver behaviour


def test_batched_equals_one_by_one_and_per_problem_stopping():
    B, n, m, eps = 4, 10, 12, 0.05
    x, y = points(B, n, 3, seed=15), points(B, m, 3, seed=16)
    y[0] = y[0] * 4  # a harder problem next to easy ones
    r = S.sinkhorn(x=x, y=y, epsilon=eps, tol=1e-9, max_iter=5000, check_every=5)
    assert r.converged.all()
    assert len(set(r.n_iter.tolist())) > 1  # problems stopped at their own iteration
    for k in range(B):
        rk = S.sinkhorn(x=x[k], y=y[k], epsilon=eps, tol=1e-9, max_iter=5000, check_every=5)
        assert int(rk.n_iter) == int(r.n_iter[k])
        assert_close(rk.value, r.value[k], 1e-12, 1e-12, "value")


def test_non_converged_is_reported():
    x, y = points(2, 16, 2, seed=17), points(2, 16, 2, seed=18)
    r = S.sinkhorn(x=x, y=y, epsilon=1e-3, max_iter=3, tol=1e-9)
    assert not r.converged.any()
    assert (r.marginal_error > 1e-9).all()
    assert (r.n_iter == 3).all()


def test_warm_start_scaling_and_symmetric_reach_the_same_solution():
    x, y = points(2, 12, 2, seed=19), points(2, 10, 2, seed=20)
    kw = dict(x=x, y=y, epsilon=0.05, tol=1e-10, max_iter=20000)
    ref = S.sinkhorn(**kw)
    assert ref.converged.all()
    warm = S.sinkhorn(**kw, init=(ref.f, ref.g))
    assert (warm.n_iter == 0).all()  # converged at the first check
    scaled = S.sinkhorn(**kw, scaling=0.5)
    assert scaled.converged.all() and (scaled.n_iter < ref.n_iter).all()
    sym = S.sinkhorn(**kw, symmetric=True)
    for r in (warm, scaled, sym):
        assert_close(r.value, ref.value, 1e-8, 1e-10, "value")
        assert_close(r.plan(), ref.plan(), 1e-6, 1e-9, "plan")


@pytest.mark.parametrize("cost_fn", ["sqeuclidean", "euclidean", "cosine"])
def test_tiny_epsilon_fp32_is_finite(cost_fn):
    x, y = points(2, 32, 4, seed=21, dtype=torch.float32), points(2, 24, 4, seed=22,
                                                                   dtype=torch.float32)
    C = core.pairwise_cost(x, y, core.COST_KINDS[cost_fn])
    eps = 1e-4 * float(C.median())
    r = S.sinkhorn(x=x, y=y, cost_fn=cost_fn, epsilon=eps, max_iter=50, tol=1e-5)
    for t in (r.value, r.cost, r.f, r.g, r.marginal_error, r.plan()):
        assert torch.isfinite(t).all()
    assert torch.isfinite(r.plan()).all() and (r.plan() >= 0).all()


def test_identical_single_point_and_constant_cost():
    x = points(1, 10, 3, seed=23, dtype=torch.float32)
    r = S.sinkhorn(x=x, y=x.clone(), epsilon=1e-3, max_iter=2000, tol=1e-5, scaling=0.5)
    assert torch.isfinite(r.value).all() and r.cost.abs().max() < 1e-3
    one = S.sinkhorn(x=x[:, :1], y=x, epsilon=0.1)
    assert one.converged.all() and one.n_iter.max() <= 10  # the first check after iteration 0
    assert_close(one.plan()[0, 0], torch.full((10,), 0.1), 1e-6, 1e-7, "single point plan")
    flat = S.sinkhorn(cost=torch.full((2, 5, 4), 3.0), epsilon=0.01)
    assert flat.converged.all()
    assert_close(flat.plan(), torch.full((2, 5, 4), 0.05), 1e-6, 1e-7, "uniform plan")
    assert_close(flat.cost, torch.full((2,), 3.0), 1e-6, 1e-6, "cost")


def test_bad_input_errors():
    x, y = points(2, 5, 3, seed=24), points(2, 4, 3, seed=25)
    a = torch.full((2, 5), 0.2, dtype=F64)
    with pytest.raises(ValueError, match="non-negative"):
        S.sinkhorn(x=x, y=y, a=a - 0.3)
    with pytest.raises(ValueError, match="sum to 1"):
        S.sinkhorn(x=x, y=y, a=a * 2)
    S.sinkhorn(x=x, y=y, a=a * 2, reach=1.0)  # unbalanced: any positive mass
    with pytest.raises(ValueError, match="shape"):
        S.sinkhorn(x=x, y=y, a=a[:, :4])
    with pytest.raises(ValueError, match="point dimension"):
        S.sinkhorn(x=x, y=y[..., :2])
    with pytest.raises(ValueError, match="batch size"):
        S.sinkhorn(x=x, y=y[:1])
    with pytest.raises(ValueError, match="epsilon"):
        S.sinkhorn(x=x, y=y, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        S.sinkhorn(x=x, y=y, epsilon=-1.0)
    with pytest.raises(ValueError, match="cost_fn"):
        S.sinkhorn(x=x, y=y, cost_fn="mahalanobis")
    with pytest.raises(ValueError, match="not both"):
        S.sinkhorn(cost=torch.rand(2, 5, 4), x=x, y=y)
    with pytest.raises(ValueError, match="cost, or both"):
        S.sinkhorn(x=x)
    with pytest.raises(ValueError, match="grad"):
        S.sinkhorn(x=x, y=y, grad="magic")
    with pytest.raises(ValueError, match="scaling"):
        S.sinkhorn(x=x, y=y, scaling=1.5)
    with pytest.raises(ValueError, match="reach"):
        S.sinkhorn(x=x, y=y, reach=-1.0)
    with pytest.raises(TypeError, match="cost"):
        S.sinkhorn(cost=torch.ones(2, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="init"):
        S.sinkhorn(x=x, y=y, init=(torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)))
    with pytest.raises(ValueError, match="backend"):
        S.sinkhorn(x=x, y=y, backend="tpu")


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
        return (S.sinkhorn(x=x, y=y, a=a, b=b, **kw).value * w).sum()

    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    ar = a.clone().requires_grad_() if reach is not None else a
    gx, gy, *ga = torch.autograd.grad(loss(xr, yr, ar, b), [xr, yr] + ([ar] if reach else []))
    with torch.no_grad():
        assert_close(gx, _fd(lambda: loss(x, y, a, b), x), 1e-5, 1e-7, "d/dx")
        assert_close(gy, _fd(lambda: loss(x, y, a, b), y), 1e-5, 1e-7, "d/dy")
        if reach is not None:
            assert_close(ga[0], _fd(lambda: loss(x, y, a, b), a), 1e-5, 1e-7, "d/da")


def test_envelope_gradient_wrt_dense_cost_is_the_plan():
    C = logits((2, 4, 6), F64, seed=30).abs()
    C.requires_grad_()
    r = S.sinkhorn(cost=C, epsilon=0.1, tol=1e-12, max_iter=20000)
    (gC,) = torch.autograd.grad(r.value.sum(), C)
    assert_close(gC, r.plan().detach(), 1e-9, 1e-12, "dV/dC = P")


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
            r = S.sinkhorn(x=xr, y=y, a=ar, b=b, epsilon=eps, max_iter=iters, grad="unrolled")
            f, cost, value = r.f, r.cost, r.value
        else:
            f, _, cost, value = _plain_loop(xr, y, ar, b, eps, iters)
        loss = (f * wf).sum() + cost.sum() + 0.3 * value.sum()
        outs.append((f.detach(), cost.detach(), *torch.autograd.grad(loss, (xr, ar))))
    for o, p, what in zip(outs[0], outs[1], ("f", "cost", "d/dx", "d/da")):
        assert_close(o, p, 1e-10, 1e-12, what)


def test_implicit_matches_unrolled_at_convergence_and_envelope_on_value():
    B, n, m, eps = 2, 6, 5, 0.2
    x, y = points(B, n, 2, seed=36), points(B, m, 2, seed=37)
    a, b = weights(B, n, seed=38), weights(B, m, seed=39)
    wf = centered(logits((B, n), F64, seed=40))  # invariant to the potentials' constant
    grads = {}
    for mode, iters in (("implicit", 20000), ("unrolled", 300), ("envelope", 20000)):
        xr = x.clone().requires_grad_()
        r = S.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=eps, grad=mode, max_iter=iters, tol=1e-13)
        loss = r.value.sum() + (0 if mode == "envelope" else (r.f * wf).sum())
        grads[mode] = torch.autograd.grad(loss, xr)[0]
    assert_close(grads["implicit"], grads["unrolled"], 1e-6, 1e-8, "implicit vs unrolled")
    xr = x.clone().requires_grad_()
    ri = S.sinkhorn(x=xr, y=y, a=a, b=b, epsilon=eps, grad="implicit", tol=1e-13,
                    max_iter=20000)
    gi = torch.autograd.grad(ri.value.sum(), xr)[0]
    assert_close(gi, grads["envelope"], 1e-9, 1e-12, "implicit vs envelope on the value")


def test_implicit_unbalanced_matches_finite_differences():
    B, n, m, eps = 1, 5, 4, 0.3
    x, y = points(B, n, 2, seed=41), points(B, m, 2, seed=42)
    wf, wg = logits((B, n), F64, seed=43), logits((B, m), F64, seed=44)
    kw = dict(epsilon=eps, reach=0.5, tol=1e-13, max_iter=50000)

    def loss(x):
        r = S.sinkhorn(x=x, y=y, grad="implicit", **kw)
        return (r.f * wf).sum() + (r.g * wg).sum()

    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(loss(xr), xr)
    with torch.no_grad():
        assert_close(gx, _fd(lambda: loss(x), x), 1e-5, 1e-7, "implicit d/dx")


def test_fp32_gradients_are_finite_and_in_input_dtype():
    x = points(2, 8, 3, seed=45, dtype=torch.bfloat16).requires_grad_()
    y = points(2, 6, 3, seed=46, dtype=torch.bfloat16)
    r = S.sinkhorn(x=x, y=y, epsilon=0.1)
    r.value.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# Triton (interpreted on the CPU: small shapes, few iterations)


@needs_triton
@pytest.mark.parametrize("cost_fn", list(core.COST_KINDS))
def test_triton_lse_matches_torch(cost_fn):
    from fdiv_kernels.triton_kernels.sinkhorn_lse import sinkhorn_lse

    kind = core.COST_KINDS[cost_fn]
    B, n, m, d = 2, 37, 45, 5  # ragged tiles on both sides, d below the block
    x = points(B, n, d, seed=47, dtype=torch.float32)
    y = points(B, m, d, seed=48, dtype=torch.float32)
    h = logits((B, m), torch.float32, seed=49)
    h[0, 3] = float("-inf")  # a zero-weight point
    ei = torch.tensor([2.0, 5.0])
    out = sinkhorn_lse(x, y, None, h, ei, kind, False, None)
    assert_close(out, core.lse_torch(x, y, None, h, ei, kind, False), 2e-5, 2e-5, cost_fn)
    skipped = sinkhorn_lse(x, y, None, h, ei, kind, False, torch.tensor([True, False]))
    assert_close(skipped[0], out[0], 0, 0, "active problem")
    assert (skipped[1] == float("-inf")).all()


@needs_triton
@pytest.mark.parametrize("transpose", [False, True])
def test_triton_lse_dense_matches_torch(transpose):
    from fdiv_kernels.triton_kernels.sinkhorn_lse import sinkhorn_lse

    C = logits((2, 33, 40), torch.float32, seed=50).abs().to(torch.bfloat16)
    h = logits((2, 33 if transpose else 40), torch.float32, seed=51)
    ei = torch.tensor([1.0, 3.0])
    assert_close(sinkhorn_lse(None, None, C, h, ei, 0, transpose, None),
                 core.lse_torch(None, None, C, h, ei, 0, transpose), 2e-5, 2e-5, "dense")


def _assert_solve_matches_torch(backend, dense):
    """One unbalanced fp32 solve on ``backend`` equals the torch backend's, iteration counts too."""
    B, n, m = 3, 20, 24
    x = points(B, n, 4, seed=52, dtype=torch.float32)
    y = points(B, m, 4, seed=53, dtype=torch.float32)
    a = weights(B, n, seed=54, dtype=torch.float32)
    kw = dict(cost=core.pairwise_cost(x, y, 0)) if dense else dict(x=x, y=y)
    common = dict(a=a, epsilon=0.5, max_iter=6, tol=1e-4, check_every=3, reach=(None, 2.0))
    rb = S.sinkhorn(**kw, **common, backend=backend)
    rr = S.sinkhorn(**kw, **common, backend="torch")
    assert torch.equal(rb.n_iter, rr.n_iter)
    for what in ("value", "cost", "f", "g"):
        assert_close(getattr(rb, what), getattr(rr, what), 2e-5, 2e-5, what)


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
@pytest.mark.parametrize("cost_fn", list(core.COST_KINDS))
def test_cpu_lse_matches_torch(cost_fn, dtype):
    kind = core.COST_KINDS[cost_fn]
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
        assert_close(out, core.lse_torch(x, y, None, h, ei, kind, False), tol, tol, cost_fn)
        assert (out[1] == float("-inf")).all()
        skipped = op(x, y, None, h, ei, kind, False, torch.tensor([True, False]))
        assert_close(skipped[0], out[0], 0, 0, "active problem")
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
                 core.lse_torch(None, None, C, h, ei, 0, transpose), tol, tol, "dense")


@needs_cpu
@pytest.mark.parametrize("dense", [False, True])
def test_cpu_solve_matches_torch(dense):
    _assert_solve_matches_torch("cpu", dense)


# ---------------------------------------------------------------------------------------------
# Divergence and SinKD


def test_sinkhorn_divergence_zero_on_identical_and_positive_otherwise():
    x, y = points(3, 10, 2, seed=55), points(3, 8, 2, seed=56)
    kw = dict(epsilon=0.1, tol=1e-11, max_iter=20000)
    s_same = S.sinkhorn_divergence(x, x.clone(), **kw)
    assert s_same.shape == (3,) and s_same.abs().max() < 1e-9
    s = S.sinkhorn_divergence(x, y, **kw)
    assert (s > 0).all()
    assert_close(S.sinkhorn_divergence(x, y, debias=False, **kw),
                 S.sinkhorn(x=x, y=y, **kw).value, 1e-12, 1e-12, "debias=False")
    su = S.sinkhorn_divergence(x, x.clone(), reach=1.0, **kw)
    assert su.abs().max() < 1e-9
    xr = x.clone().requires_grad_()
    S.sinkhorn_divergence(xr, y, **kw).sum().backward()
    assert torch.isfinite(xr.grad).all()


def test_sinkhorn_divergence_matches_geomloss():
    geomloss = pytest.importorskip("geomloss")
    x, y = points(2, 12, 3, seed=57), points(2, 9, 3, seed=58)
    eps = 0.1
    # GeomLoss's p=2 cost is |x - y|^2 / 2 and its blur is eps^(1/p); anneal slowly.
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), scaling=0.999,
                                debias=True, backend="tensorized")
    ref = loss(x, y)
    ours = S.sinkhorn_divergence(x / math.sqrt(2), y / math.sqrt(2), epsilon=eps, tol=1e-12,
                                 max_iter=20000)
    assert_close(ours, ref, 1e-3, 1e-5, "vs geomloss")


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
    crit = S.SinkhornDistillationLoss(temperature=2.0, epsilon=0.1, n_iter=20)
    loss = crit(s, t)
    (gs,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_()
    ref = _sinkd_eager(s2, t, 2.0, 0.1, 20)
    (gr,) = torch.autograd.grad(ref, s2)
    assert_close(loss, ref, 1e-10, 1e-12, "loss")
    assert_close(gs, gr, 1e-8, 1e-11, "grad")
    with pytest.raises(ValueError, match="same shape"):
        crit(s, t[:4])
