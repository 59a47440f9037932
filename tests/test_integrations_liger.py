"""fdiv_kernels.integrations.liger against liger-kernel 0.8.5: its own modules where they run on
the CPU (LigerJSD and the fused-linear JSDs under the Triton interpreter, the chunked
LigerFusedLinearJSDLoss in torch), else its formulas transcribed below with the source named."""

import sys

import pytest
import torch

from fdiv_kernels.integrations import liger as fk_liger


def _logits(n=13, v=203, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(n, v, generator=g) * 2).to(dtype) for _ in range(2))


def _labels(n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[torch.rand(n, generator=g) < 0.3] = -100
    return lab


def _grads(loss_fn, s, t, transform):
    """Loss and gradients w.r.t. the raw logits the caller transformed into the loss inputs."""
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = loss_fn(transform(s), transform(t))
    out.sum().backward()
    return out.detach(), s.grad, t.grad


def _close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_liger_kernel(beta):
    jsd = pytest.importorskip("liger_kernel.transformers.jsd")
    s, t = _logits()
    lab = _labels(13, 203)
    lsm = lambda x: x.log_softmax(-1)  # noqa: E731
    for labels in (None, lab):
        ours = _grads(lambda a, b: fk_liger.LigerJSD(beta)(a, b, labels), s, t, lsm)
        theirs = _grads(lambda a, b: jsd.LigerJSD(beta)(a, b, labels), s, t, lsm)
        _close(ours[:2], theirs[:2])       # Liger gives no gradient to the teacher


# liger_kernel/ops/kl_div.py (0.8.5): element y_true * (log(max(y_true, eps)) - y_pred), or
# exp(y_true) * (y_true - y_pred) with log_target; "batchmean" / BT, "mean" / (BT V), "sum".
def _liger_kl(y_pred, y_true, reduction, log_target, eps=1e-10):
    el = (torch.exp(y_true) * (y_true - y_pred) if log_target
          else y_true * (torch.log(torch.clamp(y_true, min=eps)) - y_pred))
    if reduction == "none":
        return el.sum(-1)                   # the shim's documented per-row form
    total = el.sum()
    return {"sum": total, "batchmean": total / y_pred.shape[0],
            "mean": total / y_pred.numel()}[reduction]


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kldiv_matches_liger_formula(reduction, log_target):
    s, t = _logits(seed=1)
    target = (lambda x: x.log_softmax(-1)) if log_target else (lambda x: x.softmax(-1))
    ours = _grads(lambda a, b: fk_liger.LigerKLDIVLoss(reduction=reduction, log_target=log_target)(
        a.log_softmax(-1), target(b)), s, t, lambda x: x)
    theirs = _grads(lambda a, b: _liger_kl(a.log_softmax(-1), target(b), reduction, log_target),
                    s, t, lambda x: x)
    _close(ours, theirs)


# liger_kernel/ops/tvd.py (0.8.5): per element 0.5 |p - q|, ignored rows 0; "batchmean" / kept
# rows, "mean" / (kept rows * V), "sum".
def _liger_tvd(p, q, labels, reduction, ignore_index=-100):
    rows = 0.5 * (p - q).abs().sum(-1)
    kept = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = rows * kept
    if reduction == "none":
        return rows
    n = kept.sum()
    return {"sum": rows.sum(), "batchmean": rows.sum() / n,
            "mean": rows.sum() / (n * p.shape[-1])}[reduction]


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_tvd_matches_liger_formula(reduction):
    s, t = _logits(seed=2)
    lab = _labels(13, 203, seed=2)
    for labels in (None, lab):
        sm = lambda x: x.softmax(-1)  # noqa: E731
        ours = _grads(lambda a, b: fk_liger.LigerTVDLoss(reduction)(a, b, labels), s, t, sm)
        theirs = _grads(lambda a, b: _liger_tvd(a, b, labels, reduction), s, t, sm)
        _close(ours, theirs)


def _hidden(n=37, hs=24, ht=40, v=211, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hs, generator=g), torch.randn(v, hs, generator=g) / 3,
            torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) / 4,
            _labels(n, v, seed))


def _fl_grads(module, hs, ws, ht, wt, *rest):
    hs = hs.clone().requires_grad_(True)
    ws = ws.clone().requires_grad_(True)
    out = module(hs, ws, ht, wt, *rest)
    out = out[0] if isinstance(out, tuple) else out
    out.backward()
    return out.detach(), hs.grad, ws.grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_linear_jsd_matches_liger_kernel(beta, temperature):
    fl = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd")
    hs, ws, ht, wt, lab = _hidden()
    # Liger's module takes (student_input, student_weight, teacher_input, teacher_weight, labels).
    ours = _fl_grads(lambda a, b, c, d, e: fk_liger.LigerFusedLinearJSD(beta, -100, temperature)(
        a, b, c, d, e), hs, ws, ht, wt, lab)
    theirs = _fl_grads(lambda a, b, c, d, e: fl.LigerFusedLinearJSD(beta, -100, temperature)(
        a, b, c, d, e), hs, ws, ht, wt, lab)
    _close(ours, theirs)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0), (0.3, 0.9)])
def test_chunked_fused_linear_jsd_loss_matches_liger(weights):
    jl = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    hs, ws, ht, wt, lab = _hidden(seed=4)
    kw = dict(weight_hard_loss=weights[0], weight_soft_loss=weights[1], beta=0.3,
              temperature=2.0, compiled=False, chunk_size=16)
    ours = _fl_grads(fk_liger.LigerFusedLinearJSDLoss(**kw), hs, ws, ht, wt, lab)
    theirs = _fl_grads(jl.LigerFusedLinearJSDLoss(**kw), hs, ws, ht, wt, lab)
    _close(ours, theirs)
    parts = fk_liger.LigerFusedLinearJSDLoss(**kw, return_soft_hard_loss=True)(hs, ws, ht, wt, lab)
    ref = jl.LigerFusedLinearJSDLoss(**kw, return_soft_hard_loss=True)(hs, ws, ht, wt, lab)
    _close(parts, [r.detach() for r in ref])


def test_apply_fk_to_liger_rebinds_and_undoes():
    lt = pytest.importorskip("liger_kernel.transformers")
    cl = pytest.importorskip("liger_kernel.chunked_loss")
    orig = lt.LigerJSD, cl.LigerFusedLinearJSDLoss
    patch = fk_liger.apply_fk_to_liger()
    try:
        assert lt.LigerJSD is fk_liger.LigerJSD
        assert cl.LigerFusedLinearJSDLoss is fk_liger.LigerFusedLinearJSDLoss
        assert sys.modules["liger_kernel.transformers.jsd"].LigerJSD is fk_liger.LigerJSD
        assert fk_liger.apply_fk_to_liger().targets == []
    finally:
        patch.undo()
    assert (lt.LigerJSD, cl.LigerFusedLinearJSDLoss) == orig
