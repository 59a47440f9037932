"""soft_ce, renyi and cauchy_schwarz against the float64 reference on every backend that runs them:
values and gradients, odd V, -inf logits, disjoint supports, alpha near 1 and above, ignored rows,
gradcheck, the logit transforms of the Cauchy-Schwarz op, and the ops that must refuse them."""

import math
import zlib

import pytest
import torch
from conftest import BACKENDS, DTYPES, GRAD_TOL, LOSS_TOL
from helpers import assert_close, available_backends, grad_tol
from reference import divergence_rows, divergence_with_grads, logits

import fdiv_kernels as fk
from fdiv_kernels.core import _dispatch as dispatch
from fdiv_kernels import phases
from fdiv_kernels.divergences._row_kinds import CAUCHY_SCHWARZ_COEFFS

ROW_BACKENDS = available_backends("lse_combination_fwd")
F64_BACKENDS = [b for b in BACKENDS if b in available_backends("divergence_fwd", torch.float64)]

# (kind, alpha): renyi near 1 from both sides, above 1, and a small order.
CASES = [("soft_ce", None), ("renyi", 0.5), ("renyi", 1 - 1e-4), ("renyi", 1 + 1e-4),
         ("renyi", 2.0), ("renyi", 0.1), ("cauchy_schwarz", None)]


def _backends_for(kind):
    return BACKENDS if kind == "soft_ce" else ROW_BACKENDS


def _params():
    out = []
    for kind, a in CASES:
        for b in _backends_for(kind):
            out.append(pytest.param(kind, a, b, id=f"{kind}-{a}-{b}"))
    return out


def _kw(kind, a):
    return {"alpha": a} if a is not None else {}


def _run(kind, a, s, t, backend, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fk.divergence(s, t, kind, backend=backend, **_kw(kind, a), **kw)
    return loss, s, t


@pytest.mark.parametrize("kind,a,backend", _params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(kind, a, backend, dtype):
    seed = zlib.crc32(repr((kind, a, dtype)).encode())
    for shape in [(3, 17), (2, 3, 129)]:  # odd V; 3-D input
        s, t = logits(shape, dtype, seed=seed), logits(shape, dtype, seed=seed + 1)
        loss, s_, t_ = _run(kind, a, s, t, backend, temperature=1.7, reduction="none")
        (loss * torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape)).sum().backward()
        ref, gs, gt = divergence_with_grads(
            s, t, kind, a, 1.7, weights=torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape))
        assert loss.shape == shape[:-1] and loss.dtype == torch.float32
        assert_close(loss, ref, LOSS_TOL[dtype], f"{kind} loss {shape}")
        assert s_.grad.dtype == dtype
        assert_close(s_.grad, gs, grad_tol(GRAD_TOL[dtype], gs), f"{kind} student grad")
        assert_close(t_.grad, gt, grad_tol(GRAD_TOL[dtype], gt), f"{kind} teacher grad")


@pytest.mark.parametrize("kind", ["cauchy_schwarz", "renyi"])
@pytest.mark.parametrize("backend", ["triton"] if "triton" in BACKENDS else [])
def test_multi_block_rows(kind, backend, monkeypatch):
    """Rows longer than the Triton block: the online sums over several blocks."""
    import importlib

    for mod in ("lse_combination", "divergence"):
        monkeypatch.setattr(importlib.import_module(f"fdiv_kernels.triton_kernels.{mod}"),
                            "MAX_BLOCK", 64)
    s, t = logits((2, 300), seed=1), logits((2, 300), seed=2)
    loss, s_, t_ = _run(kind, None, s, t, backend, reduction="sum")
    loss.backward()
    ref, gs, gt = divergence_with_grads(s, t, kind)
    assert_close(loss, ref.sum(), LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad, gs, GRAD_TOL[torch.float32], "student grad")
    assert_close(t_.grad, gt, GRAD_TOL[torch.float32], "teacher grad")


