"""fk.sparse_divergence against the float64 reference: every kind x tail, backends, dtypes, edges."""

import zlib

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL
from helpers import assert_close, available_backends, backend_cfg_fixture
from reference import (
    logits,
    sparse_divergence_rows,
    sparse_divergence_with_grads,
    sparse_teacher,
)

import fdiv_kernels as fk

BACKENDS = available_backends("sparse_divergence_fwd")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend that implements the sparse divergence op here."""
    return request.param


backend_cfg = backend_cfg_fixture(BACKENDS, "fdiv_kernels.triton_kernels.sparse_divergence")

KIND_PARAMS = [
    ("kl", None), ("reverse_kl", None), ("js", 0.3), ("tv", None), ("hellinger", None),
    ("chi2", None), ("alpha", 0.5), ("alpha", -0.5), ("alpha", 1.5), ("skew_kl", 0.1),
    ("skew_reverse_kl", 0.3), ("jeffreys", None), ("soft_ce", None),
]
PARAM_NAME = {"js": "beta", "alpha": "alpha", "skew_kl": "lam", "skew_reverse_kl": "lam"}
TAILS = ["none", "bucket", "renormalize"]


def _kw(kind, param):
    return {PARAM_NAME[kind]: param} if param is not None else {}


def _mask(shape, seed, frac=0.25):
    """Padding on ~frac of the entries, never on the first (every row keeps one entry)."""
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > frac
    m[..., 0] = True
    return m


def check(s, ids, lp, kind, param, backend, *, dtype_tol=torch.float32, mask=None,
          teacher_grad=True, weights=None, loss_tol=None, grad_tol=None, **kw):
    """Loss, student and teacher gradients of fk against the reference."""
    s_ = s.detach().clone().requires_grad_(True)
    lp_ = lp.detach().clone().requires_grad_(teacher_grad)
    out = fk.sparse_divergence(s_, ids, lp_, kind, support_mask=mask, reduction="none",
                               backend=backend, **_kw(kind, param), **kw)
    w = torch.ones_like(out) if weights is None else weights
    (out * w).sum().backward()
    ref_kw = {k: v for k, v in kw.items() if k in ("tail", "temperature", "teacher_temperature")}
    ref, gs, gt = sparse_divergence_with_grads(s, ids, lp, kind, param, support=mask,
                                               weights=w, **ref_kw)
    assert out.shape == s.shape[:-1]
    assert out.dtype == torch.promote_types(s.dtype, torch.float32)
    assert_close(out, ref, loss_tol or LOSS_TOL[dtype_tol], "loss")
    assert s_.grad.dtype == s.dtype
    assert_close(s_.grad, gs, grad_tol or GRAD_TOL[dtype_tol], "student grad")
    if teacher_grad:
        assert_close(lp_.grad, gt, grad_tol or GRAD_TOL[dtype_tol], "teacher grad")
    return out, s_.grad


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind,param", KIND_PARAMS)
def test_matches_reference(kind, param, tail, backend_cfg):
    """Every kind x tail mode: random duplicate-free ids, padded entries, T != 1, 3-D input."""
    seed = zlib.crc32(repr((kind, param, tail)).encode())
    s = logits((2, 3, 101), seed=seed)
    ids, lp = sparse_teacher((2, 3, 101), 8, seed=seed + 1)
    check(s, ids, lp.float(), kind, param, backend_cfg, mask=_mask(ids.shape, seed),
          tail=tail, temperature=1.3)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 8, 64])
def test_support_sizes_and_retempering(k, tail, backend_cfg):
    """K in {1, 8, 64}, the teacher re-tempered (T_teacher = 2 T) as DistillKit / axolotl do."""
    s = logits((3, 157), seed=k)
    ids, lp = sparse_teacher((3, 157), k, seed=k + 1, mass=0.7)
    check(s, ids, lp.float(), "js", 0.4, backend_cfg, mask=_mask(ids.shape, k, 0.2),
          tail=tail, temperature=0.8, teacher_temperature=1.6)


@pytest.mark.parametrize("tail", TAILS)
def test_student_topk_support(tail, backend_cfg):
    """Self-distillation: the support is the student's own top-k (TRL's top-k loss)."""
    s = logits((4, 211), seed=5)
    ids, lp = sparse_teacher((4, 211), 16, seed=6, top=True, student=s)
    check(s, ids, lp.float(), "reverse_kl", None, backend_cfg, tail=tail)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype, tail, backend):
    """fp32 / bf16 / fp16 student logits and teacher log-probs; the loss stays fp32-accurate."""
    s = logits((3, 129), dtype, seed=7)
    ids, lp = sparse_teacher((3, 129), 8, seed=8)
    check(s, ids, lp.to(dtype), "kl", None, backend, dtype_tol=dtype, tail=tail)


@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_support_holds_nearly_all_mass(tail, backend):
    """Student and teacher put ~all mass on S (tail -> 0): finite, no NaN, close to float64."""
    s = logits((3, 97), seed=9)
    ids, lp = sparse_teacher((3, 97), 8, seed=10, mass=1 - 1e-6)
    s = s.scatter_add(-1, ids, torch.full(ids.shape, 14.0))  # q_tail ~ 1e-4 .. 1e-5
    # The teacher gradient is left out: d log p_tail / d log p_i = -p_i / p_tail ~ 1e6 amplifies
    # the fp32 rounding of q_tail (1 - sum_S q, from an fp32 LSE) into O(0.1) errors.
    check(s, ids, lp.float(), "kl", None, backend, tail=tail, loss_tol=(1e-4, 1e-5),
          grad_tol=(1e-3, 1e-5), teacher_grad=False)
    # Tail far below fp32 resolution: the tail outcome is lost to rounding, nothing is NaN.
    s2 = s.scatter_add(-1, ids, torch.full(ids.shape, 40.0))
    for kind in ("kl", "reverse_kl", "js"):
        s_ = s2.clone().requires_grad_(True)
        out = fk.sparse_divergence(s_, ids, lp.float(), kind, tail=tail, backend=backend)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s_.grad).all()


@pytest.mark.parametrize("tail", TAILS)
def test_support_holds_almost_no_mass(tail, backend):
    """Student mass on S ~ 1e-6 and a teacher with little mass there."""
    s = logits((3, 97), seed=11)
    ids, lp = sparse_teacher((3, 97), 4, seed=12, mass=1e-3)
    s = s.scatter_add(-1, ids, torch.full(ids.shape, -12.0))
    check(s, ids, lp.float(), "js", 0.5, backend, tail=tail)


def test_ignored_rows_and_reductions(backend):
    s = logits((4, 5, 83), seed=13)
    ids, lp = sparse_teacher((4, 5, 83), 6, seed=14)
    labels = torch.randint(0, 83, (4, 5), generator=torch.Generator().manual_seed(15))
    labels[0] = -100
    labels[2, 1:3] = -100
    kept = labels != -100
    s_ = s.clone().requires_grad_(True)
    per_row = fk.sparse_divergence(s_, ids, lp.float(), "kl", labels=labels, reduction="none",
                                   backend=backend)
    per_row.sum().backward()
    ref, gs, _ = sparse_divergence_with_grads(s, ids, lp, "kl", weights=kept.double())
    assert_close(per_row, torch.where(kept, ref, 0.0), LOSS_TOL[torch.float32], "per row")
    assert_close(s_.grad, gs, GRAD_TOL[torch.float32], "grad")
    assert (s_.grad[0] == 0).all()
    args = (s, ids, lp.float(), "kl")
    mean = fk.sparse_divergence(*args, labels=labels, backend=backend)
    assert_close(mean, ref[kept].sum() / kept.sum(), LOSS_TOL[torch.float32], "mean")
    nib = fk.sparse_divergence(*args, labels=labels, num_items_in_batch=torch.tensor(7.0),
                               backend=backend)
    assert_close(nib, ref[kept].sum() / 7, LOSS_TOL[torch.float32], "nib")
    total = fk.sparse_divergence(*args, labels=labels, reduction="sum", backend=backend)
    assert_close(total, ref[kept].sum(), LOSS_TOL[torch.float32], "sum")
    # Every row ignored: 0, still differentiable, zero gradient.
    s_ = s.clone().requires_grad_(True)
    zero = fk.sparse_divergence(s_, ids, lp.float(), "kl", labels=torch.full_like(labels, -100),
                                backend=backend)
    zero.backward()
    assert zero.item() == 0 and (s_.grad == 0).all()


def test_ignored_rows_are_not_read(backend):
    """An ignored row's teacher may hold anything (out-of-range or repeated ids, a mass above 1,
    all -inf log-probs): no error, and the kept rows' loss and gradients are those with the row
    left out; its gradient is 0."""
    s = logits((3, 70), seed=30)
    ids, lp = sparse_teacher((3, 70), 5, seed=31)
    lp = lp.float()
    labels = torch.tensor([5, -100, 7])
    bad_ids = ids.clone()
    bad_ids[1] = torch.tensor([3, 3, 70, -1, 10**6])
    for tail in TAILS:
        for bad_lp in (torch.zeros(5), torch.full((5,), float("-inf"))):
            lp_bad = lp.clone()
            lp_bad[1] = bad_lp
            s_ = s.clone().requires_grad_(True)
            out = fk.sparse_divergence(s_, bad_ids, lp_bad, "kl", tail=tail, labels=labels,
                                       reduction="none", backend=backend)
            out.sum().backward()
            ref = fk.sparse_divergence(s[[0, 2]], ids[[0, 2]], lp[[0, 2]], "kl", tail=tail,
                                       reduction="none", backend="torch")
            assert_close(out[[0, 2]], ref, LOSS_TOL[torch.float32], f"{tail} kept rows")
            assert out[1].item() == 0 and (s_.grad[1] == 0).all()


@pytest.mark.parametrize("tail,teacher_t", [("renormalize", None), ("none", 2.0)])
def test_teacher_with_no_mass_to_renormalize(tail, teacher_t, backend):
    """Renormalizing a teacher whose real entries are all -inf is 0 / 0: a ValueError naming
    teacher_logprobs on every backend (it was 0 on the kernels and NaN on torch). A support of
    padding only is an empty teacher (loss 0), and "bucket" puts all its mass in the tail."""
    s = logits((2, 40), seed=32)
    ids, lp = sparse_teacher((2, 40), 4, seed=33)
    lp = lp.float()
    lp[1] = float("-inf")
    kw = {"tail": tail, "teacher_temperature": teacher_t, "backend": backend}
    with pytest.raises(ValueError, match="teacher_logprobs.*row 1|teacher_logprobs.*a row"):
        fk.sparse_divergence(s, ids, lp, "kl", **kw)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    out = fk.sparse_divergence(s, ids, lp, "kl", support_mask=mask, reduction="none", **kw)
    assert out[1].item() == 0 and torch.isfinite(out[0])
    bucket = fk.sparse_divergence(s, ids, lp, "kl", tail="bucket", reduction="none",
                                  backend=backend)
    # KL with all teacher mass in the tail: 0 - log q_tail.
    q_tail = 1 - torch.softmax(s[1].double(), -1)[ids[1]].sum()
    assert_close(bucket[1], -torch.log(q_tail), LOSS_TOL[torch.float32], "bucket")


def test_padding_ids_may_repeat(backend):
    """Padding entries carry arbitrary ids (axolotl pads with 0..K-1, colliding with real ids):
    they neither count nor overwrite a real entry's gradient."""
    s = logits((2, 64), seed=16)
    ids, lp = sparse_teacher((2, 64), 6, seed=17)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    ids_pad = torch.where(mask, ids, ids[:, :1])  # padding repeats the first real id
    lp_pad = torch.where(mask, lp, -1e4)
    for tail in TAILS:
        out, g = check(s, ids_pad, lp_pad.float(), "kl", None, backend, mask=mask, tail=tail)
        out2, g2 = check(s, ids[:, :3].contiguous(), lp[:, :3].float(), "kl", None, backend,
                         tail=tail)
        assert_close(out[0], out2[0], LOSS_TOL[torch.float32], "padding vs truncated")
        assert_close(g[0], g2[0], GRAD_TOL[torch.float32], "padding vs truncated grad")


