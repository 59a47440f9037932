"""fused_linear_token_logprobs against float64 materialized logits (log_softmax + gather, eager
entropy), forward and backward through both outputs, with the logit transforms."""

import pytest
import torch
from conftest import STATS_BACKENDS
from helpers import assert_close
from reference import logits

import fdiv_kernels as fk

N, H, V = 9, 6, 37  # V odd and not a block multiple; chunks of 1, 4 and all rows below


def _params(dtype=torch.float32, bias=True, seed=0):
    h = logits((N, H), dtype, seed=seed)
    w = logits((V, H), dtype, seed=seed + 1, scale=0.8)
    b = logits((V,), dtype, seed=seed + 2) if bias else None
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 3))
    labels[::3] = -100
    return h, w, b, labels


def _reference(h, w, b, labels, temperature, scale, cap):
    z = h @ w.t() + (b if b is not None else 0)
    z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    lq = torch.log_softmax(z / temperature, -1)
    keep = labels != -100
    lp = lq.gather(-1, torch.where(keep, labels, 0)[:, None]).squeeze(-1)
    lp = torch.where(keep, lp, torch.zeros_like(lp))
    ent = -(lq.exp() * lq).sum(-1)
    return lp, ent


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("temperature,scale,cap", [(1.0, 1.0, None), (2.0, 0.5, 3.0),
                                                    (0.7, 1.3, 0.9)])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_values_and_grads(backend, temperature, scale, cap, chunk_size):
    h, w, b, labels = _params()
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = [t.double().requires_grad_() for t in (h, w, b)]
    lp, ent = fk.fused_linear_token_logprobs(
        ours[0], ours[1], labels, bias=ours[2], temperature=temperature, logit_scale=scale,
        softcap=cap, return_entropy=True, chunk_size=chunk_size, backend=backend)
    rlp, rent = _reference(*ref, labels, temperature, scale, cap)
    assert_close(lp, rlp, (2e-5, 2e-6), "logprob")
    assert_close(ent, rent, (2e-5, 2e-6), "entropy")
    # Upstream gradients on both outputs, so the entropy's own gradient is checked too.
    g1 = logits((N,), torch.float64, seed=7)
    g2 = logits((N,), torch.float64, seed=8)
    ((lp * g1).sum() + (ent * g2).sum()).backward()
    ((rlp * g1).sum() + (rent * g2).sum()).backward()
    for name, a, r in zip(("hidden", "weight", "bias"), ours, ref):
        assert_close(a.grad, r.grad, (2e-5, 1e-6), f"d/d{name}")


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_logprob_only_matches_and_ignored_rows_get_no_gradient(backend):
    h, w, b, labels = _params(bias=False, seed=3)
    labels[:] = -100
    labels[4] = 11
    hh = h.clone().requires_grad_()
    lp = fk.fused_linear_token_logprobs(hh, w, labels, backend=backend)
    rlp, _ = _reference(h.double(), w.double(), None, labels, 1.0, 1.0, None)
    assert_close(lp, rlp, (2e-5, 2e-6), "logprob")
    assert (lp[labels == -100] == 0).all()
    lp.sum().backward()
    # Only row 4 has a label: every other row's hidden gradient is exactly zero.
    rows = torch.arange(N) != 4
    assert (hh.grad[rows] == 0).all() and hh.grad[4].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_fp32_logits(dtype):
    h, w, b, labels = _params(dtype, seed=5)
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    lp = fk.fused_linear_token_logprobs(ours[0], ours[1], labels, bias=ours[2])
    # The reference from the same rounded operands in float64: fp32-level agreement.
    rlp, _ = _reference(h.double(), w.double(), b.double(), labels, 1.0, 1.0, None)
    assert_close(lp, rlp, (2e-5, 2e-6), "logprob")
    lp.sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in ours)


def test_leading_shape_and_int32_labels():
    h, w, _, labels = _params(seed=9)
    lp = fk.fused_linear_token_logprobs(h.reshape(3, 3, H), w, labels.reshape(3, 3).int())
    rlp, _ = _reference(h.double(), w.double(), None, labels, 1.0, 1.0, None)
    assert lp.shape == (3, 3)
    assert_close(lp.reshape(-1), rlp, (2e-5, 2e-6), "logprob")


def test_float64_gradcheck():
    h, w, b, labels = _params(torch.float64, seed=11)
    h, w, b = (t[:4].clone() if t.dim() == 2 and t.shape[0] == N else t.clone() for t in (h, w, b))
    labels = labels[:4]
    args = [t.requires_grad_() for t in (h, w, b)]

    def f(h, w, b):
        lp, ent = fk.fused_linear_token_logprobs(h, w, labels, bias=b, softcap=2.0,
                                                 logit_scale=0.9, temperature=1.5,
                                                 return_entropy=True, chunk_size=3,
                                                 backend="torch")
        return lp, ent

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("bad,err,match", [
    (dict(labels=torch.tensor([0.5] * N)), TypeError, "labels"),
    (dict(labels=torch.full((N,), V)), ValueError, "labels must be in"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(bias=torch.zeros(V + 1)), ValueError, "bias"),
    (dict(weight=torch.zeros(V, H + 1)), ValueError, "weight"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(return_entropy="yes"), TypeError, "return_entropy"),
])
def test_bad_input(bad, err, match):
    h, w, _, labels = _params()
    kw = dict(labels=labels, weight=w)
    kw.update(bad)
    with pytest.raises(err, match=match):
        fk.fused_linear_token_logprobs(h, kw.pop("weight"), kw.pop("labels"), **kw)