@pytest.mark.parametrize("kind,a,backend", _params())
def test_masked_vocabulary_and_ignored_rows(kind, a, backend):
    """-inf in both inputs is the same as dropping the column; ignored rows add nothing."""
    s, t = logits((4, 50), seed=9), logits((4, 50), seed=10)
    masked = torch.zeros(50, dtype=torch.bool)
    masked[[0, 7, 49]] = True
    s[:, masked] = t[:, masked] = -math.inf
    labels = torch.tensor([1, -100, 3, -100])
    loss, s_, t_ = _run(kind, a, s, t, backend, labels=labels, reduction="mean")
    loss.backward()
    keep = labels != -100
    ref, gs, gt = divergence_with_grads(s[:, ~masked], t[:, ~masked], kind, a,
                                        weights=keep / keep.sum())
    assert_close(loss, (ref * keep).sum() / keep.sum(), LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad[:, ~masked], gs, GRAD_TOL[torch.float32], "student grad")
    assert_close(t_.grad[:, ~masked], gt, GRAD_TOL[torch.float32], "teacher grad")
    assert torch.all(s_.grad[:, masked] == 0) and torch.all(s_.grad[~keep] == 0)


@pytest.mark.parametrize("kind,a,backend", [p for p in _params() if p.values[0] != "soft_ce"])
def test_disjoint_supports_are_inf(kind, a, backend):
    """Teacher mass only where the student has none: +inf, never NaN; a partial overlap is
    finite and matches the reference."""
    s, t = logits((2, 40), seed=11), logits((2, 40), seed=12)
    s[0, :20] = -math.inf
    t[0, 20:] = -math.inf  # row 0: disjoint
    s[1, :5] = -math.inf   # row 1: the student misses part of the teacher's support
    loss, _, _ = _run(kind, a, s, t, backend, reduction="none")
    assert loss[0] == math.inf
    ref = divergence_rows(s, t, kind, a)
    if kind == "renyi" and a > 1:  # q = 0 < p with alpha > 1: infinite too
        assert loss[1] == math.inf
    else:
        assert torch.isfinite(loss[1])
        assert_close(loss[1], ref[1], (1e-4, 1e-6), "partial overlap")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_cauchy_schwarz_disjoint_gradient_is_finite(backend):
    s, t = logits((1, 30), seed=13), logits((1, 30), seed=14)
    s[0, :15] = -math.inf
    t[0, 15:] = -math.inf
    loss, s_, t_ = _run("cauchy_schwarz", None, s, t, backend, reduction="sum")
    loss.backward()
    assert loss == math.inf
    assert torch.isfinite(s_.grad).all() and torch.isfinite(t_.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_ce_is_kl_plus_entropy(backend):
    """soft_ce = KL(p||q) + H(p); at p = q it is H(p), not 0 (it is no divergence)."""
    s, t = logits((3, 77), seed=15), logits((3, 77), seed=16)
    kw = dict(reduction="none", backend=backend)
    ce = fk.divergence(s, t, "soft_ce", **kw)
    kl = fk.divergence(s, t, "kl", **kw)
    ent = fk.entropy(t)
    assert_close(ce, kl + ent, (1e-5, 1e-5), "KL + H")
    assert_close(fk.divergence(t, t, "soft_ce", **kw), ent, (1e-5, 1e-5), "H(p) at p = q")
    # Teacher with zero-probability entries where the student is -inf too: 0 log 0 = 0.
    s[:, 3] = t[:, 3] = -math.inf
    assert torch.isfinite(fk.divergence(s, t, "soft_ce", **kw)).all()
    s[:, 4] = -math.inf  # q = 0 < p: +inf
    assert torch.all(fk.divergence(s, t, "soft_ce", **kw) == math.inf)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_renyi_limits_and_domain(backend):
    s, t = logits((3, 60), seed=17), logits((3, 60), seed=18)
    kw = dict(reduction="none", backend=backend)
    kl = fk.divergence(s, t, "kl", **kw)
    assert torch.equal(fk.divergence(s, t, "renyi", alpha=1.0, **kw), kl)
    for a in (1 - 1e-7, 1 + 1e-7):  # continuous into KL from both sides
        assert_close(fk.divergence(s, t, "renyi", alpha=a, **kw), kl, (1e-5, 1e-6), f"a={a}")
    # Renyi at alpha = 1/2 is -2 log of the Bhattacharyya coefficient: 2 log-scaled Hellinger.
    h = fk.divergence(s, t, "hellinger", **kw)  # 1 - BC
    assert_close(fk.divergence(s, t, "renyi", **kw), -2 * torch.log1p(-h), (1e-5, 1e-6), "a=1/2")
    for bad in (0.0, -0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="alpha must be a finite real > 0"):
            fk.divergence(s, t, "renyi", alpha=bad, **kw)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_renyi_far_apart_rows(backend):
    """S = sum p^a q^(1-a) << 1 (the log-sum-exp route): relative accuracy kept (measured
    ~5e-8), where 1 - a (1-a) A from float32 alpha rows would lose it as eps / S."""
    s, t = logits((4, 300), seed=36, scale=6.0), logits((4, 300), seed=37, scale=6.0)
    for a in (0.3, 0.8):
        ref = divergence_rows(s, t, "renyi", a)
        assert float(torch.exp(ref * (a - 1)).max()) < 0.5  # every row on the route under test
        got = fk.divergence(s, t, "renyi", alpha=a, reduction="none", backend=backend)
        assert_close(got, ref, (1e-6, 0), f"alpha={a}")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_cauchy_schwarz_identical_and_near(backend):
    """D_CS(p, p) = 0 exactly; near p = q (D ~ 1e-6) the float64 sums keep it accurate."""
    s = logits((3, 500), seed=19)
    loss = fk.divergence(s, s.clone(), "cauchy_schwarz", reduction="none", backend=backend)
    assert torch.all(loss == 0)
    t = s + 1e-3 * logits((3, 500), seed=20)
    loss = fk.divergence(s, t, "cauchy_schwarz", reduction="none", backend=backend)
    ref = divergence_rows(s, t, "cauchy_schwarz")
    assert_close(loss, ref, (1e-6, 1e-13), "near p = q")  # measured: 4e-8 relative


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cauchy_schwarz_op_transforms(backend, dtype):
    """The op's logit scale and softcap equal applying them in torch first, gradients included
    (z <- z * scale, z <- cap tanh(z / cap), z / T)."""
    s, t = logits((3, 41), dtype, seed=21) * 4, logits((3, 41), dtype, seed=22) * 4
    valid = torch.tensor([True, False, True])
    op = getattr(torch.ops.fdiv, f"lse_combination_fwd_{backend}")
    coeffs = list(CAUCHY_SCHWARZ_COEFFS)
    for ss, sc, ts, tc in [(1.3, 0.0, 0.7, 5.0), (1.0, 3.0, 1.0, 0.0), (0.5, 2.0, 2.0, 7.0)]:
        loss, gs, gt = op(s, t, valid, coeffs, 1 / 1.3, ss, sc, ts, tc, True, True)
        s64 = s.double().requires_grad_(True)
        t64 = t.double().requires_grad_(True)
        zs, zt = s64 * ss, t64 * ts
        zs = sc * torch.tanh(zs / sc) if sc else zs
        zt = tc * torch.tanh(zt / tc) if tc else zt
        ref = divergence_rows(zs, zt, "cauchy_schwarz", temperature=1.3) * valid
        rgs, rgt = torch.autograd.grad(ref.sum(), (s64, t64))
        assert_close(loss, ref.detach(), LOSS_TOL[dtype], f"loss {ss, sc, ts, tc}")
        assert_close(gs, rgs, grad_tol(GRAD_TOL[dtype], rgs), "student grad")
        assert_close(gt, rgt, grad_tol(GRAD_TOL[dtype], rgt), "teacher grad")


@pytest.mark.parametrize("kind,a", [("soft_ce", None), ("renyi", 0.7), ("renyi", 1.5),
                                    ("cauchy_schwarz", None)])
@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_gradcheck_float64(kind, a, backend):
    if kind != "soft_ce" and backend not in ROW_BACKENDS:
        pytest.skip("no lse_combination op on this backend")
    s = logits((2, 7), torch.float64, seed=23).requires_grad_(True)
    t = logits((2, 7), torch.float64, seed=24).requires_grad_(True)

    def f(s, t):
        return fk.divergence(s, t, kind, backend=backend, reduction="none", temperature=1.3,
                             inplace_backward=False, **_kw(kind, a))

    assert torch.autograd.gradcheck(f, (s, t))


def test_other_ops_refuse_row_kinds():
    """The row kinds are not sums of element terms: every op but fk.divergence refuses them."""
    s, t = logits((4, 20), seed=25), logits((4, 20), seed=26)
    h, w = logits((4, 8), seed=27), logits((20, 8), seed=28)
    th, tw = logits((4, 8), seed=29), logits((20, 8), seed=30)
    ids, lp = torch.arange(4).repeat(4, 1), torch.log_softmax(t[:, :4], -1)
    for kind in ("renyi", "cauchy_schwarz"):
        with pytest.raises(ValueError, match="only fk.divergence computes it"):
            fk.fused_linear_divergence(h, w, th, tw, kind=kind, backend="torch")
        with pytest.raises(ValueError, match="only fk.divergence computes it"):
            fk.sparse_divergence(s, ids, lp, kind=kind, backend="torch")
        with pytest.raises(ValueError, match="only fk.divergence computes it"):
            phases.partials(s, t, s.logsumexp(-1), t.logsumexp(-1), kind)
    assert fk.nn.FDivergenceLoss("cauchy_schwarz")(s, t).isfinite()


def test_dispatch_reports_missing_row_op():
    """A backend without the row op says so (the cuda C++ backend has none)."""
    s = logits((1, 3), seed=1)
    for name in dispatch.BACKENDS:
        if name in ROW_BACKENDS:
            continue
        for kind in ("renyi", "cauchy_schwarz"):
            with pytest.raises(fk.BackendUnavailableError, match=name):
                fk.divergence(s, s, kind, backend=name)


@pytest.mark.parametrize("kind", ["renyi", "cauchy_schwarz"])
@pytest.mark.parametrize("backend", [b for b in ROW_BACKENDS if b != "triton"])
def test_compile_fullgraph(kind, backend):
    """The row kinds, forward and backward, trace into one graph (the row op has its fake)."""
    torch._dynamo.reset()

    def loss_fn(s, t, labels):
        return fk.divergence(s, t, kind, temperature=2.0, labels=labels, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    s, t = logits((4, 64), seed=31), logits((4, 64), seed=32)
    labels = torch.tensor([1, -100, 3, 4])
    out = []
    for f in (compiled, loss_fn):
        s_ = s.clone().requires_grad_(True)
        loss = f(s_, t, labels)
        loss.backward()
        out.append((loss, s_.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["renyi", "cauchy_schwarz"])
@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_zero_rows_and_forward_only(kind, backend):
    s = logits((0, 50), seed=33).requires_grad_(True)
    loss = fk.divergence(s, s.detach(), kind, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.shape == (0, 50)
    s, t = logits((3, 40), seed=34).requires_grad_(True), logits((3, 40), seed=35)
    expected = fk.divergence(s, t, kind, backend=backend).detach()
    with torch.no_grad():
        assert torch.equal(fk.divergence(s, t, kind, backend=backend), expected)