def test_properties(backend):
    """Teacher = student on S: bucket and renormalize give 0; shift invariance of the logits."""
    s = logits((3, 120), seed=18)
    ids = torch.rand(3, 120, generator=torch.Generator().manual_seed(19)).argsort(-1)[:, :10]
    lp = torch.log_softmax(s.double(), -1).gather(-1, ids)
    for tail in ("bucket", "renormalize"):
        out = fk.sparse_divergence(s, ids, lp.float(), "js", tail=tail, reduction="none",
                                   backend=backend)
        assert out.abs().max() < 1e-5
    a = fk.sparse_divergence(s, ids, lp.float(), "kl", reduction="none", backend=backend)
    b = fk.sparse_divergence(s + 100, ids, lp.float(), "kl", reduction="none", backend=backend)
    assert_close(a, b, (1e-4, 1e-5), "shift")


@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_float64(tail, backend):
    if backend == "triton":
        pytest.skip("the Triton kernels compute in fp32")
    s = logits((2, 23), torch.float64, seed=20).requires_grad_(True)
    ids, lp = sparse_teacher((2, 23), 5, seed=21, mass=0.8)
    lp.requires_grad_(True)
    mask = _mask(ids.shape, 22)

    def f(s, lp):
        return fk.sparse_divergence(s, ids, lp, "js", beta=0.3, tail=tail, support_mask=mask,
                                    teacher_temperature=1.5, reduction="none", backend=backend,
                                    inplace_backward=False)

    assert torch.autograd.gradcheck(f, (s, lp))


