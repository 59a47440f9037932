"""fdiv_kernels.integrations.trl against the installed TRL's own functions (trl 1.16)."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")
gkd_mod = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

from fdiv_kernels.integrations import trl as fk_trl  # noqa: E402
from tiny_lm import collate, lm_batches, tiny_lm, tiny_tokenizer  # noqa: E402

GKD = gkd_mod.GKDTrainer
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
NIBS = [None, 37, "tensor"]


def _inputs(dtype=torch.float32, shape=(3, 9, 67), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 2).to(dtype)
    t = (torch.randn(shape, generator=g) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < 0.3] = -100
    labels[1] = -100                                   # one fully masked sequence
    return s, t, labels


def _run(fn, s, t, **kw):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = fn(s, t, **kw)
    if kw.get("reduction") == "none" and kw.get("num_items_in_batch") is None:
        out = out.sum(-1) if out.dim() > 1 and out.shape[-1] == s.shape[-1] else out
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), s.grad, t.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_loss_matches_gkd(beta, temperature):
    s, t, labels = _inputs()
    for with_labels in (True, False):
        for reduction in REDUCTIONS:
            for nib in NIBS:
                nib_arg = torch.tensor(37.0) if nib == "tensor" else nib
                kw = dict(labels=labels if with_labels else None, beta=beta,
                          temperature=temperature, reduction=reduction,
                          num_items_in_batch=nib_arg)
                ref, rgs, rgt = _run(GKD.generalized_jsd_loss, s, t, **kw)
                out, gs, gt = _run(fk_trl.generalized_jsd_loss, s, t, **kw)
                where = f"labels={with_labels} reduction={reduction} nib={nib}"
                torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(gt, rgt, rtol=1e-5, atol=1e-6, msg=where)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gold_generalized_jsd_loss_matches_gold(beta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gold = pytest.importorskip("trl.experimental.gold.gold_trainer").GOLDTrainer
    s, t, labels = _inputs(seed=4)
    for reduction in REDUCTIONS:
        for nib in (None, 37):
            kw = dict(labels=labels, beta=beta, temperature=1.5, reduction=reduction,
                      num_items_in_batch=nib)
            ref = _run(gold.generalized_jsd_loss, s, t, **kw)
            out = _run(fk_trl.gold_generalized_jsd_loss, s, t, **kw)
            for a, b in zip(out, ref):
                torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6,
                                           msg=f"{reduction} {nib}")
    # Probabilities in: TRL's own function runs (fk's kernels renormalize logits).
    p, q = s.softmax(-1), t.softmax(-1)
    torch.testing.assert_close(
        fk_trl.gold_generalized_jsd_loss(p, q, labels, beta=beta, logits_are_probs=True),
        gold.generalized_jsd_loss(p, q, labels, beta=beta, logits_are_probs=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fk_trl.apply_fk_to_trl(gkd=False, distillation=False, logprobs=False)
    try:
        assert gold.generalized_jsd_loss is fk_trl.gold_generalized_jsd_loss
    finally:
        patch.undo()
    assert gold.generalized_jsd_loss is not fk_trl.gold_generalized_jsd_loss


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_topk_self_distillation_matches_sdpo(alpha, add_tail):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdpo = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    s, t, _ = _inputs(seed=5)
    kw = {"distillation_topk": 7, "distillation_alpha": alpha, "distillation_add_tail": add_tail}
    fn = lambda a, b: sdpo.compute_topk_self_distillation_loss(a, b, **kw)  # noqa: E731
    ref = _run(fn, s, t)
    out = _run(lambda a, b: fk_trl.compute_topk_self_distillation_loss(a, b, **kw), s, t)
    for a, b, what in zip(out, ref, ("loss", "student grad", "teacher grad")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)
    original = sdpo.compute_topk_self_distillation_loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fk_trl.apply_fk_to_trl(gkd=False, gold=False, distillation=False, logprobs=False)
    try:
        assert sdpo.compute_topk_self_distillation_loss is fk_trl.compute_topk_self_distillation_loss
    finally:
        patch.undo()
    assert sdpo.compute_topk_self_distillation_loss is original


def test_generalized_jsd_all_masked_is_zero_with_zero_grads():
    s, t, labels = _inputs()
    labels[:] = -100
    out, gs, _ = _run(fk_trl.generalized_jsd_loss, s, t, labels=labels)
    ref, _, _ = _run(GKD.generalized_jsd_loss, s, t, labels=labels)
    assert out.item() == 0.0 == ref.item()
    assert torch.count_nonzero(gs) == 0
    # TRL's "mean" over no kept element is 0/0; the drop-in keeps that convention.
    assert torch.isnan(fk_trl.generalized_jsd_loss(s, t, labels, reduction="mean"))


def test_generalized_jsd_bf16_error_no_worse_than_trl():
    s, t, labels = _inputs(torch.bfloat16, shape=(4, 16, 1031))
    for beta in (0.0, 0.5, 1.0):
        exact = GKD.generalized_jsd_loss(s.double(), t.double(), labels, beta=beta)
        ours = fk_trl.generalized_jsd_loss(s, t, labels, beta=beta).double()
        theirs = GKD.generalized_jsd_loss(s, t, labels, beta=beta).double()
        assert (ours - exact).abs() <= (theirs - exact).abs() + 1e-7, (beta, ours, theirs, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 5])
def test_selective_log_softmax_matches_trl(dtype, k):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 11, 301, generator=g) * 3).to(dtype)
    shape = (3, 11) if k is None else (3, 11, k)
    index = torch.randint(0, 301, shape, generator=g)
    row_mask = (torch.rand(shape, generator=g) > 0.2).long()
    for temperature, mask in ((1.0, None), (0.7, row_mask)):
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        out = fk_trl.selective_log_softmax(a, index, temperature=temperature, row_mask=mask)
        ref = trl_utils.selective_log_softmax(b, index, temperature=temperature, row_mask=mask)
        # TRL's CPU path keeps the logits' dtype; its GPU kernel (one index per row) returns
        # float32, which the drop-in returns on every device. K indices: TRL's torch path.
        assert ref.dtype == dtype and out.shape == ref.shape
        assert out.dtype == (torch.float32 if k is None else dtype)
        w = torch.rand(shape, generator=g)
        (out.float() * w).sum().backward()
        (ref.float() * w).sum().backward()
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
        else:
            x = logits.double().requires_grad_(True)
            exact = trl_utils.selective_log_softmax(x, index, temperature, mask)
            assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + 1e-9
            (exact * w.double()).sum().backward()
            err_ours = (a.grad.double() - x.grad).abs().max()
            assert err_ours <= (b.grad.double() - x.grad).abs().max() + 1e-9


def test_logprobs_and_entropy_match_trl():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 13, 257, generator=g) * 2
    index = torch.randint(0, 257, (2, 13), generator=g)
    row_mask = (torch.rand(2, 13, generator=g) > 0.3).long()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    lp, ent = fk_trl.selective_log_softmax_and_entropy(a, index, temperature=1.5, row_mask=row_mask)
    rlp, rent = trl_utils.selective_log_softmax_and_entropy(b, index, temperature=1.5,
                                                            row_mask=row_mask)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-6)
    (lp * 0.3 + ent * 0.7).sum().backward()
    (rlp * 0.3 + rent * 0.7).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fk_trl.entropy_from_logits(logits),
                               trl_utils.entropy_from_logits(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits_give_float32_as_trls_gpu_kernel(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 7, 131, generator=g) * 2).to(dtype)
    index = torch.randint(0, 131, (2, 7), generator=g)
    exact = trl_utils.selective_log_softmax(logits.double(), index)
    lp = fk_trl.selective_log_softmax(logits, index)
    lp2, ent = fk_trl.selective_log_softmax_and_entropy(logits, index)
    ent2 = fk_trl.entropy_from_logits(logits)
    assert lp.dtype == lp2.dtype == ent.dtype == ent2.dtype == torch.float32
    # fp32 values, not 16-bit ones in a float32 container.
    torch.testing.assert_close(lp.double(), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), trl_utils.entropy_from_logits(logits.double()),
                               rtol=1e-6, atol=1e-6)


def test_apply_fk_to_trl_rebinds_idempotent_and_undoes():
    import trl.trainer.dpo_trainer  # noqa: F401  (a trainer module that imported the names)

    orig_gkd = GKD.__dict__["generalized_jsd_loss"]
    orig_sls = trl_utils.selective_log_softmax
    holders = [m for n, m in __import__("sys").modules.items()
               if n.startswith("trl") and m is not None
               and m.__dict__.get("selective_log_softmax") is orig_sls]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fk_trl.apply_fk_to_trl()
        again = fk_trl.apply_fk_to_trl()
    try:
        assert GKD.generalized_jsd_loss is fk_trl.generalized_jsd_loss
        assert all(m.selective_log_softmax is fk_trl.selective_log_softmax for m in holders)
        fused = fk_trl.selective_log_softmax_and_entropy
        assert trl_utils.selective_log_softmax_and_entropy is fused
        assert again.targets == []                     # the second call changed nothing
    finally:
        again.undo()
        patch.undo()
    assert GKD.__dict__["generalized_jsd_loss"] is orig_gkd
    assert all(m.selective_log_softmax is orig_sls for m in holders)


_FRESH_PROCESS = """
import sys, warnings
import trl.trainer.utils as u
from trl.trainer.utils import selective_log_softmax as mine     # a script's import, before
from fdiv_kernels.integrations import trl as fk_trl
original = u.selective_log_softmax

