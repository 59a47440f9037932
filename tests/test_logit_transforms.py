"""Logit scale and softcap fused into the kernels, against applying them in torch first.

Every op that takes them (fk.divergence on both sides, the softmax-statistics family) on every
backend, fp32/bf16/fp16, with -inf logits (a capped -inf logit is the finite -c), ignored rows,
gradients against autograd of the float64 reference, and a float64 gradcheck.
"""

import pytest
import torch

import fdiv_kernels as fk
from conftest import BACKENDS, DTYPES, GRAD_TOL, LOSS_TOL, STATS_BACKENDS
from helpers import assert_close, available_backends, grad_tol
from reference import (
    divergence_rows,
    logits,
    softmax_stats_rows,
    transform_logits,
)

# (N, V): 7 rows (2 ignored), an odd vocabulary under one Triton block; -inf entries in both.
N, V = 7, 37
SCALES = [1.0, 0.0625]
SOFTCAPS = [None, 30.0, 2.0]  # 2: the spread logits saturate tanh
# (dtype, scale, softcap, T): every transform per dtype; both temperatures in fp32 only (the
# temperature is applied after the transform, in fp32 whatever the input dtype).
GRID = [(dt, sc, cap, T) for dt in DTYPES for sc in SCALES for cap in SOFTCAPS
        for T in ([1.0, 2.0] if dt == torch.float32 else [2.0])]
GRID_IDS = [f"{str(dt)[6:]}-scale{sc:g}-cap{cap}-T{T:g}" for dt, sc, cap, T in GRID]
F64_BACKENDS = available_backends("divergence_fwd", torch.float64)


def _inputs(dtype, seed=0):
    # Spread |x| up to ~12: softcap 2 saturates tanh (tanh 6 = 1 - 1e-5).
    s = logits((N, V), dtype, seed=seed, scale=4.0)
    t = logits((N, V), dtype, seed=seed + 1, scale=4.0)
    s[1, [0, 5]] = float("-inf")
    t[2, [3, 4]] = float("-inf")
    s[3, 7] = t[3, 7] = float("-inf")
    labels = torch.arange(N) % V
    labels[[0, 4]] = -100
    return s, t, labels


def _gtol(dtype, ref):
    """The gradient tolerance, its absolute part at least 4 steps of fp16's subnormal spacing
    (2^-24) for fp16 gradients: the peaked rows here give gradients down to 1e-7, which fp16
    stores as subnormals."""
    rtol, atol = grad_tol(GRAD_TOL[dtype], ref)
    return rtol, max(atol, 2.0 ** -22) if dtype == torch.float16 else atol


def _ref_input(x, scale=1.0, softcap=None, temperature=1.0):
    """x in float64, its -inf entries made finite so that autograd through the reference's xlogy
    stays finite (0 * log 0 would make every gradient of the row NaN), with the same softmax to
    float64 precision: under a cap -1e4 (tanh gives -1 exactly, as for -inf), else a logit
    700 T / scale below the row max (probability e^-700, a gradient below 1e-300)."""
    x64 = x.detach().to(torch.float64)
    if softcap is not None:
        low = torch.full_like(x64, -1e4)
    else:
        top = torch.where(torch.isfinite(x64), x64, float("-inf")).amax(-1, keepdim=True)
        low = (top - 700.0 * temperature / scale).expand_as(x64)
    return torch.where(x64 == float("-inf"), low, x64).requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale, softcap, temperature", GRID, ids=GRID_IDS)