def test_bad_input():
    s = logits((2, 30), seed=25)
    ids, lp = sparse_teacher((2, 30), 4, seed=26)
    lp = lp.float()
    f = fk.sparse_divergence
    with pytest.raises(ValueError, match="teacher_ids must be in"):
        f(s, torch.where(ids == ids[0, 0], 30, ids), lp)
    with pytest.raises(ValueError, match="teacher_ids must be in"):
        f(s, ids - 100, lp)
    dup = ids.clone()
    dup[1, 3] = dup[1, 0]
    with pytest.raises(ValueError, match="must not repeat"):
        f(s, dup, lp)
    f(s, dup, lp, support_mask=torch.tensor([[True] * 4, [True] * 3 + [False]]))  # padding: ok
    with pytest.raises(ValueError, match="more than the vocabulary"):
        f(s[:, :3], ids[:, :4], lp)
    with pytest.raises(ValueError, match="teacher_logprobs must have the shape"):
        f(s, ids, lp[:, :3])
    with pytest.raises(ValueError, match="teacher_ids must have shape"):
        f(s, ids[:1], lp[:1])
    with pytest.raises(ValueError, match="support_mask must have"):
        f(s, ids, lp, support_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="support_mask must be a bool"):
        f(s, ids, lp, support_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="teacher_ids must be an int64"):
        f(s, ids.float(), lp)
    with pytest.raises(TypeError, match="teacher_logprobs must be floating"):
        f(s, ids, ids)
    with pytest.raises(ValueError, match="K >= 1"):
        f(s, ids[:, :0], lp[:, :0])
    with pytest.raises(ValueError, match="tail must be one of"):
        f(s, ids, lp, tail="rest")
    with pytest.raises(ValueError, match="teacher_temperature"):
        f(s, ids, lp, teacher_temperature=0.0)
    with pytest.raises(ValueError, match="mass on the support must be at most 1"):
        f(s, ids, lp + 0.5, tail="bucket")
    f(s, ids, lp + 0.5, tail="renormalize")  # renormalized: any scale is fine
    full = torch.log_softmax(torch.randn(2, 4, dtype=torch.float64), -1).float()
    f(s, ids, full, tail="bucket")  # mass 1 up to rounding: an empty tail, no error


