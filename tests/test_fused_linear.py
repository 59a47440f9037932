"""fused_linear_divergence against materialized float64 logits, and its memory bound."""

import math

import pytest
import torch
from conftest import BACKENDS
from helpers import assert_close
from reference import divergence_from_probs, logits

import fdiv_kernels as fk
from fdiv_kernels.bench.measure import peak_bytes
from fdiv_kernels.kinds._registry import DIVERGENCES

N, HS, HT, VS = 7, 5, 6, 11
TOL = (2e-5, 2e-6)


def _params(vt=VS, bias=True, seed=0, dtype=torch.float32):
    hs, ws = logits((N, HS), dtype, seed=seed), logits((VS, HS), dtype, seed=seed + 1, scale=0.7)
    ht, wt = logits((N, HT), dtype, seed=seed + 2), logits((vt, HT), dtype, seed=seed + 3, scale=0.7)
    bs = logits((VS,), dtype, seed=seed + 4) if bias else None
    bt = logits((vt,), dtype, seed=seed + 5) if bias else None
    return [hs, ws, bs, ht, wt, bt]


def _reference(params, kind, temperature, labels, reduction, ce_weight, pad_mask=None):
    """Materialized logits in float64, then the float64 reference divergence (+ CE)."""
    hs, ws, bs, ht, wt, bt = params
    zs = hs @ ws.t() + (bs if bs is not None else 0)
    zt = ht @ wt.t() + (bt if bt is not None else 0)
    q = torch.softmax(zs / temperature, -1)
    if pad_mask is not None:  # teacher columns at -inf: drop them (same distribution)
        zt = zt[:, ~pad_mask]
    p = torch.softmax(zt / temperature, -1)
    if p.shape[-1] > q.shape[-1]:  # the student's missing entries: probability exactly 0
        q = torch.cat([q, q.new_zeros(q.shape[0], p.shape[-1] - q.shape[-1])], -1)
    rows = divergence_from_probs(kind, p, q)
    keep = torch.ones(N, dtype=torch.bool) if labels is None else labels != -100
    if ce_weight:
        lp = torch.log_softmax(zs[:, : ws.shape[0]], -1)
        ce = -lp.gather(-1, torch.where(keep, labels, 0)[:, None]).squeeze(-1)
        rows = (1 - ce_weight) * rows + ce_weight * ce
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp(min=1)


def _compare(params, kind, backend, *, temperature=1.0, labels=None, reduction="mean",
             ce_weight=0.0, chunk_size=None, pad_mask=None, teacher_grad=True, vocab_size=None):
    ours = [p.detach().clone().requires_grad_(i < 3 or teacher_grad) if p is not None else None
            for i, p in enumerate(params)]
    ref = [p.detach().double().requires_grad_(i < 3 or teacher_grad) if p is not None else None
           for i, p in enumerate(params)]
    out = fk.fused_linear_divergence(
        ours[0], ours[1], ours[3], ours[4], kind, temperature=temperature,
        student_bias=ours[2], teacher_bias=ours[5], labels=labels, reduction=reduction,
        ce_weight=ce_weight, chunk_size=chunk_size, backend=backend, vocab_size=vocab_size,
    )
    expected = _reference(ref, kind, temperature, labels, reduction, ce_weight, pad_mask)
    assert_close(out, expected, TOL, "loss")
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * w.to(out.dtype)).sum().backward()
    (expected * w).sum().backward()
    for name, a, b in zip(("hs", "ws", "bs", "ht", "wt", "bt"), ours, ref):
        if a is None or not a.requires_grad:
            continue
        assert a.grad.dtype == a.dtype
        if pad_mask is not None and name in ("wt", "bt"):  # the padding rows: exactly 0
            assert torch.all(a.grad[pad_mask] == 0)
            a, b = a.grad[~pad_mask], b.grad[~pad_mask]
            assert_close(a, b, TOL, f"grad {name}")
            continue
        assert_close(a.grad, b.grad, TOL, f"grad {name}")


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_every_kind_matches_materialized(kind, backend):
    _compare(_params(), kind, backend, temperature=1.5, chunk_size=3)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 7, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunks_reductions_ignored_rows(chunk_size, reduction, backend):
    labels = torch.tensor([1, -100, 3, 4, -100, 0, 10])
    _compare(_params(seed=3), "js", backend, labels=labels, reduction=reduction,
             chunk_size=chunk_size)


@pytest.mark.parametrize("bias", [False, True])
def test_ce_mixing_and_no_bias(bias, backend):
    labels = torch.tensor([1, -100, 3, 4, 5, 0, 10])
    _compare(_params(bias=bias, seed=5), "kl", backend, labels=labels, ce_weight=0.3,
             chunk_size=2, teacher_grad=False)


@pytest.mark.parametrize("kind", ["js", "reverse_kl", "tv"])
def test_teacher_head_padded_to_more_rows(kind, backend):
    """A teacher head padded to Vt > Vs rows: vocab_size=Vs takes the first Vs rows of both (the
    reference drops the padding columns); without it, the widths are refused."""
    params = _params(vt=VS + 3, seed=7)
    pad = torch.zeros(VS + 3, dtype=torch.bool)
    pad[VS:] = True
    _compare(params, kind, backend, chunk_size=3, pad_mask=pad, vocab_size=VS)
    with pytest.raises(ValueError, match="vocab_size"):
        fk.fused_linear_divergence(params[0], params[1], params[3], params[4], kind,
                                   backend=backend)


