"""The float64 reference every test and benchmark compares against (import it, never copy it).

Written straight from each divergence's definition on probabilities, independent of the
log-space element terms the kernels use; gradients come from autograd through it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.special import xlogy


def _kl(p: Tensor, q: Tensor) -> Tensor:
    return (xlogy(p, p) - xlogy(p, q)).sum(-1)


def divergence_from_probs(kind: str, p: Tensor, q: Tensor, param: float | None = None) -> Tensor:
    """Per-row D(p || q) from probability rows (zero entries allowed, as constants)."""
    return _rows(kind, p, q, param)


def _rows(kind: str, p: Tensor, q: Tensor, param: float | None) -> Tensor:
    if kind == "kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "js":
        b = 0.5 if param is None else param
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "hellinger":
        return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if kind == "chi2":
        return ((p - q) ** 2 / q).sum(-1)
    if kind == "alpha":
        a = 0.5 if param is None else param
        # 1 - sum p^a q^(1-a) = sum p (1 - (q/p)^(1-a)) = sum q (1 - (p/q)^a), written with expm1
        # of the smaller exponent: float64 stays exact as a -> 0 or 1, where the plain form
        # cancels as 1 / (a (1-a)). Zero entries of the weighting row add nothing.
        x, y, e = (p, q, 1 - a) if a >= 0.5 else (q, p, a)
        pos = x > 0
        ratio = torch.where(pos, y, 1) / torch.where(pos, x, 1)
        term = torch.where(pos, -x * torch.expm1(e * torch.log(ratio)), 0)
        return term.sum(-1) / (a * (1 - a))
    if kind == "skew_kl":
        lam = 0.1 if param is None else param
        return _kl(p, lam * p + (1 - lam) * q)
    if kind == "skew_reverse_kl":
        lam = 0.1 if param is None else param
        return _kl(q, lam * q + (1 - lam) * p)
    if kind == "jeffreys":
        return _kl(p, q) + _kl(q, p)
    raise ValueError(kind)


def divergence_rows(
    student: Tensor, teacher: Tensor, kind: str, param: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-row D(p || q), p = softmax(teacher / T), q = softmax(student / T), leading shape kept.

    Computes in ``promote_types(dtype, float64)`` so float64 inputs keep their autograd graph.
    """
    dt = torch.promote_types(student.dtype, torch.float64)
    q = torch.softmax(student.to(dt) / temperature, dim=-1)
    p = torch.softmax(teacher.to(dt) / temperature, dim=-1)
    return _rows(kind, p, q, param)


def divergence_with_grads(
    student: Tensor, teacher: Tensor, kind: str, param: float | None = None,
    temperature: float = 1.0, weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row loss, d sum(w * loss)/d student, d ... /d teacher), all float64."""
    s = student.detach().to(torch.float64).requires_grad_(True)
    t = teacher.detach().to(torch.float64).requires_grad_(True)
    rows = divergence_rows(s, t, kind, param, temperature)
    w = torch.ones_like(rows) if weights is None else weights.to(rows)
    gs, gt = torch.autograd.grad((rows * w).sum(), (s, t))
    return rows.detach(), gs, gt


def logits(shape, dtype=torch.float32, *, seed: int, scale: float = 2.0) -> Tensor:
    """Fresh seeded random logits, never zeros; spread wide enough for peaked softmaxes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def softmax_stats_rows(x: Tensor, labels: Tensor | None = None, temperature: float = 1.0,
                       ignore_index: int = -100):
    """(lse, entropy, label log-prob or None) of softmax(x / T) per row, in float64 or wider."""
    dt = torch.promote_types(x.dtype, torch.float64)
    a = x.to(dt) / temperature
    lse = torch.logsumexp(a, dim=-1)
    q = torch.softmax(a, dim=-1)
    ent = -xlogy(q, q).sum(-1)
    if labels is None:
        return lse, ent, None
    keep = labels != ignore_index
    picked = a.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1) - lse
    return lse, ent, torch.where(keep, picked, torch.zeros_like(picked))