# ---- fused linear form ----------------------------------------------------------------------


def _fused_reference(hs, ws, bs, ids, lp, kind, labels, ce_weight, reduction, **kw):
    """Materialized float64 logits through the reference; (loss, grads of h, W, b, lp)."""
    h = hs.detach().double().requires_grad_(True)
    w = ws.detach().double().requires_grad_(True)
    b = bs.detach().double().requires_grad_(True)
    t = lp.detach().double().requires_grad_(True)
    z = h @ w.t() + b
    rows = sparse_divergence_rows(z, ids, t, kind, **kw)
    keep = (labels != -100).double()
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(z, labels, reduction="none", ignore_index=-100)
        rows = (1 - ce_weight) * rows + ce_weight * ce
    rows = rows * keep
    loss = rows.sum() / keep.sum() if reduction == "mean" else rows
    weights = torch.linspace(0.5, 2, rows.numel(), dtype=torch.float64)
    out = loss if reduction == "mean" else (loss * weights).sum()
    return loss.detach(), torch.autograd.grad(out, (h, w, b, t)), weights


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("tail", TAILS)
def test_fused_linear_matches_reference(tail, reduction, backend):
    g = torch.Generator().manual_seed(30)
    n, hdim, v, k = 37, 16, 301, 8
    hs = torch.randn(n, hdim, generator=g)
    ws = torch.randn(v, hdim, generator=g) * 0.5
    bs = torch.randn(v, generator=g) * 0.1
    ids, lp = sparse_teacher((n, v), k, seed=31, mass=0.8)
    mask = _mask(ids.shape, 32)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    ce_w = 0.3 if reduction == "mean" else 0.0
    h_ = hs.clone().requires_grad_(True)
    w_ = ws.clone().requires_grad_(True)
    b_ = bs.clone().requires_grad_(True)
    t_ = lp.float().requires_grad_(True)
    out = fk.fused_linear_sparse_divergence(
        h_, w_, ids, t_, "js", beta=0.3, tail=tail, support_mask=mask, student_bias=b_,
        labels=labels, ce_weight=ce_w, reduction=reduction, chunk_size=10, temperature=1.2,
        teacher_temperature=1.5, backend=backend)
    ref, grads, weights = _fused_reference(
        hs, ws, bs, ids, lp, "js", labels, ce_w, reduction, param=0.3, tail=tail,
        support=mask, temperature=1.2, teacher_temperature=1.5)
    (out if reduction == "mean" else (out * weights.float()).sum()).backward()
    tol = (1e-4, 1e-5)
    assert_close(out, ref, tol, "loss")
    for got, want, what in zip((h_.grad, w_.grad, b_.grad, t_.grad), grads, "hWbt"):
        assert_close(got, want, tol, f"grad {what}")


