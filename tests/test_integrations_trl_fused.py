"""integrations.trl.ChunkedLogProbFunction against TRL 1.16's own ``ChunkedLogProbFunction`` (the
fused LM head that DPO, GRPO, RLOO, KTO and SFT compute per-token log-probs and entropy with)."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
trl_kernel = pytest.importorskip("trl.kernels.chunked_logprob")
trl_utils = pytest.importorskip("trl.trainer.utils")

from fdiv_kernels.integrations import trl as fk_trl  # noqa: E402
from tiny_lm import tiny_lm, tiny_tokenizer  # noqa: E402

TRL = trl_kernel.ChunkedLogProbFunction
FK = fk_trl.ChunkedLogProbFunction
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(n=53, h=24, v=389, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = (torch.randn(n, h, generator=g) * 1.5).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.4).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return hid, w, b, t


def _run(fn, hid, w, b, t, temperature, cap, scale, outputs, g_lp, g_ent):
    """Values of every output and the gradients of sum(g_lp*log_probs + g_ent*entropy)."""
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (hid, w, b)]
    out = fn.apply(*leaves, t, temperature, 64, cap, scale, outputs)
    loss = (out[0].double() * g_lp).sum()
    if out[1] is not None and g_ent is not None:
        loss = loss + (out[1].double() * g_ent).sum()
    loss.backward()
    return [None if o is None else o.detach() for o in out], [
        None if x is None else x.grad for x in leaves]


def _eager64(hid, w, b, t, temperature, cap, scale):
    """Float64 reference: full logits, log_softmax, gather, entropy."""
    z = hid.double() @ w.double().t() + (0 if b is None else b.double())
    z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    logq = torch.log_softmax(z / temperature, -1)
    return logq.gather(-1, t[:, None])[:, 0], -(logq.exp() * logq).sum(-1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature,cap,scale", [(1.0, None, 1.0), (2.0, None, 0.0625),
                                                   (0.7, 3.0, 1.0), (1.0, 30.0, 0.5)])
def test_values_and_gradients_match_trl_fp32(bias, temperature, cap, scale):
    hid, w, b, t = _inputs(bias=bias)
    g = torch.Generator().manual_seed(1)
    g_lp = torch.rand(hid.shape[0], generator=g, dtype=torch.float64)
    g_ent = torch.randn(hid.shape[0], generator=g, dtype=torch.float64)
    for outputs, ge in ((ALL, g_ent), (("log_probs",), None), (("log_probs", "entropy"), None),
                        (("log_probs", "entropy", "mean_logits"), g_ent)):
        ours, our_grads = _run(FK, hid, w, b, t, temperature, cap, scale, outputs, g_lp, ge)
        ref, ref_grads = _run(TRL, hid, w, b, t, temperature, cap, scale, outputs, g_lp, ge)
        for name, o, r in zip(ALL, ours, ref):
            assert (o is None) == (r is None), (name, outputs)
            if o is None:
                continue
            if name == "is_top1":
                assert o.dtype == r.dtype == torch.bool and torch.equal(o, r)
            else:
                assert o.dtype == r.dtype == torch.float32
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=f"{name} {outputs}")
        for name, o, r in zip(("hidden", "weight", "bias"), our_grads, ref_grads):
            assert (o is None) == (r is None)
            if o is not None:
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=f"d{name} {outputs}")
    # The test inputs are not degenerate: the log-probs vary and some targets are the argmax.
    assert ours[0].std() > 0.05


def test_entropy_gradient_alone_matches_trl_and_float64():
    """Only the entropy carries a gradient (GRPO's entropy bonus): both kernels differentiate it."""
    hid, w, b, t = _inputs(seed=3)
    g_ent = torch.linspace(-1, 1, hid.shape[0], dtype=torch.float64)
    zero = torch.zeros_like(g_ent)
    _, ours = _run(FK, hid, w, b, t, 1.5, 5.0, 0.8, ("log_probs", "entropy"), zero, g_ent)
    _, ref = _run(TRL, hid, w, b, t, 1.5, 5.0, 0.8, ("log_probs", "entropy"), zero, g_ent)
    leaves = [x.double().requires_grad_(True) for x in (hid, w, b)]
    _, ent = _eager64(*leaves, t, 1.5, 5.0, 0.8)
    (ent * g_ent).sum().backward()
    for o, r, x in zip(ours, ref, leaves):
        assert x.grad.abs().max() > 1e-3
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.double(), x.grad, rtol=1e-5, atol=1e-5)


