"""Vocabularies padded to different widths (Qwen-style 151936 vs 152064 columns): with
``vocab_size`` only the first columns (rows of a head) take part and the padding gets exactly zero
gradient, equal to slicing by hand; without it, mismatched widths raise naming both widths and
the argument."""

import pytest
import torch
from helpers import assert_close
from reference import logits

import fdiv_kernels as fk

N, VOCAB, PAD_S, PAD_T, H, K = 6, 23, 5, 9, 4, 4
TOL = (2e-5, 2e-6)


def _pair():
    s = logits((N, VOCAB + PAD_S), torch.float32, seed=1).requires_grad_(True)
    t = logits((N, VOCAB + PAD_T), torch.float32, seed=2).requires_grad_(True)
    return s, t


def _check_padding(x: torch.Tensor, real: int):
    assert x.grad is not None and torch.all(x.grad[..., real:] == 0)


@pytest.mark.parametrize("kind, kw", [("kl", {}), ("js", {"beta": 0.3}), ("renyi", {"alpha": 2.0}),
                                      ("cauchy_schwarz", {})])
def test_divergence(kind, kw, backend):
    s, t = _pair()
    loss = fk.divergence(s, t, kind, vocab_size=VOCAB, backend=backend, **kw)
    loss.backward()
    s2, t2 = (x.detach()[:, :VOCAB].clone().requires_grad_(True) for x in (s, t))
    ref = fk.divergence(s2, t2, kind, backend=backend, **kw)
    ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(s.grad[:, :VOCAB], s2.grad, TOL, "student grad")
    assert_close(t.grad[:, :VOCAB], t2.grad, TOL, "teacher grad")
    _check_padding(s, VOCAB)
    _check_padding(t, VOCAB)


def test_sparse_divergence(backend):
    s, _ = _pair()
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(N)])
    lp = torch.log_softmax(logits((N, K), torch.float32, seed=4), -1) - 0.1
    loss = fk.sparse_divergence(s, ids, lp, "kl", vocab_size=VOCAB, backend=backend)
    loss.backward()
    s2 = s.detach()[:, :VOCAB].clone().requires_grad_(True)
    ref = fk.sparse_divergence(s2, ids, lp, "kl", backend=backend)
    ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(s.grad[:, :VOCAB], s2.grad, TOL, "grad")
    _check_padding(s, VOCAB)
    with pytest.raises(ValueError, match="ids"):
        bad = ids.clone()
        bad[0, 0] = VOCAB + 1  # a padding column is not a real id
        fk.sparse_divergence(s, bad, lp, "kl", vocab_size=VOCAB, backend=backend)


def _heads():
    hs, ht = logits((N, H), torch.float32, seed=5), logits((N, H + 1), torch.float32, seed=6)
    ws = logits((VOCAB + PAD_S, H), torch.float32, seed=7, scale=0.5).requires_grad_(True)
    wt = logits((VOCAB + PAD_T, H + 1), torch.float32, seed=8, scale=0.5).requires_grad_(True)
    return hs, ws, ht, wt


def test_fused_linear_divergence(backend):
    hs, ws, ht, wt = _heads()
    loss = fk.fused_linear_divergence(hs, ws, ht, wt, "js", vocab_size=VOCAB, backend=backend)
    loss.backward()
    ws2, wt2 = (w.detach()[:VOCAB].clone().requires_grad_(True) for w in (ws, wt))
    ref = fk.fused_linear_divergence(hs, ws2, ht, wt2, "js", backend=backend)
    ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(ws.grad[:VOCAB], ws2.grad, TOL, "student weight grad")
    assert torch.all(ws.grad[VOCAB:] == 0) and wt.grad is not None
    assert torch.all(wt.grad[VOCAB:] == 0)


def test_fused_sparse_and_logprobs(backend):
    hs, ws, _, _ = _heads()
    g = torch.Generator().manual_seed(9)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(N)])
    lp = torch.log_softmax(logits((N, K), torch.float32, seed=10), -1) - 0.1
    labels = torch.randint(0, VOCAB, (N,), generator=g)
    for name, call in [
        ("sparse", lambda w, **kw: fk.fused_linear_sparse_divergence(hs, w, ids, lp, "kl",
                                                                     backend=backend, **kw)),
        ("logprobs", lambda w, **kw: fk.fused_linear_token_logprobs(hs, w, labels,
                                                                    backend=backend,
                                                                    **kw).sum()),
    ]:
        w = ws.detach().clone().requires_grad_(True)
        out = call(w, vocab_size=VOCAB)
        out.backward()
        w2 = ws.detach()[:VOCAB].clone().requires_grad_(True)
        ref = call(w2)
        ref.backward()
        assert_close(out, ref, TOL, name)
        assert_close(w.grad[:VOCAB], w2.grad, TOL, name + " grad")
        assert torch.all(w.grad[VOCAB:] == 0), name


def test_mismatched_widths_raise_naming_both():
    s, t = _pair()
    with pytest.raises(ValueError, match=rf"{VOCAB + PAD_S}.*{VOCAB + PAD_T}.*vocab_size"):
        fk.divergence(s, t, "kl")
    hs, ws, ht, wt = _heads()
    with pytest.raises(ValueError, match=rf"{VOCAB + PAD_S}.*{VOCAB + PAD_T}.*vocab_size"):
        fk.fused_linear_divergence(hs, ws, ht, wt, "kl")
    with pytest.raises(ValueError, match="vocab_size must be in"):
        fk.divergence(s, t, "kl", vocab_size=VOCAB + PAD_S + 1)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        fk.divergence(s, t, "kl", vocab_size=float(VOCAB))
