"""fdiv_kernels.integrations.liger against liger-kernel 0.8.5's own modules, run on the CPU (its
Triton kernels under the interpreter, the chunked LigerFusedLinearJSDLoss in torch). The
contract the tests hold is docs/hosts/liger.md's."""

import sys
import types

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
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6)


def _leaf_run(module, x, y, *rest, weight=None):
    """Liger's contract: x and y are leaves used as they are; the loss (times a weight when
    "none" returns elements) backpropagates to x, and y gets no gradient."""
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    out = module(x, y, *rest)
    (out * weight if weight is not None and out.dim() else out).sum().backward()
    return out.detach(), x.grad, y.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_keeps_liger_contract_on_log_prob_leaves(beta, dtype):
    jsd = pytest.importorskip("liger_kernel.transformers.jsd")
    s, t = _logits(dtype=dtype)
    # Log-probabilities made once, then leaves: the gradient is the terms' own, not projected.
    log_q, log_p = s.float().log_softmax(-1).to(dtype), t.float().log_softmax(-1).to(dtype)
    for labels in (None, _labels(13, 203)):
        ours = _leaf_run(fk_liger.LigerJSD(beta), log_q, log_p, labels)
        theirs = _leaf_run(jsd.LigerJSD(beta), log_q, log_p, labels)
        assert ours[0].dtype == theirs[0].dtype == dtype and ours[2] is None
        tol = ({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32
               else {"rtol": 2e-2, "atol": 1e-5})
        torch.testing.assert_close(ours[0], theirs[0], **tol)
        torch.testing.assert_close(ours[1], theirs[1], **tol)
        # Through a log_softmax the drop-in still agrees with Liger (and with fk's logits path).
        _close(_grads(lambda a, b, lab=labels: fk_liger.LigerJSD(beta)(a, b, lab), s.float(),
                      t.float(), lambda x: x.log_softmax(-1))[:2],
               _grads(lambda a, b, lab=labels: jsd.LigerJSD(beta)(a, b, lab), s.float(),
                      t.float(), lambda x: x.log_softmax(-1))[:2])


def test_jsd_all_rows_ignored_is_zero():
    s, t = _logits()
    out, g, _ = _leaf_run(fk_liger.LigerJSD(0.5), s.log_softmax(-1), t.log_softmax(-1),
                          torch.full((13,), -100))
    assert out.item() == 0.0 and torch.count_nonzero(g) == 0


def test_jsd_gradient_is_not_projected():
    """The defect this guards: reading log-probs as logits projects the gradient onto the
    simplex (its row sums vanish); Liger's does not."""
    s, t = _logits()
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    _, g, _ = _leaf_run(fk_liger.LigerJSD(0.5), log_q, log_p)
    assert g.sum(-1).abs().min() > 1e-4


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kldiv_matches_torch_kldivloss_as_liger(reduction, log_target):
    """Liger's KL kernel does not run under the Triton interpreter; its contract is
    nn.KLDivLoss's (its parent class, and its own suite's reference) with the target given no
    gradient, so torch's module is the reference here."""
    s, t = _logits(seed=1)
    y_pred = s.log_softmax(-1)
    # Targets not renormalized (as nn.KLDivLoss): a scaled distribution keeps its scale.
    y_true = t.log_softmax(-1) - 0.3 if log_target else t.softmax(-1) * 0.7
    w = torch.rand(y_pred.shape, generator=torch.Generator().manual_seed(5))
    ours = _leaf_run(fk_liger.LigerKLDIVLoss(reduction=reduction, log_target=log_target),
                     y_pred, y_true, weight=w)
    ref = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)
    theirs = _leaf_run(lambda a, b: ref(a, b.detach()), y_pred, y_true, weight=w)
    assert ours[0].shape == theirs[0].shape and ours[0].dtype == torch.float32
    _close(ours, theirs)


