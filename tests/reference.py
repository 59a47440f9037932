"""The float64 reference every test and benchmark compares against (import it, never copy it).

Written straight from each divergence's definition on probabilities, independent of the
log-space element terms the kernels use; gradients come from autograd through it.
"""

from __future__ import annotations

import math

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
    if kind == "soft_ce":
        return -xlogy(p, q).sum(-1)
    if kind == "renyi":
        a = 0.5 if param is None else param
        # log sum p^a q^(1-a) over p > 0 (0^a = 0 for a > 0), in float64 from the definition,
        # as a log-sum-exp so that S far outside float64 (a = 50) stays finite: near a = 1 the
        # log of S ~ 1 is exact to ~1e-16 absolute, /(a-1) ~ 1e-12.
        pos = p > 0
        x = a * torch.log(torch.where(pos, p, 1)) + (1 - a) * torch.log(q)
        return torch.logsumexp(torch.where(pos, x, -math.inf), -1) / (a - 1)
    if kind == "cauchy_schwarz":
        return (-torch.log((p * q).sum(-1)) + 0.5 * torch.log((p * p).sum(-1))
                + 0.5 * torch.log((q * q).sum(-1)))
    if callable(param):  # a custom f-divergence: sum q f(p / q), param = the generator f
        pos = q > 0
        inside = torch.where(pos, q * param(p / torch.where(pos, q, 1)), 0)
        # q = 0 < p: p lim f(t)/t, +inf for the superlinear generators the tests use.
        outside = torch.where(~pos & (p > 0), torch.inf, 0)
        return (inside + outside).sum(-1)
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


# ---- sparse (top-k) teacher ---------------------------------------------------------------------


def _elementwise(kind: str, p: Tensor, q: Tensor, param: float | None) -> Tensor:
    """Per-outcome contribution of each kind, from its definition on (possibly unnormalized)
    probabilities; summed over a full distribution it is ``_rows``."""
    if kind == "kl":
        return xlogy(p, p) - xlogy(p, q)
    if kind == "reverse_kl":
        return xlogy(q, q) - xlogy(q, p)
    if kind == "js":
        b = 0.5 if param is None else param
        m = b * p + (1 - b) * q
        return b * (xlogy(p, p) - xlogy(p, m)) + (1 - b) * (xlogy(q, q) - xlogy(q, m))
    if kind == "tv":
        return 0.5 * (p - q).abs()
    if kind == "hellinger":
        return 0.5 * (p.sqrt() - q.sqrt()) ** 2
    if kind == "chi2":
        return (p - q) ** 2 / q
    if kind == "alpha":
        a = 0.5 if param is None else param
        return (a * p + (1 - a) * q - p**a * q ** (1 - a)) / (a * (1 - a))
    if kind == "skew_kl":
        lam = 0.1 if param is None else param
        return xlogy(p, p) - xlogy(p, lam * p + (1 - lam) * q)
    if kind == "skew_reverse_kl":
        lam = 0.1 if param is None else param
        return xlogy(q, q) - xlogy(q, lam * q + (1 - lam) * p)
    if kind == "jeffreys":
        return (xlogy(p, p) - xlogy(p, q)) + (xlogy(q, q) - xlogy(q, p))
    if kind == "soft_ce":
        return -xlogy(p, q)
    raise ValueError(kind)


