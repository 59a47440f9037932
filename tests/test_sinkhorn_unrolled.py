"""grad="unrolled" on the CPU: the fused C++ forward + backward (csrc/cpu/sinkhorn_unrolled.cpp)
against the checkpointed torch loop it replaces (``backend="torch"``, the spec), float64 unless
stated; float64 gradcheck; fp32 / bf16 inputs; the SinKD loss against a plain eager loop."""

import math

import pytest
import torch
from helpers import F64, assert_close, points
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels.core._dispatch import BackendUnavailableError, select
from fdiv_kernels.transport import _dual, _registry, _unrolled
from fdiv_kernels.transport._costs import COST_KINDS, pairwise_cost

try:
    select("cpu", torch.empty(1), "sinkhorn_fwd")
    assert _registry.ops_for("cpu").unrolled_fwd is not None
except (BackendUnavailableError, ImportError, AssertionError) as e:  # not built
    pytest.skip(f"the cpu backend's unrolled op is unavailable: {e}", allow_module_level=True)


def weights(B, n, seed, zero=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, n, generator=g, dtype=F64) + 0.2
    for idx in zero:
        w[idx] = 0.0
    return w / w.sum(-1, keepdim=True)


def run(backend, src, a, b, wants, seed=0, **kw):
    """Outputs and gradients of a random linear form of (value, cost, f, g) w.r.t. ``wants``."""
    leaves = {k: v.detach().clone().requires_grad_(k in wants) for k, v in src.items()}
    la = a.clone().requires_grad_("a" in wants)
    lb = b.clone().requires_grad_("b" in wants)
    r = fk.sinkhorn(**leaves, a=la, b=lb, grad="unrolled", tol=0.0, backend=backend, **kw)
    if backend == "cpu":  # routed to the fused op (through a select for an unbatched call)
        fn = r.value.grad_fn
        fn = fn if src[next(iter(src))].dim() == 3 else fn.next_functions[0][0]
        assert type(fn).__name__ == "UnrolledFunctionBackward"
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(t.shape, generator=g, dtype=F64) for t in (r.value, r.cost, r.f, r.g)]
    loss = sum((wi * t.double()).sum() for wi, t in zip(w, (r.value, r.cost, r.f, r.g)))
    ins = [leaves[k] for k in wants if k in leaves] + [t for k, t in (("a", la), ("b", lb))
                                                       if k in wants]
    grads = torch.autograd.grad(loss, ins)
    outs = {"value": r.value, "cost": r.cost, "f": r.f, "g": r.g, "err": r.marginal_error}
    names = [k for k in wants if k in leaves] + [k for k in ("a", "b") if k in wants]
    outs.update({f"d/d{k}": d for k, d in zip(names, grads)})
    return outs


def compare(src, a, b, wants, rtol=1e-9, atol=1e-11, skip=(), **kw):
    ours, ref = run("cpu", src, a, b, wants, **kw), run("torch", src, a, b, wants, **kw)
    for k in ours:
        if k not in skip:
            assert_close(ours[k], ref[k], (rtol, atol), k)
    return ours, ref


# Odd sizes (no vector width divides them), and the degenerate n = 1 / m = 1.
SHAPES = [(3, 7, 5, 3), (2, 1, 6, 2), (2, 6, 1, 3)]


@pytest.mark.parametrize("cost_fn", list(COST_KINDS))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reach", [None, (1.0, 0.5)])
def test_points_match_torch_loop(cost_fn, symmetric, reach):
    B, n, m, d = SHAPES[0]
    x, y = points(B, n, d, 1), points(B, m, d, 2) + 0.3
    eps = 0.5 if cost_fn == "sqeuclidean" else 0.2
    compare({"x": x, "y": y}, weights(B, n, 3), weights(B, m, 4), ("x", "y", "a", "b"),
            cost_fn=cost_fn, epsilon=eps, max_iter=6, symmetric=symmetric, reach=reach)


@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "n1", "m1"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dense_cost_and_sizes_match_torch_loop(shape, symmetric):
    B, n, m, d = shape
    cost = pairwise_cost(points(B, n, d, 5), points(B, m, d, 6), 0)
    compare({"cost": cost}, weights(B, n, 7), weights(B, m, 8), ("cost", "a", "b"),
            epsilon=0.3, max_iter=5, symmetric=symmetric)
    compare({"x": points(B, n, d, 5), "y": points(B, m, d, 6)}, weights(B, n, 7),
            weights(B, m, 8), ("x", "y"), epsilon=0.3, max_iter=5, symmetric=symmetric,
            reach=0.7)