# Defaults: nothing experimental is imported for GKD, and TRL's warning is not printed.
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    patch = fk_trl.apply_fk_to_trl()
assert not [w for w in seen if "experimental" in str(w.message)], [str(w.message) for w in seen]
loaded = [m for m in ("trl.experimental.gkd", "trl.experimental.gold", "trl.experimental.sdpo")
          if m in sys.modules]
assert not loaded, f"imported by the patch: {loaded}"
assert mine is original               # a local name; module-level names are reached (below)
from trl.experimental.gkd import GKDTrainer                      # the user's import, after
assert GKDTrainer.generalized_jsd_loss is fk_trl.generalized_jsd_loss
import trl.experimental.orpo.orpo_trainer as orpo                 # imported while patched
import trl.experimental.cpo.cpo_trainer as cpo
assert orpo.selective_log_softmax is cpo.selective_log_softmax is fk_trl.selective_log_softmax
patch.undo()
assert GKDTrainer.generalized_jsd_loss is not fk_trl.generalized_jsd_loss
assert orpo.selective_log_softmax is cpo.selective_log_softmax is original
assert u.selective_log_softmax is original

import __main__
__main__.sls = original                       # a script's module-level from-import
patch = fk_trl.apply_fk_to_trl(gkd=False)
assert __main__.sls is fk_trl.selective_log_softmax
patch.undo()
assert __main__.sls is original
"""


def test_patch_imports_only_what_it_needs_and_undo_reaches_later_modules():
    """In a fresh process, where trl.experimental is not loaded yet: the defaults import no GKD
    and print no experimental warning (GKD is patched when the user imports it); modules imported
    while the patch is active (ORPO, CPO) are restored by undo(); a script's own module-level
    binding is reached."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRL_EXPERIMENTAL_SILENCE"}
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS], check=True, env=env)