def sparse_divergence_rows(
    student: Tensor, ids: Tensor, teacher_logprobs: Tensor, kind: str, param: float | None = None,
    *, tail: str = "bucket", temperature: float = 1.0, teacher_temperature: float | None = None,
    support: Tensor | None = None, slack: float = 0.0,
) -> Tensor:
    """Per-row divergence against a sparse teacher, in probability space, from the definitions:
    q = softmax(student / T) over all V gathered at ``ids``; p = exp(teacher_logprobs);
    re-tempered p^(T_t/T) / Z when ``teacher_temperature`` differs; "bucket" appends
    (1 - sum p, the sum of q off the support), "renormalize" divides both by their sums, "none"
    takes them as they are. Padding entries (``support`` False) are left out. Under "bucket" a
    support covering all V ids has no tail outcome (1 - sum p is rounding: 0), and a teacher
    tail of at most ``slack`` is 0 where the student's is 0."""
    dt = torch.promote_types(student.dtype, torch.float64)
    mask = torch.ones_like(ids, dtype=torch.bool) if support is None else support
    q_all = torch.softmax(student.to(dt) / temperature, dim=-1)
    one = torch.ones((), dtype=dt)
    # Padding entries are set to p = q = 1 (a zero contribution for every kind, finite grads)
    # after the sums below have left them out.
    q = torch.where(mask, q_all.gather(-1, torch.where(mask, ids, 0)), 0 * one)
    p = torch.where(mask, teacher_logprobs.to(dt).exp(), 0 * one)
    rest = 1 - p.sum(-1, keepdim=True)
    # The student's tail summed over the columns off the support (exact for any gap, unlike
    # 1 - sum_S q), and the two conventions for a tail that is only rounding.
    on_s = torch.zeros(q_all.shape, dtype=torch.int64).scatter_add(
        -1, torch.where(mask, ids, 0), mask.to(torch.int64)) > 0
    q_off = torch.where(on_s, 0 * one, q_all).sum(-1, keepdim=True)
    covered = on_s.all(-1, keepdim=True)
    rest = torch.where(covered | ((q_off == 0) & (rest <= slack)), 0 * one, rest)
    if teacher_temperature is not None and teacher_temperature != temperature:
        a = teacher_temperature / temperature
        pa = torch.where(mask, torch.where(mask, p, one) ** a, 0 * one)
        if tail == "bucket":
            ra = rest.clamp(min=0) ** a
            z = pa.sum(-1, keepdim=True) + ra
            p, rest = pa / z, ra / z
        else:
            p = pa / pa.sum(-1, keepdim=True)
    if tail == "renormalize":
        p = p / p.sum(-1, keepdim=True)
        q = q / q.sum(-1, keepdim=True)
    p = torch.where(mask, p, one)
    q = torch.where(mask, q, one)
    rows = torch.where(mask, _elementwise(kind, p, q, param), 0 * one).sum(-1)
    if tail == "bucket":
        # No tail on either side: no outcome (p = q = 1 in the unused branch keeps grads finite).
        empty = (rest <= 0) & (q_off == 0)
        tail_term = _elementwise(kind, torch.where(empty, one, rest.clamp(min=0)),
                                 torch.where(empty, one, q_off), param)
        rows = rows + torch.where(empty, 0 * one, tail_term).squeeze(-1)
    return rows


def sparse_divergence_with_grads(student, ids, teacher_logprobs, kind, param=None, *,
                                 weights=None, **kw):
    """(per-row loss, d sum(w loss) / d student, d ... / d teacher_logprobs), float64."""
    s = student.detach().to(torch.float64).requires_grad_(True)
    t = teacher_logprobs.detach().to(torch.float64).requires_grad_(True)
    rows = sparse_divergence_rows(s, ids, t, kind, param, **kw)
    w = torch.ones_like(rows) if weights is None else weights.to(rows)
    gs, gt = torch.autograd.grad((rows * w).sum(), (s, t))
    return rows.detach(), gs, gt


def sparse_teacher(shape, k: int, *, seed: int, top: bool = False, mass: float = 0.9,
                   student: Tensor | None = None):
    """(ids, teacher log-probs) with K distinct ids per row drawn at random (or the top-k of
    ``student`` when ``top``) and log-probs holding ``mass`` in total on them, float64."""
    g = torch.Generator().manual_seed(seed)
    *lead, v = shape
    n = 1
    for d in lead:
        n *= d
    if top:
        ids = student.reshape(n, v).topk(k, dim=-1).indices
    else:
        ids = torch.rand(n, v, generator=g).argsort(-1)[:, :k]
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    lp = torch.log_softmax(w, -1) + torch.log(torch.tensor(mass, dtype=torch.float64))
    return ids.reshape(*lead, k), lp.reshape(*lead, k)


# ---- logit transforms (softcap, logit scale) -----------------------------------------------


def transform_logits(x: Tensor, scale: float = 1.0, softcap: float | None = None) -> Tensor:
    """The model-side transform the ops fuse in, applied in torch first: z = x scale, then
    z = c tanh(z / c) under a softcap c (float64 or wider; differentiable)."""
    z = x.to(torch.promote_types(x.dtype, torch.float64)) * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


# ---- the teacher's side: top-k log-probs ------------------------------------------------------


def topk_logprobs_rows(x: Tensor, k: int, temperature: float = 1.0, scale: float = 1.0,
                       softcap: float | None = None, top_p: float | None = None):
    """(ids int64, log-probs float64, support mask or None) of each row's k most probable ids:
    log_softmax of a = transform(x) / T, sorted descending with ties to the lower id (a stable
    sort); ``top_p`` keeps the smallest prefix whose mass reaches it (every entry of nonzero
    probability at top_p = 1), entries of zero probability never. Rows need a finite logit."""
    a = transform_logits(x, scale, softcap) / temperature
    lp = torch.log_softmax(a, dim=-1)
    vals, ids = torch.sort(lp, dim=-1, descending=True, stable=True)
    vals, ids = vals[..., :k], ids[..., :k]
    if top_p is None:
        return ids, vals, None
    p = vals.exp()
    mass_before = torch.cumsum(p, dim=-1) - p
    keep = vals > -math.inf
    if top_p < 1:
        keep = keep & (mass_before < top_p)
    return ids, vals, keep