def test_zero_iterations_unbatched_and_noncontiguous():
    x, y = points(1, 5, 2, 9)[0], points(1, 4, 2, 10)[0]
    compare({"x": x, "y": y}, weights(1, 5, 11)[0], weights(1, 4, 12)[0], ("x", "y", "a"),
            epsilon=0.4, max_iter=0)
    cost = pairwise_cost(points(2, 6, 3, 13), points(2, 5, 3, 14), 2).transpose(1, 2)
    # (a dense cost is used as given: cost_fn would be rejected, it applies to points)
    compare({"cost": cost}, weights(2, 5, 15), weights(2, 6, 16), ("cost", "b"), epsilon=0.3,
            max_iter=4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_weights(symmetric):
    """Zero-weight points: everything as the torch loop, except d/da at a zero weight, where
    the loop's log(a) branch cuts the iterations' term; ours is the one-sided derivative."""
    B, n, m, d = 2, 6, 5, 2
    x, y = points(B, n, d, 17), points(B, m, d, 18)
    a, b = weights(B, n, 19, zero=[(0, 2), (1, 5)]), weights(B, m, 20, zero=[(1, 0)])
    ours, ref = compare({"x": x, "y": y}, a, b, ("x", "y", "a", "b"), skip=("d/da", "d/db"),
                        epsilon=0.3, max_iter=5, symmetric=symmetric)
    assert_close(ours["d/da"][a > 0], ref["d/da"][a > 0], (1e-9, 1e-11), "d/da (a > 0)")
    assert_close(ours["d/db"][b > 0], ref["d/db"][b > 0], (1e-9, 1e-11), "d/db (b > 0)")

    def lin(av):
        return _unrolled.fused("cpu", x, y, None, av, b, None, None, 0.3, 0, 0.0, 0.0, 5, symmetric)[1]

    ar = a.clone().requires_grad_()
    (da,) = torch.autograd.grad(lin(ar).sum(), ar)
    h = 1e-7
    for i, j in ((0, 2), (1, 5)):
        ap = a.clone()
        ap[i, j] = h
        fd = (lin(ap)[i] - lin(a)[i]) / h
        assert_close(da[i, j], fd, (1e-5, 1e-8), f"one-sided d/da at a zero weight {(i, j)}")


def test_warm_start_gradients_match_torch_loop():
    B, n, m = 2, 5, 4
    x, y = points(B, n, 3, 21), points(B, m, 3, 22)
    a, b = weights(B, n, 23), weights(B, m, 24)
    f0, g0 = logits((B, n), F64, seed=25, scale=0.3), logits((B, m), F64, seed=26, scale=0.3)
    for symmetric in (False, True):
        outs = []
        for impl in ("ours", "loop"):
            fr, gr = f0.clone().requires_grad_(), g0.clone().requires_grad_()
            if impl == "ours":
                _, lin, f, g, _ = _unrolled.fused("cpu", x, y, None, a, b, fr, gr, 0.3, 0, 0.0, 0.0, 4,
                                               symmetric)
            else:
                f, g = _unrolled.loop(x, y, None, a, b, 0.3, 0, 0.0, 0.0, 4, fr, gr, symmetric)
                lin = _dual.plan_totals(x, y, None, a, b, f, g, 0.3, 0)[1]
            loss = lin.sum() + (f * torch.arange(n)).sum() + g[:, 0].sum()
            outs.append(torch.autograd.grad(loss, (fr, gr), allow_unused=True))
        for o, r, what in zip(*outs, ("d/df0", "d/dg0")):
            assert_close(o, torch.zeros_like(o) if r is None else r, (1e-9, 1e-11), what)
    r = fk.sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.3, max_iter=3, grad="unrolled", init=(f0, g0))
    rt = fk.sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.3, max_iter=3, grad="unrolled",
                    init=(f0, g0), backend="torch")
    assert_close(r.f, rt.f, (1e-10, 1e-12), "warm-started f")


@pytest.mark.parametrize("case", ["points-alternating", "points-symmetric-unbalanced",
                                  "dense-l1"])
def test_gradcheck(case):
    B, n, m, d = 2, 3, 4, 2
    x, y = points(B, n, d, 27), points(B, m, d, 28) + 0.5
    a, b = weights(B, n, 29), weights(B, m, 30)
    f0, g0 = 0.1 * points(B, n, 1, 31)[..., 0], 0.1 * points(B, m, 1, 32)[..., 0]
    sym, rho, kind = case == "points-symmetric-unbalanced", 0.0, 0
    if sym:
        rho = 0.8
    leaves = [t.clone().requires_grad_() for t in (x, y, a, b, f0, g0)]
    if case == "dense-l1":
        kind = 2
        cost = pairwise_cost(x, y, 2).requires_grad_()

        def fn(cost, a, b, f0, g0):
            return _unrolled.fused("cpu", None, None, cost, a, b, f0, g0, 0.4, kind, rho,
                                             rho, 3, sym)[:4]
        inputs = [cost] + leaves[2:]
    else:
        def fn(x, y, a, b, f0, g0):
            return _unrolled.fused("cpu", x, y, None, a, b, f0, g0, 0.4, kind, rho, rho, 3,
                                             sym)[:4]
        inputs = leaves
    assert torch.autograd.gradcheck(fn, inputs)