def test_padded_teacher_entries_masked(backend):
    """A padded teacher head with -inf bias on its extra rows, its padding cut by vocab_size."""
    params = _params(vt=VS + 2, seed=9)
    params[5][VS:] = -math.inf
    pad = torch.zeros(VS + 2, dtype=torch.bool)
    pad[VS:] = True
    params[5] = params[5].detach()
    _compare(params, "kl", backend, chunk_size=4, pad_mask=pad, teacher_grad=False,
             vocab_size=VS)


def test_module_and_bf16_gradients_match(backend):
    params = _params(seed=11, dtype=torch.bfloat16)
    crit = fk.nn.FusedLinearDivergenceLoss("reverse_kl", temperature=2.0, chunk_size=3,
                                           backend=backend)
    hs = params[0].clone().requires_grad_(True)
    loss = crit(hs, params[1], params[3], params[4], student_bias=params[2],
                teacher_bias=params[5])
    loss.backward()
    ref = [p.double().requires_grad_(i == 0) for i, p in enumerate(params)]
    expected = _reference(ref, "reverse_kl", 2.0, None, "mean", 0.0)
    expected.backward()
    assert hs.grad.dtype == torch.bfloat16
    assert_close(loss, expected, (1e-5, 1e-6), "loss (fp32 logits from bf16 operands)")
    assert_close(hs.grad, ref[0].grad, (1.6e-2, 1e-5), "grad")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda p: p.__setitem__(3, p[3][:5]), ValueError, "leading shape"),
        (lambda p: p.__setitem__(1, p[1][:, :4]), ValueError, "student_weight must be"),
        (lambda p: p.__setitem__(4, p[4][:, :4]), ValueError, "teacher_weight must be"),
        (lambda p: (p.__setitem__(4, p[4][:5]), p.__setitem__(5, p[5][:5])), ValueError,
         "vocab_size"),
        (lambda p: p.__setitem__(2, p[2][:3]), ValueError, "student_bias must be"),
        (lambda p: p.__setitem__(1, p[1][0]), ValueError, "2-D"),
        (lambda p: p.__setitem__(0, p[0].long()), TypeError, "floating point"),
    ],
)
def test_bad_input(change, exc, match):
    p = _params()
    change(p)
    with pytest.raises(exc, match=match):
        fk.fused_linear_divergence(p[0], p[1], p[3], p[4], student_bias=p[2], teacher_bias=p[5])


def test_bad_options():
    p = _params()
    with pytest.raises(ValueError, match="ce_weight > 0 needs labels"):
        fk.fused_linear_divergence(p[0], p[1], p[3], p[4], ce_weight=0.5)
    with pytest.raises(ValueError, match="ce_weight must be in"):
        fk.fused_linear_divergence(p[0], p[1], p[3], p[4], ce_weight=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fk.fused_linear_divergence(p[0], p[1], p[3], p[4], chunk_size=0)
    with pytest.raises(ValueError, match="labels must be in"):
        fk.fused_linear_divergence(p[0], p[1], p[3], p[4], ce_weight=0.5,
                                   labels=torch.full((N,), VS))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="measures the CPU backend's resident memory")
def test_memory_bound_against_eager():
    """Peak memory (measured) at most 1/4 of materialized logits + log_softmax + loss."""
    n, h, v = 1024, 64, 16000
    torch.manual_seed(0)
    hs = torch.randn(n, h, requires_grad=True)
    ws = (torch.randn(v, h) * 0.1).requires_grad_(True)
    ht, wt = torch.randn(n, h), torch.randn(v, h) * 0.1

    def eager():
        lq = torch.log_softmax(hs @ ws.t(), -1)
        lp = torch.log_softmax(ht @ wt.t(), -1)
        (lp.exp() * (lp - lq)).sum(-1).mean().backward()

    def fused():
        fk.fused_linear_divergence(hs, ws, ht, wt, "kl", chunk_size=64, backend="cpu").backward()

    eager(), fused()  # warm up allocator and kernels
    peak_eager, peak_fused = peak_bytes(eager, hs.device), peak_bytes(fused, hs.device)
    assert peak_eager is not None and peak_eager > 4 * n * v * 4  # eager holds several (N, V)
    assert peak_fused <= peak_eager / 4, (peak_fused, peak_eager)


@pytest.mark.parametrize("kind", ["js", "kl", "alpha"])
def test_matches_materialized_logits_through_the_core_op(kind, backend):
    """The fused op equals: materialize fp32 logits, then fk.divergence (the unfused path)."""
    params = _params(seed=13)
    labels = torch.tensor([1, -100, 3, 4, 5, 0, -100])
    hs = params[0].clone().requires_grad_(True)
    loss = fk.fused_linear_divergence(hs, params[1], params[3], params[4], kind,
                                      student_bias=params[2], teacher_bias=params[5],
                                      labels=labels, chunk_size=4, backend=backend)
    loss.backward()
    hs2 = params[0].clone().requires_grad_(True)
    zs = hs2 @ params[1].t() + params[2]
    zt = params[3] @ params[4].t() + params[5]
    unfused = fk.divergence(zs, zt, kind, labels=labels, backend=backend)
    unfused.backward()
    assert_close(loss, unfused, TOL, "loss")
    assert_close(hs.grad, hs2.grad, TOL, "grad")