def test_fused_linear_bad_input():
    hs, ws = torch.randn(4, 8), torch.randn(50, 8)
    ids, lp = sparse_teacher((4, 50), 3, seed=33)
    f = fk.fused_linear_sparse_divergence
    with pytest.raises(ValueError, match="student_weight must be"):
        f(hs, ws[:, :7], ids, lp.float())
    with pytest.raises(ValueError, match="teacher_ids must be in"):
        f(hs, ws[:20], torch.where(ids == ids.max(), 49, ids), lp.float())
    with pytest.raises(ValueError, match="ce_weight > 0 needs labels"):
        f(hs, ws, ids, lp.float(), ce_weight=0.5)


# ---- parity with the hosts' formulas, transcribed: axolotl and DistillKit cannot be installed
# here (TRL is, and its own functions are called in tests/test_sparse_trl.py). Each transcription
# names its source; the fk call beside it is the documented mapping (README, offline teachers).


def _axolotl_forward_kl(s, ids, lp, mask, nib=-1, kd_temperature=1.0):
    """axolotl src/axolotl/integrations/kd/topk_logprob/forward_kl.py::loss
    (top_k_before_softmax=0)."""
    z = (s / kd_temperature).float()
    lq = z.gather(-1, ids) - torch.logsumexp(z, -1, keepdim=True)
    valid = mask.bool()
    lq, lp = lq[valid], lp.float()[valid]
    per = lp.exp() * (lp - lq)
    loss = per.sum()
    if kd_temperature != 1.0:
        loss = loss * kd_temperature**2
    return loss / (nib if nib > 0 else per.size(0))


@pytest.mark.parametrize("kd_t", [1.0, 2.0])
def test_parity_axolotl_topk_forward_kl(kd_t, backend):
    """axolotl's top-k forward KL = fk "kl", tail="none", normalized by the count of valid
    (position, k) entries: reduction="mean", num_items_in_batch=support_mask.sum(); times T^2."""
    s = logits((2, 11, 301), seed=42)
    ids, lp = sparse_teacher((2, 11, 301), 8, seed=43, mass=1.0)  # renormalized teacher
    mask = _mask(ids.shape, 44)
    s_ = s.clone().requires_grad_(True)
    ref = _axolotl_forward_kl(s_, ids, lp, mask, kd_temperature=kd_t)
    ref.backward()
    s2 = s.clone().requires_grad_(True)
    out = fk.sparse_divergence(s2, ids, lp.float(), "kl", tail="none", temperature=kd_t,
                               support_mask=mask, num_items_in_batch=mask.sum(),
                               backend=backend) * kd_t**2
    out.backward()
    assert_close(out, ref, (1e-5, 1e-6), "loss")
    assert_close(s2.grad, s_.grad, (1e-4, 1e-7), "grad")


