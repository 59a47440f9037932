"""The kinds that are functions of a few per-row sums, not sums of element terms: Renyi and
Cauchy-Schwarz (``ROW_DIVERGENCES`` in ``fdiv_kernels._kinds``), as ``fk.divergence`` runs them.

Both are written with one row op, ``fdiv::lse_combination_fwd_<backend>`` (csrc/cpu/
lse_combination.cpp, triton_kernels/lse_combination.py, ``lse_combination_rows_torch`` below):
with a = student / T, b = teacher / T and three terms (ca_k, cb_k, w_k)::

    D = sum_k w_k lse(ca_k a + cb_k b),   dD/da = sum_k w_k ca_k softmax(ca_k a + cb_k b)

(and cb for b): one pass for the three online log-sum-exps, one for the gradients, computed in
the forward and scaled per row in the backward like ``DivergenceFunction``'s. The sums are
accumulated in float64 (per element the exps are in the compute type); the logit transforms
(scale, softcap) are fused in.

Cauchy-Schwarz, D_CS = -log sum p q + 1/2 log sum p^2 + 1/2 log sum q^2: the log-partition
functions cancel, leaving 1/2 lse(2a) + 1/2 lse(2b) - lse(a + b), gradient softmax(2a) -
softmax(a + b). The maxima are combined before the log-sums, so identical rows give exactly 0 and
D_CS -> 0 keeps its float64-sum accuracy; disjoint supports give lse(a + b) = -inf, D = +inf, and
that term is left out of the gradient (finite, never NaN).

Renyi of order alpha > 0, D = log S / (alpha - 1), S = sum p^alpha q^(1-alpha), from
log-sum-exps for every alpha != 1 (alpha = 1 folds into KL):

    log S = lse((1-alpha) a + alpha b) - (1-alpha) lse(a) - alpha lse(b),

terms (1-alpha, alpha, 1/(alpha-1)), (1, 0, 1), (0, 1, alpha/(1-alpha)). Never forming S itself,
it holds for any S: a logit at -100 with alpha = 2 (S ~ e^100), alpha = 50 on ordinary logits,
disjoint supports (+inf). For alpha > 1 the student coefficient 1 - alpha is negative: a -inf
student logit under teacher mass gives +inf (q = 0 < p: D = +inf), and a column with p = 0 drops
out whatever q is (the row op's mix rule). The sums are float64, so near alpha = 1, where
log S ~ (alpha - 1) KL cancels, log S keeps ~1e-16 |lse| absolute: D to ~1e-9 at 1 -+ 1e-7. The
teacher gradient alpha / (alpha - 1) (softmax(mix) - p) cancels there too; the row op then forms
its gradient in float64 (it does whenever a coefficient is negative or above 2, or a weighted
coefficient exceeds 1 in magnitude: amplified float32 rounding).
alpha <= 0 is rejected (``_kinds``): Renyi's alpha -> 0 limit is -log q(supp p), not a smooth
divergence, and negative orders are not divergences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels._grads_in_forward import keep_grads, scaled_grads
from fdiv_kernels._logit_transform import transform_logits
from fdiv_kernels.backends.common import loss_dtype

RENYI = "renyi"
CAUCHY_SCHWARZ = "cauchy_schwarz"
ROW_KIND_NAMES = f"{RENYI!r} / {CAUCHY_SCHWARZ!r}"


# Terms (ca, cb, w) of the row op.
CAUCHY_SCHWARZ_COEFFS = (2.0, 0.0, 0.5, 0.0, 2.0, 0.5, 1.0, 1.0, -1.0)


def renyi_coeffs(alpha: float) -> tuple[float, ...]:
    """Renyi of order alpha != 1: log S / (alpha - 1) as three terms of the row op."""
    return (1.0 - alpha, alpha, 1.0 / (alpha - 1.0), 1.0, 0.0, 1.0, 0.0, 1.0, alpha / (1.0 - alpha))


def _scaled_logits(z: Tensor, scale: float, softcap: float,
                   inv_t: float) -> tuple[Tensor, Tensor | float]:
    """(a, da/dz) with a = transform(z) / T (fdiv_kernels._logit_transform)."""
    a, da = transform_logits(z, scale, softcap)
    return a * inv_t, da * inv_t


def _softmax_or_zero(x: Tensor, lse: Tensor) -> Tensor:
    """exp(x - lse) row-wise; 0 on rows whose lse is infinite (no mass, or an infinite term:
    nothing finite to differentiate)."""
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dead = torch.isinf(lse)[:, None]
    return torch.where(dead, torch.zeros_like(x), torch.exp(x - safe[:, None]))


def lse_combination_rows_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, coeffs: list[float], inv_temperature: float,
    student_scale: float, student_softcap: float, teacher_scale: float, teacher_softcap: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The torch statement of ``fdiv::lse_combination_fwd_<backend>`` (float64 sums)."""
    from fdiv_kernels.backends.torch_ref import _chunks, _zero_where

    if len(coeffs) != 9:
        raise ValueError(f"coeffs must hold 9 numbers (ca, cb, w per term), got {len(coeffs)}")
    terms = [tuple(float(c) for c in coeffs[i:i + 3]) for i in (0, 3, 6)]
    if any(not math.isfinite(ca + cb + w) for ca, cb, w in terms):
        raise ValueError(f"coeffs must be finite, got {terms}")
    ctype = loss_dtype(student.dtype)
    wide = torch.promote_types(ctype, torch.float64)
    N, V = student.shape
    loss = student.new_empty(N, dtype=ctype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    for rows in _chunks(N, V):
        a, da = _scaled_logits(student[rows].to(wide), student_scale, student_softcap,
                               inv_temperature)
        b, db = _scaled_logits(teacher[rows].to(wide), teacher_scale, teacher_softcap,
                               inv_temperature)
        xs = [_mix(a, b, ca, cb) for ca, cb, _ in terms]
        # The maxima first, then the log-sums (as the kernels: exact 0 on identical CS rows). A
        # term with a +inf entry (a negative coefficient on a -inf logit) has lse = +inf: its
        # shift is +inf and its log-sum 0 (not inf - inf).
        maxes = [x.amax(-1) for x in xs]
        shifts = [torch.where(m == -math.inf, 0.0, m) for m in maxes]
        logs = [torch.where(m == math.inf, 0.0,
                            torch.log(torch.exp(x - torch.where(m == math.inf, 0.0, m)[:, None])
                                      .sum(-1)))
                for x, m in zip(xs, shifts)]
        lses = [m + ls for m, ls in zip(shifts, logs)]
        row = sum(w * m for (_, _, w), m in zip(terms, shifts))
        row = row + sum(w * ls for (_, _, w), ls in zip(terms, logs))
        keep = valid[rows]
        loss[rows] = _zero_where(keep, row.to(ctype))
        for want, out, slope, idx in ((grad_student, gs, da, 0), (grad_teacher, gt, db, 1)):
            if not want:
                continue
            g = torch.zeros_like(a)
            for term, x, lse in zip(terms, xs, lses):
                wc = term[2] * term[idx]
                if wc != 0:
                    g = g + wc * _softmax_or_zero(x, lse)
            out[rows] = _zero_where(keep, g * slope)
    return loss, gs, gt


def _mix(a: Tensor, b: Tensor, ca: float, cb: float) -> Tensor:
    """ca a + cb b, a zero coefficient dropping its input (0 * -inf would be NaN). A -inf from
    either side wins: a positive coefficient on a -inf logit (that outcome has no mass: p^alpha
    q^(1-alpha) = 0 at p = 0 whatever q) beats the +inf of a negative one."""
    x = (ca * a if ca else torch.zeros_like(a))
    y = (cb * b if cb else torch.zeros_like(b))
    return torch.where((x == -math.inf) | (y == -math.inf), -math.inf, x + y)


class LseCombinationFunction(torch.autograd.Function):
    """Per-row sum_k w_k lse(ca_k a + cb_k b) of (N, V) logits; the gradient is computed in the
    forward and scaled per row in the backward (in place when ``inplace``: the graph can then be
    backpropagated once)."""

    @staticmethod
    def forward(ctx, student, teacher, valid, coeffs, inv_t, transforms, backend, inplace,
                grad_enabled):
        grad_s = grad_enabled and ctx.needs_input_grad[0]
        grad_t = grad_enabled and ctx.needs_input_grad[1]
        op = getattr(torch.ops.fdiv, f"lse_combination_fwd_{backend}")
        loss, gs, gt = op(student, teacher, valid, list(coeffs), inv_t, *transforms, grad_s,
                          grad_t)
        keep_grads(ctx, gs, gt, grad_s, grad_t, inplace)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        what = f"fdiv_kernels.divergence(kind={ROW_KIND_NAMES})"
        return *scaled_grads(ctx, grad_loss, what), *([None] * 7)


def row_kind_rows(
    kind: str, param: float, s: Tensor, t: Tensor, keep: Tensor, inv_t: float, backend: str,
    inplace: bool, *, transforms: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 0.0),
) -> Tensor:
    """Per-row loss of a row kind on 2-D logits (``fk.divergence`` has validated them), with
    autograd. ``backend`` names the resolved backend of ``fdiv::lse_combination_fwd``.
    """
    transforms = tuple(float(v) for v in transforms)

    def lse_rows(coeffs):
        return LseCombinationFunction.apply(s, t, keep, coeffs, inv_t, transforms, backend,
                                            inplace, torch.is_grad_enabled())

    if kind == CAUCHY_SCHWARZ:
        return lse_rows(CAUCHY_SCHWARZ_COEFFS)
    if kind == RENYI:
        return lse_rows(renyi_coeffs(param))
    raise ValueError(f"not a row kind: {kind!r}")


__all__ = ["LseCombinationFunction", "row_kind_rows"]