# ---- Trainer level: TRL's GKDTrainer, three steps, with and without the patch --------------------


def _gkd_losses(tmp_path, patched: bool) -> list:
    from datasets import Dataset

    from trl.experimental.gkd import GKDConfig

    losses = []

    class Recording(GKD):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.item())
            return loss

    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                     lmbda=0.0, beta=0.5, learning_rate=1e-2, logging_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", seed=0, max_length=32,
                     disable_tqdm=True, dataloader_num_workers=0)
    student, teacher = tiny_lm(0), tiny_lm(1, hidden=48, layers=2)
    ds = Dataset.from_list(lm_batches(6, 12, 96))
    patch = None
    if patched:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The loss swap alone (GKDConfig's default bf16 autocast rounds both paths' logits
            # alike); the fused compute_loss: tests/test_integrations_trl_gkd_fused.py.
            patch = fk_trl.apply_fk_to_trl(gkd_fused=False)
    try:
        trainer = Recording(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                            data_collator=collate, processing_class=tiny_tokenizer(96))
        # The subclass must see the patched staticmethod (it is looked up through the class).
        assert (Recording.generalized_jsd_loss is fk_trl.generalized_jsd_loss) == patched
        trainer.train()
    finally:
        if patch is not None:
            patch.undo()
    return losses


def test_gkd_trainer_three_steps_same_losses_with_patch(tmp_path):
    ref = _gkd_losses(tmp_path / "ref", patched=False)
    ours = _gkd_losses(tmp_path / "fk", patched=True)
    assert len(ref) == len(ours) == 3 and len(set(ref)) == 3      # the student did train
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=1e-6)
