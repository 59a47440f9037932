"""Masked rows cost nothing in fused_linear_divergence: ignored rows are packed out before the
chunk GEMMs, results and gradients do not change, and a fully masked batch stays in the graph."""

import pytest
import torch
from helpers import assert_close
from reference import logits

import fdiv_kernels as fk
from fdiv_kernels.fused_linear import _engine

N, HS, HT, V = 23, 6, 5, 37  # odd sizes: chunks of 4 leave a tail
TOL = (2e-5, 2e-6)


def _params(seed=0, dtype=torch.float32):
    hs, ws = logits((N, HS), dtype, seed=seed), logits((V, HS), dtype, seed=seed + 1, scale=0.7)
    ht, wt = logits((N, HT), dtype, seed=seed + 2), logits((V, HT), dtype, seed=seed + 3, scale=0.7)
    bs, bt = logits((V,), dtype, seed=seed + 4), logits((V,), dtype, seed=seed + 5)
    return [hs, ws, bs, ht, wt, bt]


def _labels(frac_masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, (N,), generator=g)
    lab[torch.rand(N, generator=g) < frac_masked] = -100
    return lab


def _run(params, labels, reduction, backend, teacher_grad=False, **kw):
    ps = [p.detach().clone().requires_grad_(i < 3 or teacher_grad) for i, p in enumerate(params)]
    out = fk.fused_linear_divergence(ps[0], ps[1], ps[3], ps[4], "js", student_bias=ps[2],
                                     teacher_bias=ps[5], labels=labels, reduction=reduction,
                                     chunk_size=4, backend=backend, **kw)
    w = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), [p.grad for p in ps]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_packed_equals_unpacked(reduction, backend, monkeypatch):
    """Same loss and gradients as the unpacked path (every row through the GEMMs, masked)."""
    params, labels = _params(), _labels(0.7)
    out, grads = _run(params, labels, reduction, backend, teacher_grad=True)
    monkeypatch.setattr(_engine, "kept_rows", lambda valid: None)
    ref_out, ref_grads = _run(params, labels, reduction, backend, teacher_grad=True)
    assert_close(out, ref_out, TOL, "loss")
    for name, g, r in zip(("hs", "ws", "bs", "ht", "wt", "bt"), grads, ref_grads):
        assert_close(g, r, TOL, f"grad {name}")
    ignored = labels == -100
    assert torch.all(grads[0][ignored] == 0) and torch.all(grads[3][ignored] == 0)
    if reduction == "none":
        assert torch.all(out[ignored] == 0)


def test_equals_the_kept_rows_alone(backend):
    """A masked batch gives what its kept rows give on their own (sum reduction)."""
    params, labels = _params(seed=3), _labels(0.5, seed=3)
    keep = labels != -100
    out, grads = _run(params, labels, "sum", backend)
    kept = [p[keep] if i in (0, 3) else p for i, p in enumerate(params)]
    ref_out, ref_grads = _run(kept, None, "sum", backend)
    assert_close(out, ref_out, TOL, "loss")
    assert_close(grads[0][keep], ref_grads[0], TOL, "grad hs (kept rows)")
    assert torch.all(grads[0][~keep] == 0)
    assert_close(grads[1], ref_grads[1], TOL, "grad ws")
    assert_close(grads[2], ref_grads[2], TOL, "grad bs")


def test_masked_rows_skip_the_gemms(monkeypatch):
    """Only kept rows reach the chunk GEMMs (the point of packing), and NaN in an ignored
    row's hidden state cannot leak into the loss or any gradient."""
    seen = []
    gemm = _engine.gemm_f32

    def counting(a, b):
        # The chunk's row count is the one extent that is neither V nor a hidden width:
        # (rows, H) @ W^T for the logits, (rows, V) @ W for d hidden, (V, rows) @ h for d weight.
        seen.append(a.shape[1] if a.shape[0] == V else a.shape[0])
        return gemm(a, b)

    monkeypatch.setattr(_engine, "gemm_f32", counting)
    params, labels = _params(seed=5), _labels(0.7, seed=5)
    params[0][labels == -100] = float("nan")
    out, grads = _run(params, labels, "mean", "auto")
    kept = int((labels != -100).sum())
    # Per chunk: student and teacher logits and d hidden (fp32 d weight accumulates in place).
    assert sum(seen) == 3 * kept, (seen, kept)
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads[:3])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_fully_masked_batch_is_a_connected_zero(reduction, teacher_grad, backend):
    params = _params(seed=7)
    labels = torch.full((N,), -100)
    nib = torch.tensor(250.0) if reduction == "mean" else None
    out, grads = _run(params, labels, reduction, backend, teacher_grad=teacher_grad,
                      num_items_in_batch=nib)
    assert torch.all(out == 0) and out.shape == ((N,) if reduction == "none" else ())
    for i, g in enumerate(grads):
        if i < 3 or teacher_grad:
            assert g is not None and g.shape == params[i].shape and torch.all(g == 0), i
        else:
            assert g is None


def test_divergence_fully_masked_batch_gives_zero_grads(backend):
    """fk.divergence (logits in memory): the same contract on an all-ignored batch."""
    s = logits((2, 5, V), torch.float32, seed=9).requires_grad_(True)
    t = logits((2, 5, V), torch.float32, seed=10).requires_grad_(True)
    labels = torch.full((2, 5), -100)
    for reduction in ("mean", "sum", "none"):
        loss = fk.divergence(s, t, "js", labels=labels, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert torch.all(loss == 0)
        assert s.grad is not None and torch.all(s.grad == 0)
        assert t.grad is not None and torch.all(t.grad == 0)
        s.grad = t.grad = None
