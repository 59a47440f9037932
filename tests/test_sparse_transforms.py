"""The student logit transforms of the sparse-teacher ops (issue 13): ``student_logit_scale`` s
and ``student_softcap`` c, applied inside the kernels as z <- s z, z <- c tanh(z / c), then z / T,
against applying them in torch first (loss and gradients, every backend), and the support-mask
convention (True = a real entry)."""

import pytest
import torch
from conftest import GRAD_TOL, LOSS_TOL
from helpers import assert_close, available_backends
from reference import logits, sparse_divergence_rows, sparse_teacher

import fdiv_kernels as fk

BACKENDS = available_backends("sparse_divergence_fwd")
TAILS = ["none", "bucket", "renormalize"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _transform(z, scale, cap):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("scale,cap", [(0.7, None), (1.0, 3.0), (1.6, 2.5)])
def test_transforms_match_torch_first(scale, cap, tail, backend):
    """Logits up to ~+-9 so that the softcap bends them (tanh(9 s / c) ~ 1); T = 1.3, padding,
    an ignored row and a teacher gradient."""
    s = logits((3, 5, 151), seed=70) * 3
    ids, lp = sparse_teacher((3, 5, 151), 8, seed=71, mass=0.85)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(72)) > 0.2
    mask[..., 0] = True
    labels = torch.zeros(3, 5, dtype=torch.int64)
    labels[1, 2] = -100
    kw = dict(tail=tail, temperature=1.3, support_mask=mask, labels=labels, reduction="none",
              backend=backend)
    s1 = s.clone().requires_grad_(True)
    t1 = lp.float().requires_grad_(True)
    out = fk.sparse_divergence(s1, ids, t1, "js", beta=0.3, student_logit_scale=scale,
                               student_softcap=cap, **kw)
    w = torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    s2 = s.clone().requires_grad_(True)
    t2 = lp.float().requires_grad_(True)
    want = fk.sparse_divergence(_transform(s2, scale, cap), ids, t2, "js", beta=0.3, **kw)
    (want * w).sum().backward()
    assert_close(out, want, LOSS_TOL[torch.float32], "loss")
    assert_close(s1.grad, s2.grad, GRAD_TOL[torch.float32], "student grad")
    assert_close(t1.grad, t2.grad, GRAD_TOL[torch.float32], "teacher grad")
    # And against the float64 reference of the transformed logits (the transform is not a no-op).
    ref = sparse_divergence_rows(_transform(s.double(), scale, cap), ids, lp, "js", 0.3,
                                 tail=tail, temperature=1.3, support=mask)
    assert_close(out, torch.where(labels != -100, ref, 0.0), LOSS_TOL[torch.float32], "ref")
    plain = fk.sparse_divergence(s, ids, lp.float(), "js", beta=0.3, **kw)
    assert (plain - out).abs().max() > 1e-3


def test_transforms_gradcheck_float64():
    s = (logits((2, 23), torch.float64, seed=73) * 3).requires_grad_(True)
    ids, lp = sparse_teacher((2, 23), 5, seed=74, mass=0.8)
    for backend in [b for b in BACKENDS if b != "triton"]:  # Triton computes in fp32
        for tail in TAILS:
            def f(s, backend=backend, tail=tail):
                return fk.sparse_divergence(s, ids, lp, "kl", tail=tail, reduction="none",
                                            student_logit_scale=1.3, student_softcap=2.0,
                                            backend=backend)

            assert torch.autograd.gradcheck(f, (s,)), (backend, tail)


@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_fused_linear_transforms(ce_weight, backend):
    """fused_linear_sparse_divergence with a scale and a softcap = the float64 reference on the
    transformed materialized logits (the CE part included), gradients to h, W, b."""
    g = torch.Generator().manual_seed(75)
    n, hdim, v, k = 21, 16, 203, 8
    hs = torch.randn(n, hdim, generator=g)
    ws = torch.randn(v, hdim, generator=g)
    bs = torch.randn(v, generator=g) * 0.1
    ids, lp = sparse_teacher((n, v), k, seed=76, mass=0.8)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    h_, w_, b_ = (x.clone().requires_grad_(True) for x in (hs, ws, bs))
    out = fk.fused_linear_sparse_divergence(
        h_, w_, ids, lp.float(), "kl", tail="bucket", student_bias=b_, labels=labels,
        ce_weight=ce_weight, chunk_size=8, temperature=1.2, student_logit_scale=0.8,
        student_softcap=4.0, backend=backend)
    out.backward()
    h, w, b = (x.double().requires_grad_(True) for x in (hs, ws, bs))
    z = _transform(h @ w.t() + b, 0.8, 4.0)
    rows = sparse_divergence_rows(z, ids, lp, "kl", tail="bucket", temperature=1.2)
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(z, labels, reduction="none", ignore_index=-100)
        rows = (1 - ce_weight) * rows + ce_weight * ce
    keep = (labels != -100).double()
    ref = (rows * keep).sum() / keep.sum()
    ref.backward()
    assert (z.detach().abs() > 2.0).any()  # the softcap bends some logits
    tol = (1e-4, 1e-5)
    assert_close(out, ref, tol, "loss")
    for got, want, what in zip((h_.grad, w_.grad, b_.grad), (h.grad, w.grad, b.grad), "hWb"):
        assert_close(got, want, tol, f"grad {what}")


def test_transform_bad_input():
    s = logits((2, 30), seed=77)
    ids, lp = sparse_teacher((2, 30), 4, seed=78)
    with pytest.raises(ValueError, match="student_logit_scale"):
        fk.sparse_divergence(s, ids, lp.float(), student_logit_scale=0.0)
    with pytest.raises(ValueError, match="student_softcap"):
        fk.sparse_divergence(s, ids, lp.float(), student_softcap=-1.0)
    with pytest.raises(TypeError, match="student_softcap"):
        fk.sparse_divergence(s, ids, lp.float(), student_softcap="30")


@pytest.mark.parametrize("tail", TAILS)
def test_support_mask_marks_real_entries(tail, backend):
    """support_mask is True on real entries and False on padding: masking equals dropping the
    False entries, and the flipped mask gives another answer (so a wrong convention fails)."""
    s = logits((3, 90), seed=79)
    ids, lp = sparse_teacher((3, 90), 6, seed=80, mass=0.6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    kw = dict(tail=tail, reduction="none", backend=backend)
    masked = fk.sparse_divergence(s, ids, lp.float(), "kl", support_mask=mask, **kw)
    kept = fk.sparse_divergence(s, ids[:, :3].contiguous(), lp[:, :3].float(), "kl", **kw)
    assert_close(masked, kept, LOSS_TOL[torch.float32], "mask = the True entries")
    flipped = fk.sparse_divergence(s, ids, lp.float(), "kl", support_mask=~mask, **kw)
    others = fk.sparse_divergence(s, ids[:, 3:].contiguous(), lp[:, 3:].float(), "kl", **kw)
    assert_close(flipped, others, LOSS_TOL[torch.float32], "flipped = the other entries")
    assert (flipped - masked).abs().min() > 1e-4
