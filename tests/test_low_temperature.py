"""Low temperature and 16-bit logits: reverse KL, JS, the skew kinds, alpha (and forward KL) stay
finite and accurate for T down to 0.05 on bf16/fp16 logits of scale +-30 (Gemma-style softcap
ranges), with masked (-inf) vocabulary entries, against a float64 reference; the sparse tails too.

At T = 0.05 the logits / T span +-600, beyond what float64 *probabilities* hold (exp(-745) = 0),
so the reference here works in log space (log_softmax, logaddexp mixtures) rather than with
tests/reference.py's probability rows, which read such rows as +inf.
"""

import math

import pytest
import torch
from reference import logits, sparse_teacher

import fdiv_kernels as fk

F64 = torch.float64
KINDS = [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.5}), ("js", {"beta": 0.1}),
         ("skew_kl", {"lam": 0.1}), ("skew_reverse_kl", {"lam": 0.3}), ("alpha", {"alpha": 0.5})]


def _kl(lp, lq):
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), 0).sum(-1)


def _mix(la, lb, w):
    """log(w a + (1 - w) b) from log a, log b."""
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def log_space_rows(kind, s, t, kw, temperature):
    """Per-row D(p || q) in float64 from log-probabilities (p: teacher, q: student)."""
    lq, lp = (torch.log_softmax(x.to(F64) / temperature, -1) for x in (s, t))
    # Masked entries: a finite stand-in far below exp's range keeps autograd NaN-free.
    lq, lp = (torch.where(torch.isfinite(x), x, -1e4) for x in (lq, lp))
    if kind == "kl":
        return _kl(lp, lq)
    if kind == "reverse_kl":
        return _kl(lq, lp)
    if kind == "js":
        b = kw["beta"]
        lm = _mix(lp, lq, b)
        return b * _kl(lp, lm) + (1 - b) * _kl(lq, lm)
    if kind == "skew_kl":
        return _kl(lp, _mix(lp, lq, kw["lam"]))
    if kind == "skew_reverse_kl":
        return _kl(lq, _mix(lq, lp, kw["lam"]))
    a = kw["alpha"]
    return -torch.expm1(torch.logsumexp(a * lp + (1 - a) * lq, -1)) / (a * (1 - a))


def _softcapped(shape, dtype, seed):
    return (30 * torch.tanh(logits(shape, F64, seed=seed, scale=1.5))).to(dtype)


def _check(out, grads, ref, ref_grads, dtype):
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # Gradients are returned in the input dtype: compare at its rounding, relative to the row's
    # largest entry (1/T scales them up to ~20), plus the fp32 cancellation of terms of size 1/T
    # times |log p - log q| (up to ~1000 here): a teacher row whose gradient is ~5e-3 is the
    # difference of such terms.
    rtol = 8e-3 if dtype == torch.bfloat16 else 2e-3
    for g, r in zip(grads, ref_grads):
        scale = r.abs().amax(-1, keepdim=True)
        assert ((g.double() - r).abs() - rtol * scale).max() <= 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.05])
@pytest.mark.parametrize("kind, kw", KINDS, ids=[f"{k}-{list(kw.values())}" for k, kw in KINDS])
def test_dense(kind, kw, temperature, dtype, backend):
    s, t = _softcapped((4, 40), dtype, 1), _softcapped((4, 40), dtype, 2)
    s[1, :6] = t[1, :6] = float("-inf")  # a masked vocabulary (both sides)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    out = fk.divergence(s, t, kind, temperature=temperature, reduction="none", backend=backend,
                        inplace_backward=False, **kw)
    grads = torch.autograd.grad(out.sum(), (s, t))
    s64, t64 = (x.detach().to(F64).requires_grad_(True) for x in (s, t))
    ref = log_space_rows(kind, s64, t64, kw, temperature)
    ref_grads = torch.autograd.grad(ref.sum(), (s64, t64))
    _check(out, grads, ref, ref_grads, dtype)


def _sparse_case(dtype):
    s = _softcapped((4, 40), dtype, 3)
    s[1, 25:] = float("-inf")  # masked entries outside the teacher's top-k
    ids, lp = sparse_teacher((4, 40), 6, seed=4, top=True, student=s.float())
    return s, ids, lp.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "none"])
@pytest.mark.parametrize("kind, kw", KINDS[1:], ids=[f"{k}-{list(kw.values())}" for k, kw in
                                                     KINDS[1:]])
def test_sparse_finite(kind, kw, tail, dtype, backend):
    """Every tail stays finite at T = 0.05 (values and both gradients)."""
    s, ids, lp = _sparse_case(dtype)
    s, lp = s.requires_grad_(True), lp.requires_grad_(True)
    out = fk.sparse_divergence(s, ids, lp, kind, tail=tail, temperature=0.05, reduction="none",
                               backend=backend, inplace_backward=False, **kw)
    grads = torch.autograd.grad(out.sum(), (s, lp))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_sparse_bucket_tail_mass(backend):
    """Forward KL with the bucket tail at T = 0.05: the student's mass outside the teacher's top-k
    is below fp32 resolution (e^-170 here), so 1 - sum(q), or a sum of fp32 exps, reads 0 and
    the row +inf; it must come from the log-sum-exp of the tail: finite, accurate."""
    s, ids, lp = _sparse_case(torch.bfloat16)
    out = fk.sparse_divergence(s, ids, lp, "kl", tail="bucket", temperature=0.05,
                               reduction="none", backend=backend)
    z = s.to(F64) / 0.05
    lq = z - torch.logsumexp(z, -1, keepdim=True)
    outside = torch.ones_like(z, dtype=torch.bool).scatter_(-1, ids, False)
    lq_rest = torch.logsumexp(torch.where(outside, lq, -torch.inf), -1)
    p, lp64 = lp.to(F64).exp(), lp.to(F64)
    p_rest = 1 - p.sum(-1)
    ref = (p * (lp64 - lq.gather(-1, ids))).sum(-1) + p_rest * (p_rest.log() - lq_rest)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
