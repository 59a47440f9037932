"""fk.token_logprobs with K labels per row, (..., K), against log_softmax + gather in float64."""

import math

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL, STATS_BACKENDS
from helpers import assert_close
from reference import logits

import fdiv_kernels as fk


@pytest.fixture(params=STATS_BACKENDS)
def backend(request):
    return request.param


def _reference(x, labels, temperature):
    """log_softmax(x / T) gathered at labels in float64; 0 (and no gradient) where ignored."""
    lp = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float64)) / temperature, -1)
    ignored = labels == -100
    picked = lp.gather(-1, labels.masked_fill(ignored, 0))
    return torch.where(ignored, torch.zeros((), dtype=lp.dtype), picked)


def _grad(x, fn):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.to(torch.float64) * w).sum().backward()
    return out.detach(), x.grad


def _labels(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, vocab, shape, generator=g)
    lab[torch.rand(shape, generator=g) < 0.2] = -100
    lab.view(-1, shape[-1])[0] = -100  # a row with every entry ignored
    return lab


# One block with a tail (V=17); several blocks (V=300); 1-D logits with (K,) labels.
@pytest.mark.parametrize("shape,k", [((3, 4, 17), 5), ((2, 300), 3), ((129,), 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_log_softmax_gather(shape, k, dtype, backend):
    x = logits(shape, dtype, seed=41)
    x[..., 1] = -math.inf  # -inf logits (masked vocabulary) away from the labels
    labels = _labels(shape[:-1] + (k,), shape[-1], seed=42)
    labels[labels == 1] = 2
    out, g = _grad(x, lambda t: fk.token_logprobs(t, labels, temperature=0.7, backend=backend))
    ref, g_ref = _grad(x, lambda t: _reference(t, labels, 0.7))
    assert out.shape == labels.shape
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(out, ref, LOSS_TOL[dtype], "logprobs")
    assert torch.all(out[labels == -100] == 0)
    assert g.dtype == dtype and torch.isfinite(g).all()
    rtol, atol = GRAD_TOL[dtype]
    if dtype.itemsize == 2:
        # At a label the gradient (g_k - q_label sum_k g_k) / T sums the gather's and the lse's
        # gradients, each rounded to the logits' dtype first: one ulp of the larger term.
        atol = max(atol, torch.finfo(dtype).eps * float(g_ref.abs().max()))
    assert_close(g, g_ref, (rtol, atol), "grad")


def test_one_label_column_is_the_one_label_path(backend):
    x = logits((5, 7, 33), seed=43)
    labels = _labels((5, 7), 33, seed=44)
    one, g_one = _grad(x, lambda t: fk.token_logprobs(t, labels, backend=backend))
    k1, g_k1 = _grad(x, lambda t: fk.token_logprobs(t, labels[..., None], backend=backend))
    assert_close(k1.squeeze(-1), one, LOSS_TOL[torch.float32], "K=1")
    assert_close(g_k1, g_one, GRAD_TOL[torch.float32], "grad K=1")


def test_gradcheck_float64():
    x = logits((3, 11), torch.float64, seed=45).requires_grad_(True)
    labels = torch.tensor([[0, 10, -100], [3, 3, 5], [-100, -100, -100]])
    assert torch.autograd.gradcheck(lambda t: fk.token_logprobs(t, labels, temperature=1.3), (x,))


def test_bad_labels():
    x = logits((2, 3, 9), seed=46)
    with pytest.raises(ValueError, match="labels must have shape"):
        fk.token_logprobs(x, torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\)"):
        fk.token_logprobs(x, torch.full((2, 3, 2), 9))
    with pytest.raises(TypeError, match="integer"):
        fk.token_logprobs(x, torch.zeros(2, 3, 2))