def test_divergence_transforms_match_torch_first(backend, dtype, scale, softcap, temperature):
    s, t, labels = _inputs(dtype)
    t_scale = 1.0 if scale == 1.0 else 0.5  # the teacher's own transform, different
    s_in, t_in = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out, stats = fk.divergence(
        s_in, t_in, "js", beta=0.3, temperature=temperature, labels=labels, reduction="none",
        backend=backend, student_logit_scale=scale, student_softcap=softcap,
        teacher_logit_scale=t_scale, teacher_softcap=softcap, return_stats=True,
    )
    w = logits((N,), torch.float64, seed=9)
    (out * w.to(out.dtype)).sum().backward()

    rs = _ref_input(s, scale, softcap, temperature)
    rt = _ref_input(t, t_scale, softcap, temperature)
    zs = transform_logits(rs, scale, softcap)
    zt = transform_logits(rt, t_scale, softcap)
    keep = labels != -100
    ref = torch.where(keep, divergence_rows(zs, zt, "js", 0.3, temperature), 0.0)
    gs, gt = torch.autograd.grad((ref * w).sum(), (rs, rt))
    assert_close(out, ref.detach(), LOSS_TOL[dtype], "loss")
    assert_close(s_in.grad, gs, _gtol(dtype, gs), "student grad")
    assert_close(t_in.grad, gt, _gtol(dtype, gt), "teacher grad")
    assert not s_in.grad[~keep].any() and not t_in.grad[~keep].any()

    _, ent, _ = softmax_stats_rows(zs.detach(), temperature=temperature)
    assert_close(stats.entropy_sum, ent[keep].sum(), LOSS_TOL[dtype], "entropy_sum")
    assert int(stats.num_rows) == int(keep.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_capped_minus_inf_is_finite(backend):
    """Under a softcap a -inf logit becomes -c: finite, with a nonzero probability and a zero
    gradient (tanh saturates); without one it keeps probability 0."""
    s, t, _ = _inputs(torch.float32)
    kw = dict(reduction="none", backend=backend, temperature=1.0)
    capped = fk.divergence(s, t, "kl", student_softcap=2.0, teacher_softcap=2.0, **kw)
    # Row 3 has -inf at one column in both (adds nothing either way); row 2's teacher has -inf
    # where the student is finite: finite KL both ways; row 1's student has -inf where the
    # teacher is finite: KL(p||q) = +inf uncapped, finite capped.
    assert torch.isfinite(capped).all()
    plain = fk.divergence(s, t, "kl", **kw)
    assert torch.isinf(plain[1]) and torch.isfinite(plain[[0, 2, 3]]).all()
    s_in = s.clone().requires_grad_(True)
    fk.divergence(s_in, t, "kl", student_softcap=2.0, backend=backend).backward()
    assert s_in.grad[1, 0] == 0 and s_in.grad[1, 5] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "skew_reverse_kl"])