def _distillkit_sparse_kl(s, ids, values, mask, missing, temperature, gen_temperature, eps=1e-8):
    """DistillKit distillkit/lossfuncs (sparse_kl_div_inner with get_target_logprobs,
    log_target=True): the student's full-softmax log-probs at the distillation temperature on
    the ids; the teacher re-tempered by alpha = T_gen / T (renormalized over S, plus the
    leftover^alpha under SYMMETRIC_UNIFORM); SYMMETRIC_UNIFORM adds the missing-mass term."""
    lq = torch.log_softmax(s / temperature, -1).gather(-1, ids)
    if gen_temperature == temperature and missing == "symmetric_uniform":
        lp = values
    else:
        a = gen_temperature / temperature
        leftover = (1.0 - torch.logsumexp(values, -1, keepdim=True).exp()).clamp(0, 1)
        alpha_lse = torch.logsumexp(a * values, -1, keepdim=True)
        if missing == "symmetric_uniform":
            lse = (alpha_lse.exp() + leftover.pow(a)).log()
        else:
            lse = alpha_lse
        lp = a * values - lse
    p = lp.exp()
    inner = (p * (lp - lq)).sum(-1)
    if missing == "symmetric_uniform":
        lt = torch.log1p(-p.sum(-1).clamp(min=eps, max=1 - eps))
        lqt = torch.log1p(-lq.exp().sum(-1).clamp(min=eps, max=1 - eps))
        inner = inner + lt.exp() * (lt - lqt)
    return (inner * mask).sum()


@pytest.mark.parametrize("gen_t", [1.0, 0.7])
@pytest.mark.parametrize("missing", ["zero", "symmetric_uniform"])
def test_parity_distillkit_sparse_kl(missing, gen_t, backend):
    """DistillKit's sparse KL: ZERO = fk "kl", tail="none" on the teacher renormalized over S
    (re-tempering does that; at equal temperatures pass renormalized log-probs);
    SYMMETRIC_UNIFORM = tail="bucket"; teacher_temperature = the generation temperature;
    reduction="sum" over the position mask (labels)."""
    s = logits((3, 7, 257), seed=45)
    ids, lp = sparse_teacher((3, 7, 257), 8, seed=46, mass=0.85)
    rows = torch.rand(3, 7, generator=torch.Generator().manual_seed(47)) > 0.3
    s_ = s.clone().requires_grad_(True)
    ref = _distillkit_sparse_kl(s_, ids, lp, rows.double(), missing, 1.5, gen_t * 1.5)
    ref.backward()
    tt = gen_t * 1.5
    lp_in = lp if (missing == "symmetric_uniform" or tt != 1.5) else torch.log_softmax(lp, -1)
    s2 = s.clone().requires_grad_(True)
    out = fk.sparse_divergence(s2, ids, lp_in.float(), "kl",
                               tail="bucket" if missing == "symmetric_uniform" else "none",
                               temperature=1.5, teacher_temperature=tt,
                               labels=torch.where(rows, 0, -100), reduction="sum",
                               backend=backend)
    out.backward()
    assert_close(out, ref, (1e-5, 1e-5), "loss")
    assert_close(s2.grad, s_.grad, (1e-4, 1e-6), "grad")


def test_module_form():
    s = logits((2, 50), seed=50)
    ids, lp = sparse_teacher((2, 50), 4, seed=51)
    crit = fk.nn.SparseDivergenceLoss("js", beta=0.2, tail="renormalize", backend="torch")
    want = fk.sparse_divergence(s, ids, lp.float(), "js", beta=0.2, tail="renormalize",
                                backend="torch")
    assert_close(crit(s, ids, lp.float()), want, (0, 0), "module")
    with pytest.raises(ValueError, match="tail must be one of"):
        fk.nn.SparseDivergenceLoss(tail="rest")
