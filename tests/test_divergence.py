"""fk.divergence against the float64 reference: every kind, backend and dtype, values and grads."""

import math
import zlib

import pytest
import torch
from conftest import BACKENDS, DTYPES, GRAD_TOL, LOSS_TOL
from helpers import (grad_tol, KIND_PARAMS, assert_close, backend_cfg_fixture, kind_kwargs,
                     zero_at_equal)
from reference import divergence_with_grads, logits

import fdiv_kernels as fk

# Shapes per kernel regime.
SHAPES = [
    (1, 1),        # V = 1: every divergence is 0, every gradient 0
    (1, 1000),     # one row, a real vocabulary
    (3, 17),       # one block, odd tail
    (2, 300),      # several blocks once tests cap the block (see backend_cfg)
    (2, 3, 129),   # 3-D input, block + 1
]


backend_cfg = backend_cfg_fixture(BACKENDS, "fdiv_kernels.triton_kernels.divergence")


def run(kind, param, s, t, backend, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(t.requires_grad)
    loss = fk.divergence(s, t, kind, backend=backend, **kind_kwargs(kind, param), **kw)
    return loss, s, t


@pytest.mark.parametrize("kind,param", KIND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(kind, param, dtype, shape, backend_cfg):
    backend = backend_cfg
    seed = zlib.crc32(repr((kind, param, dtype, shape)).encode())  # stable across runs
    s = logits(shape, dtype, seed=seed)
    t = logits(shape, dtype, seed=seed + 1).requires_grad_(True)
    loss, s_, t_ = run(kind, param, s, t, backend, temperature=1.7, reduction="none")
    loss.sum().backward()
    ref, gs, gt = divergence_with_grads(s, t, kind, param, temperature=1.7)
    assert loss.shape == shape[:-1]
    assert loss.dtype == torch.float32
    assert_close(loss, ref, LOSS_TOL[dtype], "loss")
    assert s_.grad.dtype == dtype
    assert_close(s_.grad, gs, grad_tol(GRAD_TOL[dtype], gs), "student grad")
    assert_close(t_.grad, gt, grad_tol(GRAD_TOL[dtype], gt), "teacher grad")


@pytest.mark.parametrize("kind,param", KIND_PARAMS)
def test_student_only_gradient(kind, param, backend):
    """The student-only path (KL merges its passes) gives the same gradient."""
    s, t = logits((4, 211), seed=1), logits((4, 211), seed=2)
    loss, s_, _ = run(kind, param, s, t, backend, reduction="sum")
    loss.backward()
    _, gs, _ = divergence_with_grads(s, t, kind, param)
    assert_close(s_.grad, gs, GRAD_TOL[torch.float32], "student grad")


def test_weird_shape(backend):
    """A shape with nothing a power of two: (5, 41, 1271)."""
    s, t = logits((5, 41, 1271), seed=3), logits((5, 41, 1271), seed=4)
    loss, s_, _ = run("js", 0.3, s, t, backend, reduction="none", temperature=0.7)
    (loss * torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape)).sum().backward()
    ref, gs, _ = divergence_with_grads(
        s, t, "js", 0.3, 0.7, weights=torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape)
    )
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad, gs, GRAD_TOL[torch.float32], "student grad")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ignored_rows_and_reductions(reduction, backend):
    s, t = logits((2, 5, 64), seed=5), logits((2, 5, 64), seed=6)
    labels = torch.tensor([[1, -100, 3, 4, -100], [7, 8, -100, 1, 2]])
    loss, s_, _ = run("js", 0.5, s, t, backend, labels=labels, reduction=reduction)
    ref, gs, _ = divergence_with_grads(s, t, "js", 0.5)
    keep = labels != -100
    ref = torch.where(keep, ref, 0.0)
    expected = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / keep.sum()}[reduction]
    assert_close(loss, expected, LOSS_TOL[torch.float32], "loss")
    loss.sum().backward()
    scale = 1.0 / keep.sum() if reduction == "mean" else 1.0
    assert_close(s_.grad, gs * keep[..., None] * scale, GRAD_TOL[torch.float32], "grad")
    assert torch.all(s_.grad[~keep] == 0)


def test_mean_over_num_items_and_all_ignored(backend):
    s, t = logits((6, 33), seed=7), logits((6, 33), seed=8)
    ref, _, _ = divergence_with_grads(s, t, "kl")
    loss, _, _ = run("kl", None, s, t, backend, num_items_in_batch=10)
    assert_close(loss, ref.sum() / 10, LOSS_TOL[torch.float32], "loss")
    all_ignored = torch.full((6,), -100)
    loss, s_, _ = run("kl", None, s, t, backend, labels=all_ignored)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.all(s_.grad == 0)