def _liger_suite_tvd(p, q, labels, reduction, ignore_index=-100):
    """``TorchTVDLoss`` of Liger's own suite (test/transformers/test_tvd.py, 0.8.5), the
    reference its kernel is held to: Liger's kernel does not run under the Triton interpreter
    (``scale.to`` on a Python float), so this is the one TVD reference the CPU can run."""
    tvd = torch.abs(p - q) / 2.0
    n = p.size(0)
    if labels is not None:
        tvd = torch.where(labels.unsqueeze(1) != ignore_index, tvd, torch.zeros_like(tvd))
        n = (labels != ignore_index).sum().item()
    if reduction == "mean":
        return torch.sum(tvd) / (n * p.size(1))
    if reduction == "sum":
        return torch.sum(tvd)
    return tvd if reduction == "none" else torch.sum(tvd) / n


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_tvd_matches_liger_suite_on_any_tensor(reduction):
    s, t = _logits(seed=2)
    t = t.softmax(-1)                       # Liger's own suite: randn against probabilities
    w = torch.rand(s.shape, generator=torch.Generator().manual_seed(6))
    for labels in (None, _labels(13, 203, seed=2)):
        ours = _leaf_run(fk_liger.LigerTVDLoss(reduction), s, t, labels, weight=w)
        theirs = _leaf_run(lambda a, b, lab=labels: _liger_suite_tvd(a, b.detach(), lab, reduction),
                           s, t, weight=w)
        assert ours[0].shape == theirs[0].shape and ours[0].dtype == torch.float32
        _close(ours, theirs)


def test_log_prob_modules_refuse_mismatched_inputs():
    s, t = _logits()
    with pytest.raises(ValueError, match="one shape"):
        fk_liger.LigerJSD()(s, t[:, :-1])
    with pytest.raises(ValueError, match="shift_labels"):
        fk_liger.LigerTVDLoss()(s, t, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        fk_liger.LigerTVDLoss("avg")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_tvd_matches_liger(dtype):
    """LigerFusedCETVDLoss (liger_kernel.transformers; its Triton kernel under the interpreter):
    the two unreduced per-row terms and the student gradient of a weighted sum of both."""
    ct = pytest.importorskip("liger_kernel.transformers.fused_ce_tvd")
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(37, 211, generator=g) * 1.5).to(dtype)
    t = (torch.randn(37, 211, generator=g) * 1.5).to(dtype)
    s[3, :50] = float("-inf")                          # a row with masked-out vocabulary
    y = torch.randint(50, 211, (37,), generator=g)
    y[[0, 5, 6]] = -100
    w_ce, w_tvd = torch.rand(37, generator=g), torch.rand(37, generator=g)

    def run(cls):
        z = s.clone().requires_grad_(True)
        ce, tvd = cls()(z, t, y)
        ((ce * w_ce).sum() + (tvd * w_tvd).sum()).backward()
        return ce.detach(), tvd.detach(), z.grad

    ref, ours = run(ct.LigerFusedCETVDLoss), run(fk_liger.LigerFusedCETVDLoss)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}   # the grad's dtype
    for name, o, r in zip(("ce", "tvd", "grad"), ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, **(tol if name == "grad" else {}), msg=name)
    assert torch.all(ours[0][[0, 5, 6]] == 0) and torch.all(ours[2][[0, 5, 6]] == 0)
    kept = y != -100
    assert ref[1][kept].min() > 0.05 and ref[1][kept].max() < 0.95


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("labels", [True, False])
def test_fused_linear_kl_div_matches_liger(reduction, labels):
    """LigerFusedLinearKLDivLoss (liger_kernel.transformers; its Triton kernel under the
    interpreter): a dense teacher distribution as data, zeros in it, ignored rows; loss and
    the gradients of hidden states and weight."""
    kd = pytest.importorskip("liger_kernel.transformers.fused_linear_kl_div")
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(21, 16, generator=g), torch.randn(173, 16, generator=g) * 0.5
    q = torch.randn(21, 173, generator=g).mul(2).softmax(-1)
    q[0, :40] = 0                                         # a sparse teacher row
    q[0] /= q[0].sum()
    y = torch.randint(0, 173, (21,), generator=g) if labels else None
    if labels:
        y[[2, 9]] = -100

    def run(cls):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = cls(reduction=reduction, temperature=1.7)(hh, ww, q, y)
        (out * 1.3).backward()
        return out.detach(), hh.grad, ww.grad

    ref, ours = run(kd.LigerFusedLinearKLDivLoss), run(fk_liger.LigerFusedLinearKLDivLoss)
    for name, o, r in zip(("loss", "dh", "dw"), ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-7, msg=name)
    assert ref[0] > 1e-3
    with pytest.raises(ValueError, match="reduction"):
        fk_liger.LigerFusedLinearKLDivLoss(reduction="none")(h, w, q)


