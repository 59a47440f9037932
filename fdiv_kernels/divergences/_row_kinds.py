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

Renyi of order alpha > 0, D = log S / (alpha - 1), S = sum p^alpha q^(1-alpha), two routes:

* From the Amari alpha kind's rows A = (1 - S) / (alpha (1 - alpha)) (the existing divergence op,
  every backend): D = log1p(-alpha (1 - alpha) A) / (alpha - 1), autograd giving the per-row scale
  dD/dA = alpha / S. Exact near alpha = 1 (A has the alpha kernels' relative accuracy, expm1 form;
  alpha = 1 folds into KL) and for alpha > 1 (S >= 1, no cancellation). Its weak spot: alpha < 1
  with S << 1 (large D), where S = 1 - x inherits A's absolute error (error ~ eps / S; disjoint
  supports would give a large finite number instead of +inf).
* From log-sum-exps: log S = lse((1-alpha) a + alpha b) - (1-alpha) lse(a) - alpha lse(b), i.e.
  terms (1-alpha, alpha, 1/(alpha-1)), (1, 0, 1), (0, 1, alpha/(1-alpha)): log S to a few eps
  absolute whatever S (disjoint: -inf, D = +inf), but the cancellation makes it useless near
  alpha = 1, where log S ~ (alpha - 1) KL.

Each row takes the alpha route where S >= 1/2 (every alpha > 1) and the log-sum-exp route where
S < 1/2 (alpha < 1 only), where it is accurate to ~1e-6 relative (D >= log 2 / (1 - alpha));
measured against float64, both routes stay within ~2e-7 relative (fp32 logits, alpha = 0.3,
1 -+ 1e-4, 2; S down to 0.009). The price for alpha < 1: both ops run on every row (the route
is chosen per row without a host sync), so twice the passes and two (N, V) gradient buffers per
input until the backward; alpha > 1 runs the alpha op only.
alpha <= 0 is rejected (``_kinds``): alpha's alpha = 0 folds into reverse KL, which is not Renyi's
alpha -> 0 limit (-log q(supp p)).
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
    """The log-sum-exp route of Renyi (alpha < 1): log S / (alpha - 1) as three terms."""
    return (1.0 - alpha, alpha, 1.0 / (alpha - 1.0), 1.0, 0.0, 1.0, 0.0, 1.0, alpha / (1.0 - alpha))


# S below which a row takes the log-sum-exp route.
RENYI_SWITCH = 0.5


def renyi_rows(alpha_rows: Tensor, alpha: float, lse_rows: Tensor | None) -> Tensor:
    """Renyi rows from the alpha kind's rows A and, for alpha < 1, the log-sum-exp route's rows.

    Differentiable: autograd scales A's gradient by alpha / S where the alpha route is taken,
    and passes the log-sum-exp route's own gradient elsewhere. Rows with A = 0 (ignored rows,
    identical inputs) give 0.
    """
    wide = torch.promote_types(alpha_rows.dtype, torch.float64)
    x = alpha_rows.to(wide) * (alpha * (1.0 - alpha))  # 1 - S
    if lse_rows is None:
        return (torch.log1p(-x) / (alpha - 1.0)).to(alpha_rows.dtype)
    use_lse = x > 1.0 - RENYI_SWITCH
    # The unused branch is fed a harmless value: its gradient (0 from where) must not meet
    # log1p's infinite slope at S = 0 (0 * inf = NaN).
    from_alpha = torch.log1p(-torch.where(use_lse, torch.zeros_like(x), x)) / (alpha - 1.0)
    return torch.where(use_lse, lse_rows.to(wide), from_alpha).to(alpha_rows.dtype)


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
    inplace: bool, alpha_rows: Tensor | None = None, *,
    transforms: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 0.0),
) -> Tensor:
    """Per-row loss of a row kind on 2-D logits (``fk.divergence`` has validated them), with
    autograd. ``ops``: the record of the backend selected for ``lse_combination_fwd``;
    ``alpha_rows``: for renyi, the alpha kind's rows (the divergence op's output) at ``param``.
    """
    transforms = tuple(float(v) for v in transforms)

    def lse_rows(coeffs):
        return LseCombinationFunction.apply(s, t, keep, coeffs, inv_t, transforms, ops,
                                            inplace, torch.is_grad_enabled())

    if kind == CAUCHY_SCHWARZ:
        return lse_rows(CAUCHY_SCHWARZ_COEFFS)
    if kind == RENYI:
        return renyi_rows(alpha_rows, param, lse_rows(renyi_coeffs(param)) if param < 1 else None)
    raise ValueError(f"not a row kind: {kind!r}")


__all__ = ["LseCombinationFunction", "renyi_rows", "row_kind_rows"]
