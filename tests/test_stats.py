"""``return_stats=True``: the detached training statistics (student entropy summed over kept rows,
kept-row count, soft and hard parts), against eager computations; and the logit transforms passed
through ``fk.fused_linear_divergence`` (both sides, the cross-entropy part, a wider teacher
vocabulary), forward and gradients against the float64 reference."""

import pytest
import torch

import fdiv_kernels as fk
from conftest import BACKENDS, LOSS_TOL
from helpers import assert_close, grad_tol
from reference import divergence_rows, logits, softmax_stats_rows, transform_logits

F32 = LOSS_TOL[torch.float32]


def _labels(n, v, seed, ignored=(1, 4)):
    lab = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    lab[list(ignored)] = -100
    return lab


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_divergence_stats(backend, reduction):
    s, t = logits((2, 3, 29), seed=1), logits((2, 3, 29), seed=2)
    labels = _labels(6, 29, 3).reshape(2, 3)
    loss, stats = fk.divergence(s, t, "kl", labels=labels, temperature=2.0, reduction=reduction,
                                backend=backend, return_stats=True)
    assert isinstance(stats, fk.DivergenceStats)
    plain = fk.divergence(s, t, "kl", labels=labels, temperature=2.0, reduction=reduction,
                          backend=backend)
    assert_close(loss, plain, (0, 0), "loss unchanged by return_stats")
    keep = labels != -100
    _, ent, _ = softmax_stats_rows(s, temperature=2.0)
    assert_close(stats.entropy_sum, ent[keep].sum(), F32, "entropy_sum")
    assert stats.entropy_sum.dim() == 0 and stats.entropy_sum.dtype == torch.float32
    assert stats.num_rows.dtype == torch.int64 and stats.num_rows.dim() == 0
    assert int(stats.num_rows) == int(keep.sum())
    assert_close(stats.soft_loss, loss, (0, 0), "soft_loss")
    assert stats.hard_loss is None
    assert not stats.entropy_sum.requires_grad and not stats.soft_loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stats_edges(backend):
    s, t = logits((4, 9), seed=5), logits((4, 9), seed=6)
    # Every row ignored: no entropy, no rows, zero loss.
    _, stats = fk.divergence(s, t, labels=torch.full((4,), -100), backend=backend,
                             return_stats=True)
    assert float(stats.entropy_sum) == 0 and int(stats.num_rows) == 0
    # No labels: every row kept; an empty batch: zeros.
    _, stats = fk.divergence(s, t, backend=backend, return_stats=True)
    assert int(stats.num_rows) == 4
    _, stats = fk.divergence(s[:0], t[:0], backend=backend, return_stats=True)
    assert float(stats.entropy_sum) == 0 and int(stats.num_rows) == 0
    # float64 statistics for float64 inputs (backends that take them).
    if backend in ("torch", "cpu"):
        _, stats = fk.divergence(s.double(), t.double(), backend=backend, return_stats=True)
        assert stats.entropy_sum.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "skew_reverse_kl", "js", "kl"])
def test_divergence_stats_student_side(backend, kind):
    """The entropy is the student's whichever side the kind evaluates it on (reverse_kl and
    skew_reverse_kl swap p and q in the kernel), over rows longer than one CPU block (4096) and
    with -inf student logits (0 log 0 = 0)."""
    s, t = logits((3, 5000), seed=11, scale=3.0), logits((3, 5000), seed=12)
    s[0, ::7] = float("-inf")
    _, stats = fk.divergence(s, t, kind, temperature=1.5, backend=backend, return_stats=True)
    _, ent, _ = softmax_stats_rows(s, temperature=1.5)
    _, ent_t, _ = softmax_stats_rows(t, temperature=1.5)
    assert abs(float(ent.sum()) - float(ent_t.sum())) > 1.0  # the sides tell apart
    assert_close(stats.entropy_sum, ent.sum(), F32, f"{kind}: student entropy_sum")


# ---- fused_linear_divergence ------------------------------------------------------------------

N, H_S, H_T, VS = 9, 8, 6, 23