def test_fp32_and_bf16_inputs():
    """Inputs rounded to the dtype, fp32 arithmetic, against the float64 loop on the same rounded
    inputs: gradients within 2e-4 (fp32; the torch loop in fp32 is at 2e-5) or 1e-2 (bf16, which
    they are returned in) of their largest entry; cost and value within 2e-5."""
    B, n, m, d = 3, 9, 7, 3
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 1e-2)):
        x, y = points(B, n, d, 33, dtype), points(B, m, d, 34, dtype)
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        r = fk.sinkhorn(x=xr, y=yr, cost_fn="l1", epsilon=0.1, max_iter=20, grad="unrolled")
        assert r.value.dtype == torch.float32
        gx, gy = torch.autograd.grad(r.cost.sum() + r.value.sum(), (xr, yr))
        assert gx.dtype == dtype and gy.dtype == dtype
        x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
        r64 = fk.sinkhorn(x=x64, y=y64, cost_fn="l1", epsilon=0.1, max_iter=20, grad="unrolled",
                         backend="torch")
        g64 = torch.autograd.grad(r64.cost.sum() + r64.value.sum(), (x64, y64))
        assert_close(r.cost, r64.cost, (2e-5, 1e-7), f"{dtype} cost")
        assert_close(r.value, r64.value, (2e-5, 1e-7), f"{dtype} value")
        for ours, ref, what in ((gx, g64[0], "d/dx"), (gy, g64[1], "d/dy")):
            assert_close(ours, ref, (0.0, tol * float(ref.abs().max())), f"{dtype} {what}")


def test_tape_is_linear_in_iterations():
    B, n, m, K = 2, 6, 5, 7
    x, y = points(B, n, 3, 35), points(B, m, 3, 36)
    a, b = weights(B, n, 37), weights(B, m, 38)
    args = (x, y, None, a, b, None, None, 0.3, 0, 0.0, 0.0, K, False)
    tape = torch.ops.fdiv.sinkhorn_unrolled_fwd_cpu(*args)[5]
    # Potentials and both LSEs per iteration: O(n_iter B (n + m)), no (B, n, m) per iteration.
    assert tuple(tape.shape) == (B, (2 * K + 1) * (n + m))


def test_double_backward_raises():
    x = points(1, 4, 2, 39).requires_grad_()
    r = fk.sinkhorn(x=x, y=points(1, 3, 2, 40), max_iter=3, grad="unrolled")
    (gx,) = torch.autograd.grad(r.cost.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------
# SinKD


def sinkd_eager(s, t, T=2.0, eps=0.1, n_iter=20):
    """The loop SinKD is written as: L1 cost between the softened rows, uniform marginals,
    alternating log-domain updates, loss <C, P>."""
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t.detach() / T, -1)
    C = torch.cdist(ps, pt, p=1)
    N = C.shape[0]
    lw = torch.full((N,), -math.log(N), dtype=C.dtype)
    f, g = torch.zeros(N, dtype=C.dtype), torch.zeros(N, dtype=C.dtype)
    for _ in range(n_iter):
        f = -eps * torch.logsumexp(lw[None] + (g[None] - C) / eps, 1)
        g = -eps * torch.logsumexp(lw[:, None] + (f[:, None] - C) / eps, 0)
    P = torch.exp(lw[:, None] + lw[None] + (f[:, None] + g[None] - C) / eps)
    return (P * C).sum()


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_sinkd_matches_eager_loop(dtype, tol):
    """Loss within tol (relative), gradient within tol of its largest entry (fp32: measured
    2e-7 and 7e-7), against the eager loop in float64 on the same logits."""
    s = logits((32, 3), dtype, seed=41).requires_grad_()
    t = logits((32, 3), dtype, seed=42)
    crit = fk.nn.SinkhornDistillationLoss(temperature=2.0, epsilon=0.1, n_iter=20)
    loss = crit(s, t)
    assert loss.grad_fn is not None and loss.dim() == 0
    (gs,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = sinkd_eager(s64, t.double())
    (gr,) = torch.autograd.grad(ref, s64)
    assert_close(loss, ref, (tol, 0.0), "loss")
    assert_close(gs, gr, (0.0, tol * float(gr.abs().max())), "d/dstudent")
    # The torch-backend path (the general sinkhorn() call) agrees too, and 3-D logits flatten.
    s3 = s.detach().reshape(4, 8, 3).requires_grad_()
    lt = fk.nn.SinkhornDistillationLoss(backend="torch")(s3, t.reshape(4, 8, 3))
    assert_close(lt, ref, (tol, 0.0), "loss, backend=torch")
