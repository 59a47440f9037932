"""Autograd contracts: float64 gradcheck and torch.compile(fullgraph=True), forward and backward.

The opcheck of every registered op is tests/test_opcheck.py."""

import pytest
import torch
from conftest import BACKENDS
from helpers import available_backends
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels.kinds._registry import DIVERGENCES

F64_BACKENDS = available_backends("divergence_fwd", torch.float64)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_gradcheck_float64(kind, backend):
    s = logits((3, 11), torch.float64, seed=1).requires_grad_(True)
    t = logits((3, 11), torch.float64, seed=2).requires_grad_(True)
    labels = torch.tensor([0, -100, 2])

    def f(s, t):
        return fk.divergence(s, t, kind, temperature=1.3, labels=labels, reduction="none",
                             backend=backend, inplace_backward=False)

    assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_fullgraph(backend):
    """The whole loss, forward and backward, traces into one graph (no graph breaks)."""
    torch._dynamo.reset()

    def loss_fn(s, t, labels):
        return fk.divergence(s, t, "js", beta=0.3, temperature=2.0, labels=labels,
                             backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    s, t = logits((4, 64), seed=6), logits((4, 64), seed=7)
    labels = torch.tensor([1, -100, 3, 4])
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    a = compiled(s1, t, labels)
    a.backward()
    b = loss_fn(s2, t, labels)
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_fullgraph_fused_linear(backend, reduction):
    """fused_linear_divergence, forward and backward, traces into one graph; both of its
    backward forms (gradients from the forward, or recomputed for a per-row upstream)."""
    torch._dynamo.reset()

    def loss_fn(hs, ws, ht, wt, labels):
        out = fk.fused_linear_divergence(hs, ws, ht, wt, "js", beta=0.3, temperature=2.0,
                                         labels=labels, ce_weight=0.1, chunk_size=3,
                                         reduction=reduction, backend=backend)
        return out if reduction == "mean" else (out * torch.arange(1.0, 8.0)).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    hs, ws = logits((7, 5), seed=8), logits((11, 5), seed=9, scale=0.7)
    ht, wt = logits((7, 6), seed=10), logits((11, 6), seed=11, scale=0.7)
    labels = torch.tensor([1, -100, 3, 4, 0, 10, -100])
    results = []
    for f in (compiled, loss_fn):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss = f(h, w, ht, wt, labels)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