def test_entropy_is_the_students_under_swap(backend, kind):
    """Swapped kinds exchange student and teacher inside the kernels; the entropy stays the
    student's (with the student's own transform)."""
    s, t, labels = _inputs(torch.float32, seed=3)
    _, stats = fk.divergence(s, t, kind, labels=labels, temperature=2.0, backend=backend,
                             student_logit_scale=0.0625, student_softcap=2.0, teacher_softcap=30.0,
                             return_stats=True)
    zs = transform_logits(s, 0.0625, 2.0)
    _, ent, _ = softmax_stats_rows(zs, temperature=2.0)
    assert_close(stats.entropy_sum, ent[labels != -100].sum(), LOSS_TOL[torch.float32], "entropy")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_triton_multiblock_with_softcap(monkeypatch):
    """Rows longer than the (capped) block: the online loop over transformed blocks, with the
    padding past V kept at -inf under the cap."""
    import importlib

    for mod in ("divergence", "softmax_stats"):
        monkeypatch.setattr(importlib.import_module(f"fdiv_kernels.triton_kernels.{mod}"),
                            "MAX_BLOCK", 64)
    s = logits((3, 150), seed=41, scale=8.0)
    t = logits((3, 150), seed=42, scale=8.0)
    s[0, 100] = float("-inf")
    kw = dict(student_logit_scale=0.5, student_softcap=2.0, teacher_softcap=30.0,
              temperature=2.0, reduction="none")
    s_tr, s_ref = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = fk.divergence(s_tr, t, "js", backend="triton", **kw)
    ref = fk.divergence(s_ref, t, "js", backend="torch", **kw)
    got.sum().backward()
    ref.sum().backward()
    assert_close(got, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(s_tr.grad, s_ref.grad, grad_tol(GRAD_TOL[torch.float32], s_ref.grad), "grad")
    st = fk.softmax_stats(s, torch.tensor([3, 100, 149]), 2.0, backend="triton",
                          logit_scale=0.5, softcap=2.0)
    lse, ent, lp = softmax_stats_rows(transform_logits(s, 0.5, 2.0), torch.tensor([3, 100, 149]),
                                      2.0)
    assert_close(st.lse, lse, LOSS_TOL[torch.float32], "lse")
    assert_close(st.entropy, ent, LOSS_TOL[torch.float32], "entropy")
    assert_close(st.label_logprob, lp, LOSS_TOL[torch.float32], "label logprob")


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_divergence_gradcheck_float64(backend):
    s = logits((3, 11), torch.float64, seed=21, scale=3.0).requires_grad_(True)
    t = logits((3, 11), torch.float64, seed=22, scale=3.0).requires_grad_(True)

    def f(s, t):
        return fk.divergence(s, t, "js", beta=0.4, temperature=1.5, reduction="none",
                             backend=backend, inplace_backward=False, student_logit_scale=0.5,
                             student_softcap=2.0, teacher_logit_scale=2.0, teacher_softcap=3.0)

    assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("dtype, scale, softcap, temperature", GRID, ids=GRID_IDS)
def test_softmax_stats_transforms_match_torch_first(backend, dtype, scale, softcap, temperature):
    x, _, labels = _inputs(dtype, seed=5)
    x_in = x.clone().requires_grad_(True)
    kw = dict(backend=backend, logit_scale=scale, softcap=softcap)
    st = fk.softmax_stats(x_in, labels, temperature, **kw)
    w = logits((3, N), torch.float64, seed=11)
    (st.lse * w[0].to(st.lse.dtype) + st.entropy * w[1].to(st.lse.dtype)
     + st.label_logprob * w[2].to(st.lse.dtype)).sum().backward()

    rx = _ref_input(x, scale, softcap, temperature)
    z = transform_logits(rx, scale, softcap)
    lse, ent, lp = softmax_stats_rows(z, labels, temperature)
    g, = torch.autograd.grad((lse * w[0] + ent * w[1] + lp * w[2]).sum(), rx)
    assert_close(st.lse, lse.detach(), LOSS_TOL[dtype], "lse")
    assert_close(st.entropy, ent.detach(), LOSS_TOL[dtype], "entropy")
    assert_close(st.label_logprob, lp.detach(), LOSS_TOL[dtype], "label logprob")
    assert_close(x_in.grad, g, _gtol(dtype, g), "grad")

    # The single-statistic views take the same transforms.
    assert_close(fk.token_logprobs(x, labels, temperature, **kw), lp.detach(), LOSS_TOL[dtype],
                 "token_logprobs")
    assert_close(fk.entropy(x, temperature, **kw), ent.detach(), LOSS_TOL[dtype], "entropy()")
    expect = torch.logsumexp(transform_logits(x, scale, softcap), -1)
    assert_close(fk.logsumexp(x, -1, **kw), expect.to(dtype), LOSS_TOL[dtype], "logsumexp")


@pytest.mark.parametrize("backend", [b for b in F64_BACKENDS if b in STATS_BACKENDS])
def test_softmax_stats_gradcheck_float64(backend):
    x = logits((3, 11), torch.float64, seed=31, scale=3.0).requires_grad_(True)
    labels = torch.tensor([2, -100, 10])

    def f(x):
        st = fk.softmax_stats(x, labels, 1.5, backend=backend, logit_scale=0.5, softcap=2.0)
        return st.lse, st.entropy, st.label_logprob

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("bad, exc, match", [
    (dict(student_logit_scale=0.0), ValueError, "student_logit_scale"),
    (dict(student_logit_scale=-1.0), ValueError, "student_logit_scale"),
    (dict(teacher_logit_scale=float("inf")), ValueError, "teacher_logit_scale"),
    (dict(teacher_logit_scale=float("nan")), ValueError, "teacher_logit_scale"),
    (dict(student_logit_scale=True), TypeError, "student_logit_scale"),
    (dict(student_softcap=0.0), ValueError, "student_softcap"),
    (dict(teacher_softcap=-30.0), ValueError, "teacher_softcap"),
    (dict(teacher_softcap=float("inf")), ValueError, "teacher_softcap"),
    (dict(student_softcap="30"), TypeError, "student_softcap"),
    (dict(return_stats=1), TypeError, "return_stats"),
])
def test_divergence_bad_transforms(bad, exc, match):
    s, t, _ = _inputs(torch.float32)
    with pytest.raises(exc, match=match):
        fk.divergence(s, t, **bad)


@pytest.mark.parametrize("fn", ["softmax_stats", "token_logprobs", "entropy", "logsumexp"])
@pytest.mark.parametrize("bad, exc, match", [
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(logit_scale=torch.tensor(1.0)), TypeError, "logit_scale"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
])
def test_softmax_stats_bad_transforms(fn, bad, exc, match):
    x, _, labels = _inputs(torch.float32)
    args = {"softmax_stats": (x, labels), "token_logprobs": (x, labels), "entropy": (x,),
            "logsumexp": (x,)}[fn]
    with pytest.raises(exc, match=match):
        getattr(fk, fn)(*args, **bad)


def test_compile_fullgraph_with_transforms_and_stats():
    """The transforms and return_stats trace into one graph (no host sync, no graph break)."""
    backend = "cpu" if "cpu" in BACKENDS else "torch"
    s, t, labels = _inputs(torch.float32, seed=51)

    def f(s, t):
        loss, st = fk.divergence(s, t, "js", labels=labels, student_softcap=2.0,
                                 teacher_logit_scale=0.5, return_stats=True, backend=backend)
        lp = fk.token_logprobs(s, labels, softcap=3.0, backend=backend)
        return loss, st.entropy_sum, st.num_rows, lp

    got = torch.compile(f, fullgraph=True)(s, t)
    for a, b in zip(got, f(s, t)):
        assert_close(a, b, LOSS_TOL[torch.float32], "compiled")
