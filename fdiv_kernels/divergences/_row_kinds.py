"""The kinds that are functions of a few per-row sums, not sums of element terms: Renyi and
Cauchy-Schwarz (``ROW_DIVERGENCES`` in ``fdiv_kernels.kinds._registry``), as ``fk.divergence``
runs them.

Both are written with one row op, ``fdiv::lse_combination_fwd_<backend>`` (csrc/cpu/
lse_combination.cpp, triton_kernels/lse_combination.py, the torch backend's statement):
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


import torch
from torch import Tensor

from fdiv_kernels.core._grads import keep_grads, scaled_grads
from fdiv_kernels.core._ops import SoftmaxOps

RENYI = "renyi"
CAUCHY_SCHWARZ = "cauchy_schwarz"
ROW_KIND_NAMES = f"{RENYI!r} / {CAUCHY_SCHWARZ!r}"


# Terms (ca, cb, w) of the row op.
CAUCHY_SCHWARZ_COEFFS = (2.0, 0.0, 0.5, 0.0, 2.0, 0.5, 1.0, 1.0, -1.0)


def renyi_coeffs(alpha: float) -> tuple[float, ...]:
    """Renyi of order alpha != 1: log S / (alpha - 1) as three terms of the row op."""
    return (1.0 - alpha, alpha, 1.0 / (alpha - 1.0), 1.0, 0.0, 1.0, 0.0, 1.0, alpha / (1.0 - alpha))




class LseCombinationFunction(torch.autograd.Function):
    """Per-row sum_k w_k lse(ca_k a + cb_k b) of (N, V) logits; the gradient is computed in the
    forward and scaled per row in the backward (in place when ``inplace``: the graph can then be
    backpropagated once)."""

    @staticmethod
    def forward(ctx, student, teacher, valid, coeffs, inv_t, transforms, ops, inplace,
                grad_enabled):
        grad_s = grad_enabled and ctx.needs_input_grad[0]
        grad_t = grad_enabled and ctx.needs_input_grad[1]
        loss, gs, gt = ops.lse_combination_fwd(student, teacher, valid, list(coeffs), inv_t,
                                               *transforms, grad_s, grad_t)
        keep_grads(ctx, gs, gt, grad_s, grad_t, inplace)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        what = f"fdiv_kernels.divergence(kind={ROW_KIND_NAMES})"
        return *scaled_grads(ctx, grad_loss, what), *([None] * 7)


def row_kind_rows(
    kind: str, param: float, s: Tensor, t: Tensor, keep: Tensor, inv_t: float, ops: SoftmaxOps,
    inplace: bool, *, transforms: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 0.0),
) -> Tensor:
    """Per-row loss of a row kind on 2-D logits (``fk.divergence`` has validated them), with
    autograd. ``ops``: the record of the backend selected for ``lse_combination_fwd``.
    """
    transforms = tuple(float(v) for v in transforms)

    def lse_rows(coeffs):
        return LseCombinationFunction.apply(s, t, keep, coeffs, inv_t, transforms, ops,
                                            inplace, torch.is_grad_enabled())

    if kind == CAUCHY_SCHWARZ:
        return lse_rows(CAUCHY_SCHWARZ_COEFFS)
    if kind == RENYI:
        return lse_rows(renyi_coeffs(param))
    raise ValueError(f"not a row kind: {kind!r}")


__all__ = ["LseCombinationFunction", "row_kind_rows"]
