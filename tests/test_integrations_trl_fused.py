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
