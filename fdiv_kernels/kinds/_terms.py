"""The element terms in torch: the readable statement of what every kernel computes.

For each base kind, (term, h = d term / d lq, k = d term / d lp) elementwise over log-probabilities
(``fdiv_kernels.kinds._registry`` explains how a kernel turns them into a divergence and its
gradients); custom kinds evaluate the user's generator (``fdiv_kernels.kinds._custom``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels.core._ids import ALPHA, CHI2, HELLINGER, JEFFREYS, JS, KL, SKEW_KL, SOFT_CE, TV
from fdiv_kernels.kinds._custom import custom_terms
from fdiv_kernels.kinds._registry import CUSTOM_BASE, KernelSpec

def _times_expm1(lv: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """v expm1(x), with v = exp(lv), finite wherever the product is."""
    return torch.where(x > 80, torch.exp(lv + x) - v, v * torch.expm1(x))


def _nz(x: Tensor, value: Tensor) -> Tensor:
    """``value`` where x != 0, else 0: the 0 log 0 = 0 convention (a NaN x stays NaN)."""
    return torch.where(x == 0, torch.zeros_like(value), value)


def _xlogy_ratio(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """x * (lx - ly) with the 0 log 0 = 0 convention (x = 0 contributes nothing)."""
    return _nz(x, x * (lx - ly))


def _mix_log(w: float, la: Tensor, lb: Tensor) -> Tensor:
    """log(w a + (1-w) b) in log space: never NaN when both underflow."""
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _terms(base: int, param: float, lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if base >= CUSTOM_BASE:
        return custom_terms(base, lp, lq)
    p, q = lp.exp(), lq.exp()
    if base == KL:
        t = _xlogy_ratio(p, lp, lq)
        return t, -p, _nz(p, t + p)
    if base == JS:
        lm = _mix_log(param, lp, lq)
        tp = param * _xlogy_ratio(p, lp, lm)
        tq = (1.0 - param) * _xlogy_ratio(q, lq, lm)
        return tp + tq, tq, tp
    if base == TV:
        sgn = torch.sign(q - p)
        return 0.5 * (p - q).abs(), 0.5 * sgn * q, -0.5 * sgn * p
    if base == HELLINGER:
        g = torch.exp(0.5 * (lp + lq))
        return 0.5 * (p + q) - g, 0.5 * (q - g), 0.5 * (p - g)
    if base == CHI2:
        r = _nz(p, torch.exp(2.0 * lp - lq))  # p^2 / q, +inf where q = 0 < p
        return r - 2.0 * p + q, q - r, 2.0 * (r - p)
    if base == ALPHA:
        a, b = param, 1.0 - param
        # With w = p^a q^b = q e^(a d) = p e^(-b d), d = lp - lq: q - w = -q expm1(a d) and
        # p - w = -p expm1(-b d) have no cancellation, and expm1(a d) / a -> d as a -> 0, so h and
        # k move continuously into reverse / forward KL's. The loss (a p + b q - w) / (a b) is
        # regrouped as (q - p + k) / a (a >= 1/2) or (p - q + h) / b (a < 1/2): the q - p terms
        # sum to 0, divided by the larger of a, b; 1 - sum w / (a b) would cancel as 1 / (a b).
        # Past x = 80, v expm1(x) is e^(lv + x) - v: e^x alone overflows float32 at 88.7 while
        # q e^x (|a| large, q tiny) can be far inside the range.
        d = lp - lq
        h = _nz(q, -_times_expm1(lq, q, a * d)) / a
        k = _nz(p, -_times_expm1(lp, p, -b * d)) / b
        t = (q - p + k) / a if a >= 0.5 else (p - q + h) / b
        return t, h, k
    if base == SKEW_KL:
        lm = _mix_log(param, lp, lq)
        t = _xlogy_ratio(p, lp, lm)
        pr = _nz(p, p * torch.exp(math.log1p(-param) + lq - lm))
        return t, -pr, _nz(p, t + pr)
    if base == JEFFREYS:
        t = _xlogy_ratio(p, lp, lq) + _xlogy_ratio(q, lq, lp)
        d = lq - lp
        h = _nz(q, q * d) + q - p
        k = _nz(p, -p * d) + p - q
        return t, h, k
    if base == SOFT_CE:
        t = _nz(p, -p * lq)  # p = 0 adds nothing, even where lq = -inf
        return t, -p, t
    raise ValueError(f"unknown base divergence id {base}")


def element_terms(
    spec: KernelSpec, lp: Tensor, lq: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(term, d term/d lq, d term/d lp) for ``spec``, elementwise over log-probabilities."""
    if spec.swap:
        t, h, k = _terms(spec.base, spec.param, lq, lp)
        return t, k, h
    return _terms(spec.base, spec.param, lp, lq)
