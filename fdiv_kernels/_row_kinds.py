"""The kinds that are functions of a few per-row sums, not sums of element terms: Renyi and
Cauchy-Schwarz (``ROW_DIVERGENCES`` in ``fdiv_kernels._kinds``), as ``fk.divergence`` runs them.

Renyi of order alpha > 0, from the Amari alpha kind's row loss A = (1 - S) / (alpha (1 - alpha)),
S = sum p^alpha q^(1-alpha)::

    D_alpha = log S / (alpha - 1) = log1p(-alpha (1 - alpha) A) / (alpha - 1).

Design: an exact per-row function of the existing ``alpha`` rows, so every backend (and every
kernel already tested for alpha near 0 and 1) runs it with no kernel of its own, and autograd
gives the per-row gradient scale dD/dA = alpha / S, which the alpha op's in-place row scale
applies. Accuracy: A carries the alpha kernels' relative accuracy (expm1 form, no cancellation
near alpha = 1), x = alpha (1 - alpha) A is then as accurate, and log1p(-x) / (alpha - 1) adds only
rounding -- near alpha = 1 +- 1e-4 the result is as accurate as A, and alpha = 1 folds into KL
exactly. For alpha > 1, S >= 1 (x <= 0): no cancellation. For alpha < 1 the one weak spot is a
nearly disjoint pair (S << 1, D large): S = 1 - x inherits A's absolute error, so D's error grows
like eps / S (1e-7 / S in fp32; D is then ~ -log S / (1 - alpha), large). Disjoint supports give
S = 0 and D = +inf (x is clamped at 1 so rounding never gives log1p(< -1) = NaN). alpha <= 0 is
rejected (``_kinds``): alpha's alpha = 0 folds into reverse KL, which is not Renyi's alpha -> 0.

Cauchy-Schwarz: D_CS = -log sum p q + 1/2 log sum p^2 + 1/2 log sum q^2. With a = student / T,
b = teacher / T, the log-partition functions cancel and only three log-sum-exps remain::

    D_CS = 1/2 lse(2a) + 1/2 lse(2b) - lse(a + b),
    dD/da = softmax(2a) - softmax(a + b),   dD/db = softmax(2b) - softmax(a + b),

one pass for the three sums and one for the gradients: a row kernel per backend
(``fdiv::cauchy_schwarz_fwd_<backend>``: csrc/cpu/cauchy_schwarz.cpp,
triton_kernels/cauchy_schwarz.py, and ``cauchy_schwarz_fwd_torch`` below), whose gradient is
computed in the forward and scaled per row in the backward like ``DivergenceFunction``'s. The
sums are accumulated in float64 where the backend allows (the CPU, the torch backend): D_CS -> 0
as p -> q, where the three terms cancel; identical inputs give exactly 0. Disjoint supports:
lse(a + b) = -inf, D = +inf, and the softmax(a + b) part of the gradient is left out (never NaN).
The logit transforms (scale, softcap, as ``fk.divergence`` applies them) are fused in the kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels.backends.common import loss_dtype

RENYI = "renyi"
CAUCHY_SCHWARZ = "cauchy_schwarz"


def renyi_from_alpha_rows(alpha_rows: Tensor, alpha: float) -> Tensor:
    """Renyi rows log S / (alpha - 1) from the alpha kind's rows A = (1 - S) / (alpha (1-alpha)).

    Differentiable (autograd scales A's gradient by alpha / S). Rows with A = 0 (ignored rows,
    identical inputs) give 0.
    """
    wide = torch.promote_types(alpha_rows.dtype, torch.float64)
    x = alpha_rows.to(wide) * (alpha * (1.0 - alpha))  # 1 - S
    if alpha < 1.0:
        x = x.clamp(max=1.0)  # S >= 0: A's rounding must not push S below 0 (log1p(< -1) = NaN)
    return (torch.log1p(-x) / (alpha - 1.0)).to(alpha_rows.dtype)


# ---- Cauchy-Schwarz -----------------------------------------------------------------------------


def transform_logits(z: Tensor, scale: float, softcap: float, inv_t: float) -> tuple[Tensor, Tensor]:
    """(a, da/dz): z * scale, then softcap * tanh(. / softcap) when softcap > 0, then / T."""
    z = z * scale
    if softcap > 0:
        th = torch.tanh(z / softcap)
        return softcap * th * inv_t, (scale * inv_t) * (1.0 - th * th)
    return z * inv_t, torch.full_like(z, scale * inv_t)


def _softmax_or_zero(x: Tensor, lse: Tensor) -> Tensor:
    """exp(x - lse) row-wise; 0 on rows whose lse is -inf (no mass: nothing to differentiate)."""
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    return torch.where((lse == -math.inf)[:, None], torch.zeros_like(x), torch.exp(x - safe[:, None]))


def cauchy_schwarz_rows_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, inv_temperature: float,
    student_scale: float, student_softcap: float, teacher_scale: float, teacher_softcap: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The torch statement of ``fdiv::cauchy_schwarz_fwd_<backend>`` (float64 sums)."""
    from fdiv_kernels.backends.torch_ref import _chunks, _zero_where

    ctype = loss_dtype(student.dtype)
    wide = torch.promote_types(ctype, torch.float64)
    N, V = student.shape
    loss = student.new_empty(N, dtype=ctype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    for rows in _chunks(N, V):
        a, da = transform_logits(student[rows].to(wide), student_scale, student_softcap,
                                 inv_temperature)
        b, db = transform_logits(teacher[rows].to(wide), teacher_scale, teacher_softcap,
                                 inv_temperature)
        l2a, l2b = torch.logsumexp(2 * a, -1), torch.logsumexp(2 * b, -1)
        ab = a + b
        lab = torch.logsumexp(ab, -1)
        keep = valid[rows]
        loss[rows] = _zero_where(keep, (0.5 * l2a + 0.5 * l2b - lab).to(ctype))
        mix = _softmax_or_zero(ab, lab) if grad_student or grad_teacher else None
        if grad_student:
            gs[rows] = _zero_where(keep, (_softmax_or_zero(2 * a, l2a) - mix) * da)
        if grad_teacher:
            gt[rows] = _zero_where(keep, (_softmax_or_zero(2 * b, l2b) - mix) * db)
    return loss, gs, gt


class CauchySchwarzFunction(torch.autograd.Function):
    """Per-row D_CS of (N, V) logits; the gradient is computed in the forward and scaled per row
    in the backward (in place when ``inplace``: the graph can then be backpropagated once)."""

    @staticmethod
    def forward(ctx, student, teacher, valid, inv_t, transforms, backend, inplace, grad_enabled):
        grad_s = grad_enabled and ctx.needs_input_grad[0]
        grad_t = grad_enabled and ctx.needs_input_grad[1]
        op = getattr(torch.ops.fdiv, f"cauchy_schwarz_fwd_{backend}")
        loss, gs, gt = op(student, teacher, valid, inv_t, *transforms, grad_s, grad_t)
        ctx.save_for_backward(gs, gt)
        ctx.grad_s, ctx.grad_t = grad_s, grad_t
        ctx.inplace, ctx.used = inplace, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fdiv_kernels.divergence(kind='cauchy_schwarz') does not support higher-order "
                "gradients (backward with create_graph=True)"
            )
        if ctx.used:
            raise RuntimeError(
                "fdiv_kernels.divergence: backward ran twice through the same graph "
                "(retain_graph=True, gradcheck, jacobians); pass inplace_backward=False for that"
            )
        ctx.used = ctx.inplace
        gs, gt = ctx.saved_tensors
        if not ctx.inplace:
            gs, gt = gs.clone(), gt.clone()
        if ctx.grad_s:
            torch.ops.fdiv.scale_rows_(gs, grad_loss)
        if ctx.grad_t:
            torch.ops.fdiv.scale_rows_(gt, grad_loss)
        return (gs if ctx.grad_s else None), (gt if ctx.grad_t else None), *([None] * 6)


def cauchy_schwarz_rows(
    s: Tensor, t: Tensor, keep: Tensor, inv_t: float, backend: str, inplace: bool,
    *, student_scale: float = 1.0, student_softcap: float | None = None,
    teacher_scale: float = 1.0, teacher_softcap: float | None = None,
) -> Tensor:
    """Per-row D_CS of 2-D logits (``fk.divergence`` has validated them), with autograd.

    ``backend`` names the resolved backend of ``fdiv::cauchy_schwarz_fwd``.
    """
    transforms = (float(student_scale), float(student_softcap or 0.0),
                  float(teacher_scale), float(teacher_softcap or 0.0))
    return CauchySchwarzFunction.apply(s, t, keep, inv_t, transforms, backend, inplace,
                                       torch.is_grad_enabled())


__all__ = ["CauchySchwarzFunction", "cauchy_schwarz_rows", "renyi_from_alpha_rows"]