def test_apply_fk_to_liger_rebinds_and_undoes():
    lt = pytest.importorskip("liger_kernel.transformers")
    cl = pytest.importorskip("liger_kernel.chunked_loss")
    orig = lt.LigerJSD, cl.LigerFusedLinearJSDLoss, lt.LigerFusedCETVDLoss
    patch = fk_liger.apply_fk_to_liger()
    try:
        assert lt.LigerJSD is fk_liger.LigerJSD
        assert lt.LigerFusedCETVDLoss is fk_liger.LigerFusedCETVDLoss
        assert lt.LigerFusedLinearKLDivLoss is fk_liger.LigerFusedLinearKLDivLoss
        assert cl.LigerFusedLinearJSDLoss is fk_liger.LigerFusedLinearJSDLoss
        assert sys.modules["liger_kernel.transformers.jsd"].LigerJSD is fk_liger.LigerJSD
        assert fk_liger.apply_fk_to_liger().targets == []
    finally:
        patch.undo()
    assert (lt.LigerJSD, cl.LigerFusedLinearJSDLoss, lt.LigerFusedCETVDLoss) == orig


def _script(**names):
    """A loaded module standing for a user's training script."""
    mod = types.ModuleType("fk_test_user_script")
    mod.__dict__.update(names)
    sys.modules[mod.__name__] = mod
    return mod


def test_apply_fk_to_liger_reaches_names_imported_before_it():
    cl = pytest.importorskip("liger_kernel.chunked_loss")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # the usual script style

    script = _script(LigerFusedLinearJSDLoss=LigerFusedLinearJSDLoss, JSD=LigerFusedLinearJSDLoss)
    try:
        patch = fk_liger.apply_fk_to_liger()
        try:
            assert script.LigerFusedLinearJSDLoss is fk_liger.LigerFusedLinearJSDLoss
            assert script.JSD is fk_liger.LigerFusedLinearJSDLoss         # under any name
            # A module imported while the patch is active copies the patched name ...
            late = _script(LigerFusedLinearJSDLoss=cl.LigerFusedLinearJSDLoss)
            late.__name__ = "fk_test_late"
            sys.modules["fk_test_late"] = late
        finally:
            patch.undo()
        assert script.LigerFusedLinearJSDLoss is LigerFusedLinearJSDLoss is script.JSD
        assert late.LigerFusedLinearJSDLoss is LigerFusedLinearJSDLoss  # ... and undo reaches it
    finally:
        sys.modules.pop("fk_test_user_script", None)
        sys.modules.pop("fk_test_late", None)


def test_undo_leaves_modules_that_hold_the_drop_in_itself():
    """Code that imported fdiv_kernels' class on purpose keeps it after undo()."""
    pytest.importorskip("liger_kernel.chunked_loss")
    mine = _script(LigerFusedLinearJSDLoss=fk_liger.LigerFusedLinearJSDLoss)
    try:
        fk_liger.apply_fk_to_liger().undo()
        assert mine.LigerFusedLinearJSDLoss is fk_liger.LigerFusedLinearJSDLoss
    finally:
        sys.modules.pop("fk_test_user_script", None)


def test_apply_fk_to_liger_refuses_a_subclass_it_cannot_reach():
    cl = pytest.importorskip("liger_kernel.chunked_loss")

    class MyJSD(cl.LigerFusedLinearJSDLoss):
        pass

    _script(MyJSD=MyJSD)
    try:
        with pytest.raises(RuntimeError, match="MyJSD"):
            fk_liger.apply_fk_to_liger()
        assert cl.LigerFusedLinearJSDLoss is not fk_liger.LigerFusedLinearJSDLoss  # nothing done
    finally:
        sys.modules.pop("fk_test_user_script", None)