def test_bf16_error_no_worse_than_trl():
    hid, w, b, t = _inputs(n=64, h=32, v=1031, dtype=torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(5)
    g_lp = torch.rand(64, generator=g, dtype=torch.float64)
    g_ent = torch.rand(64, generator=g, dtype=torch.float64)
    args = (1.0, 30.0, 0.5, ("log_probs", "entropy"), g_lp, g_ent)
    ours, our_grads = _run(FK, hid, w, b, t, *args)
    ref, ref_grads = _run(TRL, hid, w, b, t, *args)
    leaves = [x.double().requires_grad_(True) for x in (hid, w, b)]
    lp, ent = _eager64(*leaves, t, 1.0, 30.0, 0.5)
    ((lp * g_lp) + (ent * g_ent)).sum().backward()
    for o, r, exact in zip(ours[:2], ref[:2], (lp, ent)):
        assert (o.double() - exact).abs().max() <= (r.double() - exact).abs().max() + 1e-6
    for o, r, x in zip(our_grads, ref_grads, leaves):
        assert o.dtype == r.dtype == torch.bfloat16
        assert (o.double() - x.grad).abs().max() <= (r.double() - x.grad).abs().max() * 1.05 + 1e-6


def test_autocast_logits_stay_fp32():
    """Under bf16 autocast (TRL's default bf16=True) TRL rounds each logits tile to bf16; fk forms
    them in fp32, so its log-probs and entropy are closer to float64."""
    hid, w, b, t = _inputs(n=40, h=32, v=521, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = FK.apply(hid, w, b, t, 1.0, 64, None, 1.0, ("log_probs", "entropy"))
        ref = TRL.apply(hid, w, b, t, 1.0, 64, None, 1.0, ("log_probs", "entropy"))
    exact = _eager64(hid, w, b, t, 1.0, None, 1.0)
    for o, r, e in zip(ours, ref, exact):
        assert o.dtype == torch.float32
        assert (o.double() - e).abs().max() < 1e-5 < (r.double() - e).abs().max()


def test_cases_fk_does_not_take_run_trls_function():
    hid, w, b, t = _inputs(n=9, v=67)
    for cap, scale in ((None, 0.0), (0.0, 1.0)):       # scale 0 (kept by TRL) and a 0.0 softcap
        ours, _ = _run(FK, hid, w, b, t, 1.0, cap, scale, ALL, torch.ones(9, dtype=torch.float64),
                       None)
        ref, _ = _run(TRL, hid, w, b, t, 1.0, cap, scale, ALL,
                      torch.ones(9, dtype=torch.float64), None)
        for o, r in zip(ours, ref):
            assert torch.equal(o, r)


def test_bad_target_raises_and_ignore_index_gives_zero():
    hid, w, b, t = _inputs(n=9, v=67)
    with pytest.raises(ValueError, match="labels"):
        FK.apply(hid, w, b, torch.full_like(t, 67), 1.0, 64)
    t = t.clone()
    t[2] = -100
    assert FK.apply(hid, w, b, t, 1.0, 64, None, 1.0, ("log_probs",))[0][2] == 0


# ---- apply_fk_to_trl reaches add_fused_lm_head ----------------------------------------


def _patch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # the distillation warning
        return fk_trl.apply_fk_to_trl(gkd=False, distillation=False)


def test_apply_fk_to_trl_rebinds_chunked_logprob_idempotent_and_undoes():
    import trl.kernels

    holders = [(trl_utils, "_ChunkedLogProbFunction"), (trl.kernels, "ChunkedLogProbFunction"),
               (trl_kernel, "ChunkedLogProbFunction")]
    assert all(getattr(m, n) is TRL for m, n in holders)
    patch = _patch()
    again = _patch()
    try:
        assert all(getattr(m, n) is FK for m, n in holders)
        assert again.targets == []
    finally:
        again.undo()
        patch.undo()
    assert all(getattr(m, n) is TRL for m, n in holders)


def _fused_forward(patched: bool):
    model = tiny_lm(0, vocab=97)
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=ALL)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1] = -100                                    # a fully masked sequence
    patch = _patch() if patched else None
    try:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + 0.1 * out.entropy.sum()).backward()
    finally:
        if patch is not None:
            patch.undo()
    grads = [p.grad for p in model.parameters()]
    return out, grads


def test_add_fused_lm_head_forward_and_backward_same_with_patch():
    ref, ref_grads = _fused_forward(patched=False)
    ours, our_grads = _fused_forward(patched=True)
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5,
                                   atol=1e-5, msg=name)
    assert torch.equal(ours.is_top1, ref.is_top1) and torch.equal(ours.label_mask, ref.label_mask)
    assert torch.count_nonzero(ours.log_probs[1]) == 0 and ours.log_probs[0, -1] != 0
    for o, r in zip(our_grads, ref_grads):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


# ---- Trainer level: TRL's DPOTrainer (fused head), three steps, with and without the patch -------


def _dpo_losses(tmp_path, patched: bool) -> list:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    losses = []

    class Recording(DPOTrainer):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.item())
            return loss

    g = torch.Generator().manual_seed(7)

    def words(n):
        return " ".join(f"t{i}" for i in torch.randint(3, 96, (n,), generator=g).tolist())

    # Completions start with a space so the word-level tokens never merge across the boundary.
    ds = Dataset.from_list([{"prompt": words(3 + i % 4), "chosen": " " + words(4 + i % 3),
                             "rejected": " " + words(5 - i % 2)} for i in range(6)])
    # bf16=False: TRL's configs default to bf16, which on the CPU runs the head under bf16 autocast,
    # where TRL's kernel rounds the logits to bf16 and fk's keeps them fp32 (losses then differ by
    # ~1e-5, TRL's being the less accurate: see test_autocast_logits_stay_fp32).
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    patch = _patch() if patched else None
    try:
        trainer = Recording(model=tiny_lm(0), ref_model=tiny_lm(0), args=args, train_dataset=ds,
                            processing_class=tiny_tokenizer(96))
        trainer.train()
    finally:
        if patch is not None:
            patch.undo()
    return losses


def test_dpo_trainer_three_steps_same_losses_with_patch(tmp_path):
    ref = _dpo_losses(tmp_path / "ref", patched=False)
    ours = _dpo_losses(tmp_path / "fk", patched=True)
    assert len(ref) == len(ours) == 3 and len(set(ref)) == 3      # the policy did train
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=1e-6)