@pytest.mark.parametrize("kind,param", KIND_PARAMS)
def test_masked_vocabulary_entries(kind, param, backend):
    """-inf in both inputs (padded vocabulary) contributes nothing: same as dropping the column."""
    s, t = logits((3, 50), seed=9), logits((3, 50), seed=10)
    masked = torch.zeros(50, dtype=torch.bool)
    masked[[0, 7, 31, 49]] = True
    s[:, masked] = -math.inf
    t[:, masked] = -math.inf
    t.requires_grad_(True)
    loss, s_, t_ = run(kind, param, s, t, backend, reduction="none")
    loss.sum().backward()
    ref, gs, gt = divergence_with_grads(s[:, ~masked], t[:, ~masked], kind, param)
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad[:, ~masked], gs, GRAD_TOL[torch.float32], "student grad")
    assert_close(t_.grad[:, ~masked], gt, GRAD_TOL[torch.float32], "teacher grad")
    assert torch.all(s_.grad[:, masked] == 0) and torch.all(t_.grad[:, masked] == 0)


@pytest.mark.parametrize(
    "kind,expected", [("kl", math.inf), ("reverse_kl", None), ("jeffreys", math.inf),
                      ("chi2", math.inf), ("js", None), ("tv", None), ("hellinger", None)]
)
def test_student_only_inf(kind, expected, backend):
    """q = 0 < p at one entry: KL(p||q) is +inf (not NaN); bounded divergences stay finite."""
    s, t = logits((2, 40), seed=11), logits((2, 40), seed=12)
    s[:, 5] = -math.inf
    loss, _, _ = run(kind, None, s, t, backend, reduction="none")
    if expected is None:
        ref, _, _ = divergence_with_grads(s, t, kind)
        assert torch.isfinite(loss).all()
        assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    else:
        assert torch.all(loss == expected)


def test_nan_in_nan_out(backend):
    s, t = logits((3, 100), seed=13), logits((3, 100), seed=14)
    s[1, 17] = math.nan
    loss, _, _ = run("js", 0.5, s, t, backend, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("kind,param", KIND_PARAMS)
def test_identical_and_shifted_inputs(kind, param, backend):
    """D(p, p) = 0 and a per-row shift of the logits changes nothing (softmax invariance)."""
    s = logits((3, 77), seed=15)
    loss, s_, _ = run(kind, param, s, s.clone(), backend, reduction="none")
    loss.sum().backward()
    if zero_at_equal(kind):
        assert torch.allclose(loss, torch.zeros(3), atol=1e-5)
    else:  # soft_ce: the teacher's entropy
        assert_close(loss, divergence_with_grads(s, s, kind, param)[0], (1e-5, 1e-6), "H(p)")
    t = logits((3, 77), seed=16)
    base, _, _ = run(kind, param, s, t, backend, reduction="none")
    shifted, _, _ = run(kind, param, s + 100.0, t - 50.0, backend, reduction="none")
    assert_close(shifted, base, (1e-4, 1e-5), "shifted")


def test_non_contiguous_and_mixed_dtypes(backend):
    s = logits((40, 6), seed=17).t()  # (6, 40), non-contiguous
    t = logits((6, 40), seed=18, dtype=torch.bfloat16)
    loss, s_, _ = run("kl", None, s, t, backend, reduction="none")
    loss.sum().backward()
    ref, gs, _ = divergence_with_grads(s, t.float(), "kl")
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(s_.grad, gs, GRAD_TOL[torch.float32], "grad")


def test_teacher_without_grad_gets_none(backend):
    s, t = logits((2, 30), seed=19), logits((2, 30), seed=20)
    loss, s_, t_ = run("js", None, s, t, backend)
    loss.backward()
    assert s_.grad is not None and t_.grad is None


def test_degenerate_parameters_fold_to_kl():
    s, t = logits((3, 30), seed=21), logits((3, 30), seed=22)
    kl = fk.divergence(s, t, "kl", backend="torch", reduction="none")
    rkl = fk.divergence(s, t, "reverse_kl", backend="torch", reduction="none")
    assert torch.equal(fk.divergence(s, t, "js", beta=0.0, backend="torch", reduction="none"), kl)
    assert torch.equal(fk.divergence(s, t, "js", beta=1.0, backend="torch", reduction="none"), rkl)
    assert torch.equal(fk.divergence(s, t, "alpha", alpha=1.0, backend="torch", reduction="none"), kl)
    assert torch.equal(fk.divergence(s, t, "alpha", alpha=0.0, backend="torch", reduction="none"), rkl)
    assert torch.equal(fk.divergence(s, t, "skew_kl", lam=0.0, backend="torch", reduction="none"), kl)


def test_backends_agree_with_torch_backend(backend):
    """Every backend against the torch backend (the readable spec), on a mid-size batch."""
    s, t = logits((16, 1000), seed=23), logits((16, 1000), seed=24)
    for kind in fk.KINDS:
        a = fk.divergence(s, t, kind, backend=backend, reduction="none")
        b = fk.divergence(s, t, kind, backend="torch", reduction="none")
        assert_close(a, b, (5e-5, 5e-6), kind)


def test_nn_module(backend):
    crit = fk.nn.FDivergenceLoss("reverse_kl", temperature=2.0, backend=backend)
    s, t = logits((4, 50), seed=25), logits((4, 50), seed=26)
    ref, _, _ = divergence_with_grads(s, t, "reverse_kl", temperature=2.0)
    assert_close(crit(s, t), ref.mean(), LOSS_TOL[torch.float32], "module")
    with pytest.raises(ValueError, match="kind"):
        fk.nn.FDivergenceLoss("nope")
