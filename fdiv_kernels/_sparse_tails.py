"""The tail conventions of a sparse (top-k) teacher, and the teacher side of the sparse divergence.

Ids shared by Python, Triton and C++: ``TAIL_NONE``, ``TAIL_BUCKET``, ``TAIL_RENORMALIZE``.

The teacher side is O(K) per row, so it is plain differentiable torch run before the kernel: the
kernels receive the final teacher log-probabilities (``-inf`` on padding) and, under ``"bucket"``,
the tail's log-probability, and return d loss / d (those), which autograd carries back through
the re-tempering and the tail below to ``teacher_logprobs``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels._ids import TAIL_BUCKET, TAIL_NONE, TAIL_RENORMALIZE

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


def prepare_teacher(lp: Tensor, support: Tensor, tail: int, alpha: float | None
                    ) -> tuple[Tensor, Tensor]:
    """(log p' over the K entries, log p'_tail) as the kernels use them, differentiably.

    ``alpha = T_teacher / T`` re-tempers (None: not re-tempered). Padding entries get -inf. With
    ``"bucket"`` the tail is 1 - sum_S p, taken as log1mexp(LSE_S log p) (a mass above 1 within
    rounding gives an empty tail); re-tempering then acts on all K + 1 outcomes (as DistillKit's
    SYMMETRIC_UNIFORM: p'_o = p_o^alpha / sum p^alpha). ``"renormalize"`` renormalizes over S, and
    so does ``"none"`` when re-tempering (as axolotl does); plain ``"none"`` uses log p as given.
    """
    neg_inf = torch.full_like(lp, float("-inf"))
    lp = torch.where(support, lp, neg_inf)
    no_tail = lp.new_full(lp.shape[:-1], float("-inf"))
    if tail == TAIL_BUCKET:
        mass = _masked_lse(lp, support)
        lp_tail = log1mexp(mass.clamp(max=0.0))
        if alpha is None:
            return lp, lp_tail
        z = torch.logaddexp(_masked_lse(alpha * lp, support), alpha * lp_tail)
        return torch.where(support, alpha * lp - z.unsqueeze(-1), neg_inf), alpha * lp_tail - z
    if tail == TAIL_RENORMALIZE or alpha is not None:
        a = 1.0 if alpha is None else alpha
        z = _masked_lse(a * lp, support)
        return torch.where(support, a * lp - z.unsqueeze(-1), neg_inf), no_tail
    return lp, no_tail
