"""The tail conventions of a sparse (top-k) teacher, and the teacher side of the sparse divergence.

Ids shared by Python, Triton and C++: ``TAIL_NONE``, ``TAIL_BUCKET``, ``TAIL_RENORMALIZE``.

The teacher side is O(K) per row. The kernels (C++, Triton) do it per row in registers from the
raw ``teacher_logprobs`` (no torch op around them): :func:`prepare_teacher` below is its
statement of record, and :func:`teacher_vjp` the chain rule the kernels apply to return
d loss / d ``teacher_logprobs``; the torch backend runs exactly these two functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels.core._ids import TAIL_BUCKET, TAIL_NONE, TAIL_RENORMALIZE

TAILS = {"none": TAIL_NONE, "bucket": TAIL_BUCKET, "renormalize": TAIL_RENORMALIZE}

_LN_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0 (Maechler, 2012): expm1 near 0, log1p far from it.

    Each branch sees a safe input, so the unused branch never puts a NaN into the gradient.
    """
    near = x > _LN_HALF
    a = torch.where(near, x, torch.full_like(x, -1.0))
    b = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _masked_lse(x: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the last dim of the masked entries; -inf (not NaN) when none is kept."""
    x = torch.where(mask, x, torch.full_like(x, float("-inf")))
    m = x.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.where(mask, torch.exp(x - m), torch.zeros_like(x)).sum(-1)
    # An empty support: log(1) under the mask, so the backward never divides 0 by 0.
    kept = s > 0
    out = torch.log(torch.where(kept, s, torch.ones_like(s))) + m.squeeze(-1)
    return torch.where(kept, out, torch.full_like(out, float("-inf")))


def check_teacher(ids: Tensor, lp: Tensor, support: Tensor, vocab: int, tail: int,
                  mass_slack: float, *, retempered: bool = False,
                  keep: Tensor | None = None) -> None:
    """The value checks every backend's forward makes (the kernels per row, without a host
    sync on the CPU): ids in [0, V) and distinct on the support; under "bucket" a teacher
    mass on S of at most 1 + ``mass_slack`` (and at least 1 - ``mass_slack`` where S covers all
    V ids: no outcome is left for the tail); when the teacher is renormalized over S
    ("renormalize", or "none" when ``retempered``, as prepare_teacher does), some mass on a
    non-empty S (renormalizing all -inf log-probs is 0 / 0). Rows not in ``keep`` (ignored rows, (N,) bool) are not read.
    ValueError naming the argument."""
    if ids.numel() == 0:
        return
    if keep is not None and keep.numel():
        support = support & keep.reshape(-1, 1)
    bad = support & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"teacher_ids must be in [0, {vocab}) on the support, got "
                         f"{int(ids[bad][0])}")
    # Duplicates: sort each row's support ids (padding pushed to distinct negatives) and compare
    # neighbours, O(N K log K).
    pad = -1 - torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    srt = torch.where(support, ids, pad).sort(-1).values
    if ids.shape[1] > 1 and bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
        raise ValueError("teacher_ids must not repeat an id within a row (on the support)")
    if tail == TAIL_BUCKET:
        mass = _masked_lse(lp.to(torch.float64), support)
        over = mass > math.log1p(mass_slack)
        if mass_slack < 1:
            over |= _covered(support, vocab) & (mass < math.log1p(-mass_slack))
        if bool(over.any()):
            raise ValueError(
                f"teacher_logprobs: under tail='bucket' the teacher mass on the support must be "
                f"at most 1 (+{mass_slack} rounding), and 1 (-+{mass_slack}) where the support "
                f"covers all {vocab} ids, got {float(mass[over][0].exp()):.6g}"
            )
    if tail == TAIL_RENORMALIZE or (tail == TAIL_NONE and retempered):
        none = support.any(-1) & (_masked_lse(lp.to(torch.float64), support) == float("-inf"))
        if bool(none.any()):
            raise ValueError(
                "teacher_logprobs: renormalized over the support (tail='renormalize', or "
                "tail='none' with a teacher_temperature), a row's teacher needs some mass there; "
                f"row {int(none.nonzero()[0, 0])} has every log-prob on its support -inf"
            )


def _covered(support: Tensor, vocab: int | None) -> Tensor:
    """Rows whose support holds all ``vocab`` ids (distinct, checked): no outcome for a tail."""
    if vocab is None:
        return torch.zeros(support.shape[:-1], dtype=torch.bool, device=support.device)
    return support.sum(-1) == vocab


def prepare_teacher(lp: Tensor, support: Tensor, tail: int, alpha: float | None,
                    vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """(log p' over the K entries, log p'_tail) as the kernels use them, differentiably.

    ``alpha = T_teacher / T`` re-tempers (None: not re-tempered). Padding entries get -inf. With
    ``"bucket"`` the tail is 1 - sum_S p, taken as log1mexp(LSE_S log p) (a mass above 1 within
    rounding gives an empty tail, and so does a support covering all ``vocab`` ids, where a mass
    below 1 is rounding); re-tempering then acts on all K + 1 outcomes (as DistillKit's
    SYMMETRIC_UNIFORM: p'_o = p_o^alpha / sum p^alpha). ``"renormalize"`` renormalizes over S, and
    so does ``"none"`` when re-tempering (as axolotl does); plain ``"none"`` uses log p as given.
    """
    neg_inf = torch.full_like(lp, float("-inf"))
    lp = torch.where(support, lp, neg_inf)
    no_tail = lp.new_full(lp.shape[:-1], float("-inf"))
    if tail == TAIL_BUCKET:
        mass = _masked_lse(lp, support)
        lp_tail = log1mexp(mass.clamp(max=0.0))
        lp_tail = torch.where(_covered(support, vocab), float("-inf"), lp_tail)
        if alpha is None:
            return lp, lp_tail
        z = torch.logaddexp(_masked_lse(alpha * lp, support), alpha * lp_tail)
        return torch.where(support, alpha * lp - z.unsqueeze(-1), neg_inf), alpha * lp_tail - z
    if tail == TAIL_RENORMALIZE or alpha is not None:
        a = 1.0 if alpha is None else alpha
        z = _masked_lse(a * lp, support)
        return torch.where(support, a * lp - z.unsqueeze(-1), neg_inf), no_tail
    return lp, no_tail


def teacher_vjp(lp: Tensor, support: Tensor, tail: int, alpha: float | None, k: Tensor,
                k_tail: Tensor, vocab: int | None = None) -> Tensor:
    """d loss / d raw log-probs from ``k`` = d loss / d (final log-probs) (N, K) and ``k_tail``
    (N,), the transpose of :func:`prepare_teacher`'s Jacobian in closed form:

    * re-tempering / renormalizing (lp'_o = a u_o - LSE(a u)): G_o = a (k_o - p'_o sum k);
    * the tail u_tail = log1mexp(LSE_S lp) moves with each entry: d u_tail / d lp_i =
      -p_i / p_tail, dropped when S holds all the mass (p_tail = 0: the tail is clamped there).
    """
    zero = torch.zeros_like(k)
    k = torch.where(support, k, zero)
    lp = torch.where(support, lp, torch.full_like(lp, float("-inf")))
    fin, fin_tail = prepare_teacher(lp, support, tail, alpha, vocab)
    bucket = tail == TAIL_BUCKET
    renorm = (bucket and alpha is not None) or (not bucket and (
        tail == TAIL_RENORMALIZE or alpha is not None))
    g, g_tail = k, k_tail
    if renorm:
        a = 1.0 if alpha is None else alpha
        total = k.sum(-1) + (k_tail if bucket else 0.0)
        g = a * (k - fin.exp() * total[:, None])
        g_tail = a * (k_tail - fin_tail.exp() * total)
    if bucket:
        raw_tail = log1mexp(_masked_lse(lp, support).clamp(max=0.0))
        raw_tail = torch.where(_covered(support, vocab), float("-inf"), raw_tail)
        through = torch.isfinite(raw_tail) & (g_tail != 0)
        ratio = (lp - torch.where(through, raw_tail, torch.zeros_like(raw_tail))[:, None]).exp()
        g = g - torch.where(through, g_tail, torch.zeros_like(g_tail))[:, None] * ratio
    return torch.where(support, g, zero)
