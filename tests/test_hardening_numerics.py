"""Numbers the kernels must get right at the edges of float32, against float64 references on every
backend: a sparse teacher's "bucket" tail when the student's tail underflows (any gap, any
temperature) or when the support covers the whole vocabulary (rounding below a mass of 1), and
Renyi above alpha = 1 (log S from log-sum-exps: S itself overflows float32 from a gap of ~90), and
Amari alpha at large |alpha| (q e^(alpha d) finite where e^(alpha d) alone overflows)."""

import math

import pytest
import torch
from conftest import GRAD_TOL, LOSS_TOL
from helpers import assert_close, available_backends, grad_tol
from reference import divergence_with_grads, logits, sparse_divergence_with_grads

import fdiv_kernels as fk

SPARSE_BACKENDS = available_backends("sparse_divergence_fwd")
ROW_BACKENDS = available_backends("lse_combination_fwd")
ROW_F64_BACKENDS = available_backends("lse_combination_fwd", torch.float64)
DENSE_BACKENDS = available_backends("divergence_fwd")
PARAM_NAME = {"js": "beta", "alpha": "alpha"}

# ---- sparse "bucket": a student tail below float32's exp range -------------------------------


def _sparse(s, ids, lp, kind, param, backend, **kw):
    s_ = s.detach().clone().requires_grad_(True)
    lp_ = lp.detach().clone().requires_grad_(True)
    extra = {PARAM_NAME[kind]: param} if param is not None else {}
    out = fk.sparse_divergence(s_, ids, lp_, kind, tail="bucket", reduction="none",
                               backend=backend, **extra, **kw)
    out.sum().backward()
    return out, s_.grad, lp_.grad