def _fl_inputs(vt=VS, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()

    hs, ws = r(N, H_S, scale=2.0), r(VS, H_S)
    ht, wt = r(N, H_T, scale=2.0), r(vt, H_T)
    bs, bt = (r(VS), r(vt)) if bias else (None, None)
    return hs, ws, bs, ht, wt, bt


def _eager(hs, ws, bs, ht, wt, bt, labels, kind, ce_w, T, xf, reduction):
    """Loss, soft, hard, entropy sum of the same call written out in float64."""
    zs = hs.double() @ ws.double().T + (bs.double() if bs is not None else 0)
    zt = ht.double() @ wt.double().T + (bt.double() if bt is not None else 0)
    zs = transform_logits(zs, xf[0], xf[1])
    zt = transform_logits(zt, xf[2], xf[3])
    if zt.shape[-1] > zs.shape[-1]:
        # The student's missing entries have probability 0: e^-700 here, so that autograd
        # through the reference's xlogy stays finite (0 log 0 would make it NaN).
        low = zs.detach().amax(-1, keepdim=True) - 700.0 * T
        zs_full = torch.cat([zs, low.expand(-1, zt.shape[-1] - zs.shape[-1])], -1)
    else:
        zs_full = zs
    keep = labels != -100
    div = torch.where(keep, divergence_rows(zs_full, zt, kind, None, T), 0.0)
    lp = torch.log_softmax(zs, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    ce = torch.where(keep, -lp, 0.0)
    _, ent, _ = softmax_stats_rows(zs, temperature=T)
    w = keep.double()
    if reduction == "mean":
        w = w / w.sum().clamp(min=1)

    def red(x):
        return x if reduction == "none" else (x * w).sum()

    return red((1 - ce_w) * div + ce_w * ce), red(div), red(ce), ent[keep].sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xf", [
    (1.0, None, 1.0, None),
    (0.0625, 30.0, 0.5, None),
    (1.0, 2.0, 1.0, 2.0),
])
@pytest.mark.parametrize("ce_w", [0.0, 0.25])
@pytest.mark.parametrize("vt", [VS, VS + 4])
def test_fused_linear_transforms_and_stats(backend, xf, ce_w, vt):
    hs, ws, bs, ht, wt, bt = _fl_inputs(vt, seed=7)
    labels = _labels(N, VS, 8)
    T = 2.0
    params = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss, stats = fk.fused_linear_divergence(
        params[0], params[1], ht, wt, "js", beta=0.5, temperature=T, student_bias=params[2],
        teacher_bias=bt, labels=labels,
        ce_weight=ce_w, chunk_size=4, backend=backend, student_logit_scale=xf[0],
        student_softcap=xf[1], teacher_logit_scale=xf[2], teacher_softcap=xf[3],
        return_stats=True, vocab_size=VS if vt != VS else None,
    )
    loss.backward()
    ref_params = [x.detach().double().requires_grad_(True) for x in (hs, ws, bs)]
    # A teacher head padded to vt rows: its first VS rows are the vocabulary.
    ref, soft, hard, ent = _eager(*ref_params, ht, wt[:VS], bt[:VS], labels, "js", ce_w, T, xf,
                                  "mean")
    grads = torch.autograd.grad(ref, ref_params)
    assert_close(loss, ref.detach(), F32, "loss")
    for name, p, g in zip(("hidden", "weight", "bias"), params, grads):
        assert_close(p.grad, g, grad_tol((2e-5, 1e-7), g), f"grad {name}")
    assert_close(stats.entropy_sum, ent, F32, "entropy_sum")
    assert int(stats.num_rows) == int((labels != -100).sum())
    assert_close(stats.soft_loss, soft.detach(), F32, "soft_loss")
    if ce_w:
        assert_close(stats.hard_loss, hard.detach(), F32, "hard_loss")
        assert_close((1 - ce_w) * stats.soft_loss + ce_w * stats.hard_loss, loss, F32, "parts")
    else:
        assert stats.hard_loss is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_stats_reductions(backend, reduction):
    hs, ws, bs, ht, wt, bt = _fl_inputs(seed=3, bias=False)
    labels = _labels(N, VS, 4)
    xf = (0.5, 30.0, 1.0, 30.0)
    loss, stats = fk.fused_linear_divergence(
        hs, ws, ht, wt, "kl", labels=labels, ce_weight=0.5, reduction=reduction,
        backend=backend, student_logit_scale=xf[0], student_softcap=xf[1],
        teacher_softcap=xf[3], return_stats=True,
    )
    ref, soft, hard, ent = _eager(hs, ws, None, ht, wt, None, labels, "kl", 0.5, 1.0, xf,
                                  reduction)
    assert_close(loss.detach(), ref, F32, "loss")
    assert_close(stats.soft_loss, soft, F32, "soft_loss")
    assert_close(stats.hard_loss, hard, F32, "hard_loss")
    assert_close(stats.entropy_sum, ent, F32, "entropy_sum")


@pytest.mark.parametrize("bad, exc, match", [
    (dict(student_softcap=0.0), ValueError, "student_softcap"),
    (dict(teacher_logit_scale=-2.0), ValueError, "teacher_logit_scale"),
    (dict(return_stats="yes"), TypeError, "return_stats"),
])
def test_fused_linear_bad_transforms(bad, exc, match):
    hs, ws, _, ht, wt, _ = _fl_inputs()
    with pytest.raises(exc, match=match):
        fk.fused_linear_divergence(hs, ws, ht, wt, **bad)
