"""fk.losses.fdpo_loss against a float64 transcription of the paper and TRL's own DPO loss."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fdiv_kernels as fk

DIVS = ["reverse_kl", "forward_kl", "js", "alpha"]
TRL_NAMES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js_divergence",
             "alpha": "alpha_divergence"}


def _logps(n=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * 3 - 20).to(dtype)
            for _ in range(4)]


def _reference(pc, pr, rc, rr, div, beta, alpha):
    """float64: f'(t) of each divergence at t = pi/pi_ref, written from the definitions."""
    def fprime(logt):
        t = torch.exp(logt)
        return {"reverse_kl": logt + 1, "forward_kl": 1 - 1 / t,
                "js": torch.log(2 * t / (1 + t)),
                "alpha": (t ** (alpha - 1) - 1) / (alpha - 1)}[div]
    d = fprime(pc - rc) - fprime(pr - rr)
    return torch.log1p(torch.exp(-beta * d)).mean()


@pytest.mark.parametrize("div", DIVS)
def test_fdpo_matches_float64_reference(div):
    pc, pr, rc, rr = _logps()
    for alpha in (0.3, 0.5, 1.5):
        ins = [x.clone().requires_grad_(True) for x in (pc, pr)]
        ref_ins = [x.double().clone().requires_grad_(True) for x in (pc, pr)]
        out = fk.losses.fdpo_loss(*ins, rc, rr, divergence=div, beta=0.2, alpha=alpha)
        ref = _reference(*ref_ins, rc.double(), rr.double(), div, 0.2, alpha)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
        out.backward()
        ref.backward()
        for a, b in zip(ins, ref_ins):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)


def test_reverse_kl_is_standard_dpo_and_alpha_one_falls_back():
    pc, pr, rc, rr = _logps()
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(fk.losses.fdpo_loss(pc, pr, rc, rr), dpo)
    torch.testing.assert_close(fk.losses.fdpo_loss(pc, pr, rc, rr, "alpha", alpha=1.0), dpo)


def test_alpha_exponent_is_clamped_like_trl():
    pc, pr, rc, rr = _logps()
    pc = pc + 500.0                       # (alpha - 1) * Delta ~ 250 > 80: clamped, finite
    out = fk.losses.fdpo_loss(pc, pr, rc, rr, "alpha", alpha=1.5)
    assert torch.isfinite(out)


def test_fdpo_bad_arguments():
    pc, pr, rc, rr = _logps()
    with pytest.raises(ValueError, match="divergence"):
        fk.losses.fdpo_loss(pc, pr, rc, rr, "chi2")
    with pytest.raises(ValueError, match="reduction"):
        fk.losses.fdpo_loss(pc, pr, rc, rr, reduction="batchmean")
    with pytest.raises(TypeError, match="ref_chosen_logps"):
        fk.losses.fdpo_loss(pc, pr, [1.0], rr)


def _trl_dpo_loss(pc, pr, rc, rr, div, beta, alpha):
    """TRL's DPOTrainer._compute_loss on a stub whose model returns these sequence log-probs."""
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    seq = 1
    logps = torch.cat([pc, pr])[:, None]                       # (2B, 1): one token per sequence
    n = logps.shape[0]
    out = SimpleNamespace(log_probs=logps, entropy=torch.zeros(n, seq),
                          mean_logits=torch.zeros(n, seq), is_top1=torch.zeros(n, seq, dtype=bool),
                          aux_loss=None)
    ident = lambda x: x  # noqa: E731
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=ident, gather=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=TRL_NAMES[div], f_alpha_divergence_coef=alpha, loss_types=["sigmoid"],
        loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, seq + 1, dtype=torch.long),
              "attention_mask": torch.ones(n, seq + 1, dtype=torch.long),
              "completion_mask": torch.ones(n, seq + 1, dtype=torch.long),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return dpo.DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, False)


@pytest.mark.parametrize("div", DIVS)
def test_fdpo_matches_trl_dpo_loss(div):
    pytest.importorskip("trl")
    pc, pr, rc, rr = _logps(seed=3)
    for alpha in (0.5, 1.0 + 1e-7, 2.0):
        a = [x.clone().requires_grad_(True) for x in (pc, pr)]
        b = [x.clone().requires_grad_(True) for x in (pc, pr)]
        ours = fk.losses.fdpo_loss(*a, rc, rr, divergence=div, beta=0.1, alpha=alpha)
        theirs = _trl_dpo_loss(*b, rc, rr, div, 0.1, alpha)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        ours.backward()
        theirs.backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-8)
    assert not math.isnan(ours.item())