def _gapped_rows(gap, V=130, K=5, seed=0):
    """Rows whose support logits sit ``gap`` above every other logit: the student tail is ~e^-gap
    (far below float32's smallest exp at gap >= 104), the teacher's 1e-3."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, V, generator=g) - gap
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(3)])
    s.scatter_(-1, ids, torch.randn(3, K, generator=g))
    s[0] = -gap  # the row: a flat support over a flat off-support block
    s[0].scatter_(-1, ids[0], torch.zeros(K))
    lp = torch.log_softmax(torch.randn(3, K, generator=g, dtype=torch.float64), -1)
    lp = (lp + math.log(0.999)).float()
    return s, ids, lp


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("gap", [30.0, 88.0, 100.0, 110.0, 300.0])
@pytest.mark.parametrize("kind,param", [("kl", None), ("reverse_kl", None), ("js", 0.3),
                                        ("alpha", 0.5), ("soft_ce", None)])
def test_bucket_tail_below_float32_exp_range(kind, param, gap, backend):
    """The tail term and the off-support gradient (h_tail Q_S q_j / q_tail: -4.17e-5 per column
    on the issue's row) stay exact where e^(a_j - L) underflows: at a gap of ~88 the kernels
    dropped the off-support gradient, past ~104 the tail was log(0) and KL +inf."""
    s, ids, lp = _gapped_rows(gap)
    out, gs, gt = _sparse(s, ids, lp, kind, param, backend)
    ref, rgs, rgt = sparse_divergence_with_grads(s, ids, lp, kind, param)
    assert_close(out, ref, LOSS_TOL[torch.float32], f"loss gap={gap}")
    assert_close(gs, rgs, grad_tol(GRAD_TOL[torch.float32], rgs), f"student grad gap={gap}")
    assert_close(gt, rgt, grad_tol(GRAD_TOL[torch.float32], rgt), f"teacher grad gap={gap}")
    if kind == "kl":  # the numbers: h_tail Q_S / (V - K) off the support
        off = torch.ones(130, dtype=torch.bool)
        off[ids[0]] = False
        assert_close(gs[0, off], torch.full((125,), -1e-3 / 125, dtype=torch.float64),
                     (1e-4, 0), "off-support gradient")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_bucket_tail_gap_grows_with_temperature(backend):
    """A modest logit gap of 40 at T = 0.25 is a gap of 160 in the softmax."""
    s, ids, lp = _gapped_rows(40.0, seed=1)
    out, gs, gt = _sparse(s, ids, lp, "kl", None, backend, temperature=0.25)
    ref, rgs, rgt = sparse_divergence_with_grads(s, ids, lp, "kl", temperature=0.25)
    assert torch.isfinite(out).all()
    assert_close(out, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(gs, rgs, grad_tol(GRAD_TOL[torch.float32], rgs), "student grad")
    assert_close(gt, rgt, grad_tol(GRAD_TOL[torch.float32], rgt), "teacher grad")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("kind,param", [("kl", None), ("alpha", 0.5), ("chi2", None),
                                        ("jeffreys", None), ("soft_ce", None), ("js", 0.5)])
def test_bucket_teacher_covering_the_vocabulary(kind, param, backend):
    """Teacher log-probs from a float32 log_softmax over all V ids sum to 1 - ~3e-8: that deficit
    is rounding (no outcome is left for a tail), not a tail mass against q_tail = 0 (+inf)."""
    V = 61
    t = logits((2, V), seed=34, scale=3.0)  # both rows' fp32 mass: 1 - ~1e-7
    s = logits((2, V), seed=22)
    lp = torch.log_softmax(t, -1)
    perm = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i))
                        for i in range(2)])
    ids, lp_k = perm, lp.gather(-1, perm)
    assert (torch.logsumexp(lp_k.double(), -1) < 0).all()  # a deficit below 1 is present
    out, gs, gt = _sparse(s, ids, lp_k, kind, param, backend)
    ref, rgs, rgt = sparse_divergence_with_grads(s, ids, lp_k, kind, param)
    assert_close(out, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(gs, rgs, grad_tol(GRAD_TOL[torch.float32], rgs), "student grad")
    assert_close(gt, rgt, grad_tol(GRAD_TOL[torch.float32], rgt), "teacher grad")
    # ... which is the dense divergence of the same teacher.
    dense = divergence_with_grads(s, t, kind, param)[0]
    assert_close(out, dense, (1e-4, 1e-5), "dense divergence")
    # Re-tempered too (the tail would take a share (3e-8)^(1/2) of the renormalized mass).
    out_t, _, _ = _sparse(s, ids, lp_k, kind, param, backend, teacher_temperature=0.5)
    ref_t = sparse_divergence_with_grads(s, ids, lp_k, kind, param, temperature=1.0,
                                         teacher_temperature=0.5)[0]
    assert_close(out_t, ref_t, (1e-4, 1e-6), "re-tempered")
    # A covering support whose mass is short of 1 beyond rounding is refused.
    with pytest.raises(ValueError, match="teacher_logprobs"):
        _sparse(s, ids, lp_k - 0.01, kind, param, backend)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_bucket_student_without_tail(backend):
    """A student whose off-support logits are all -inf (a padded or masked vocabulary) and a
    teacher whose mass on the support is 1 within rounding: the tail is 0 on both sides."""
    V, K = 40, 32
    t = logits((2, K), seed=23, scale=3.0)
    lp = torch.log_softmax(t, -1)
    s = logits((2, V), seed=24)
    s[:, K:] = -math.inf
    ids = torch.arange(K).expand(2, K)
    assert (torch.logsumexp(lp.double(), -1) < 0).any()
    out, gs, gt = _sparse(s, ids, lp, "kl", None, backend)
    ref, rgs, rgt = sparse_divergence_with_grads(s, ids, lp, "kl", slack=1e-4)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert_close(out, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(gs, rgs, grad_tol(GRAD_TOL[torch.float32], rgs), "student grad")
    assert_close(gt, rgt, grad_tol(GRAD_TOL[torch.float32], rgt), "teacher grad")
    # A real teacher tail (1e-2) against q_tail = 0 is +inf for KL, as the definition says.
    out2, _, _ = _sparse(s, ids, lp + math.log(0.99), "kl", None, backend)
    assert torch.all(out2 == math.inf)


# ---- Renyi above alpha = 1 ------------------------------------------------------------------

ALPHAS = [0.1, 0.5, 1 - 1e-4, 1 + 1e-4, 1.5, 2.0, 5.0, 10.0, 20.0, 50.0]


def _renyi(s, t, a, backend, **kw):
    s_ = s.detach().clone().requires_grad_(True)
    t_ = t.detach().clone().requires_grad_(True)
    out = fk.divergence(s_, t_, "renyi", alpha=a, reduction="none", backend=backend, **kw)
    out.sum().backward()
    return out, s_.grad, t_.grad


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("scale", [2.0, 4.0])
@pytest.mark.parametrize("a", ALPHAS)
def test_renyi_alpha_grid(a, scale, backend):
    """Values and both gradients on a grid of orders up to 50, where S = sum p^a q^(1-a) leaves
    float32 (scale 2, a = 20: S ~ e^80; scale 4, a = 10: e^150) while D stays ~5."""
    s, t = logits((3, 37), seed=31, scale=scale), logits((3, 37), seed=32, scale=scale)
    out, gs, gt = _renyi(s, t, a, backend, temperature=1.3)
    ref, rgs, rgt = divergence_with_grads(s, t, "renyi", a, 1.3)
    assert torch.isfinite(ref).all()
    assert_close(out, ref, LOSS_TOL[torch.float32], f"loss a={a}")
    assert_close(gs, rgs, grad_tol(GRAD_TOL[torch.float32], rgs), f"student grad a={a}")
    assert_close(gt, rgt, grad_tol(GRAD_TOL[torch.float32], rgt), f"teacher grad a={a}")


@pytest.mark.parametrize("backend", ROW_F64_BACKENDS)
@pytest.mark.parametrize("a", [0.3, 1 + 1e-6, 2.0, 20.0])
def test_renyi_float64(a, backend):
    s, t = logits((2, 23), torch.float64, seed=33), logits((2, 23), torch.float64, seed=34)
    out, gs, gt = _renyi(s, t, a, backend)
    ref, rgs, rgt = divergence_with_grads(s, t, "renyi", a)
    assert_close(out, ref, (1e-9, 1e-11), "loss")
    assert_close(gs, rgs, (1e-8, 1e-11), "student grad")
    assert_close(gt, rgt, (1e-8, 1e-11), "teacher grad")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_renyi_far_student_logit(backend):
    """The issue's row: one student logit at -100 under teacher mass, alpha = 2: D = 101.85
    (float64), where the alpha-kind route gave +inf and non-finite gradients."""
    s, t = logits((2, 30), seed=35), logits((2, 30), seed=36)
    s[0, 3] = -100.0
    for a in (2.0, 3.0):
        out, gs, gt = _renyi(s, t, a, backend)
        ref, rgs, rgt = divergence_with_grads(s, t, "renyi", a)
        assert ref[0] > 90
        assert_close(out, ref, LOSS_TOL[torch.float32], f"loss a={a}")
        assert_close(gs, rgs, grad_tol(GRAD_TOL[torch.float32], rgs), f"student grad a={a}")
        assert_close(gt, rgt, grad_tol(GRAD_TOL[torch.float32], rgt), f"teacher grad a={a}")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("a", [0.5, 2.0, 20.0])
def test_renyi_infinite_logits(a, backend):
    """-inf in both rows drops the column; q = 0 < p is +inf above alpha = 1 (finite below);
    p = 0 < q adds nothing. Gradients stay finite."""
    s, t = logits((3, 20), seed=37), logits((3, 20), seed=38)
    s[:, 0] = t[:, 0] = -math.inf  # both: the column is not there
    t[1, 5] = -math.inf            # p = 0 < q
    s[2, 7] = -math.inf            # q = 0 < p
    out, gs, gt = _renyi(s, t, a, backend)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    ref, rgs, rgt = divergence_with_grads(s[:2, 1:], t[:2, 1:], "renyi", a)
    assert_close(out[:2], ref, LOSS_TOL[torch.float32], "finite rows")
    assert_close(gs[:2, 1:], rgs, grad_tol(GRAD_TOL[torch.float32], rgs), "student grad")
    assert_close(gt[:2, 1:], rgt, grad_tol(GRAD_TOL[torch.float32], rgt), "teacher grad")
    if a > 1:
        assert out[2] == math.inf
    else:
        assert_close(out[2:], divergence_with_grads(s[2:, 1:], t[2:, 1:], "renyi", a)[0],
                     LOSS_TOL[torch.float32], "q = 0 < p below alpha = 1")


# ---- Amari alpha: e^(alpha d) overflows float32 where q e^(alpha d) does not ---------------------


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@pytest.mark.parametrize("a", [5.0, 8.0, -6.0])
def test_alpha_large_magnitude(a, backend):
    """One entry with lq ~ -99 and d = lp - lq such that alpha d ~ 95 (for alpha < 0 the same with
    p and q exchanged, (alpha - 1) d ~ 95): e^(alpha d) is past float32's 88.7, so q expm1(alpha
    d) was inf * (tiny q) = inf, a loss of +inf where float64 gives a finite number."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(4, 37, generator=g), torch.randn(4, 37, generator=g)
    tiny, gap = -99.0 + torch.rand(4, generator=g), 95.0 / (a if a > 0 else 1.0 - a)
    s[:, 3], t[:, 3] = (tiny, tiny + gap) if a > 0 else (tiny + gap, tiny)
    s_, t_ = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = fk.divergence(s_, t_, "alpha", alpha=a, reduction="none", backend=backend)
    out.sum().backward()
    ref, rgs, rgt = divergence_with_grads(s, t, "alpha", a)
    assert torch.isfinite(ref).all() and ref.max() < 1e30  # the float32 truth is finite
    assert_close(out, ref, (1e-4, 0.0), "loss")
    assert_close(s_.grad, rgs, grad_tol((1e-4, 1e-6), rgs), "student grad")
    assert_close(t_.grad, rgt, grad_tol((1e-4, 1e-6), rgt), "teacher grad")
