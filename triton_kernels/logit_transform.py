"""The per-model logit transforms fused into the row kernels (Gemma-2/3 softcapping, Cohere's
logit scale): z = c tanh(x scale / c) with a softcap c > 0, else z = x scale; then z / T.

A kernel gets, per side, a constexpr CAP and three scalars (see ``transform_scalars``):
  k1: what x is multiplied by first (scale / c under a cap, else scale / T: the no-cap path is the
      plain temperature multiply it always was, so an identity transform costs nothing);
  c2: c / T, the factor after tanh (unused without a cap);
  kd: scale / T, so that d(z / T)/dx = kd (1 - tanh^2) under a cap, kd without.
"""

import triton
import triton.language as tl


def transform_scalars(scale: float, softcap: float, inv_t: float) -> tuple[float, float, float]:
    """(k1, c2, kd) of one side; softcap 0 means none."""
    if softcap:
        return scale / softcap, softcap * inv_t, scale * inv_t
    return scale * inv_t, 0.0, scale * inv_t


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0: Taylor (degree 9, below fp32 epsilon) for
    # |x| < 1/2, exp(x) - 1 beyond where nothing cancels. Triton's core has no expm1.
    p = 1.0 + x * (1.0 / 9.0)
    p = 1.0 + x * p * (1.0 / 8.0)
    p = 1.0 + x * p * (1.0 / 7.0)
    p = 1.0 + x * p * (1.0 / 6.0)
    p = 1.0 + x * p * (1.0 / 5.0)
    p = 1.0 + x * p * (1.0 / 4.0)
    p = 1.0 + x * p * (1.0 / 3.0)
    p = 1.0 + x * p * (1.0 / 2.0)
    return tl.where((x < 0.5) & (x > -0.5), x * p, tl.exp(x) - 1.0)


@triton.jit
def tanh(y):
    """tanh, accurate near 0: tanh|y| = -u / (2 + u), u = expm1(-2|y|); +-inf give +-1."""
    u = _expm1(-2.0 * tl.abs(y))
    t = -u / (2.0 + u)
    return tl.where(y < 0, -t, t)


@triton.jit
def transform(x, k1, c2, CAP: tl.constexpr):
    """(z / T, tanh) of logits x already loaded (float32); a -inf logit becomes the finite -c / T
    under a cap. Without a cap the second value is unused."""
    if CAP:
        th = tanh(x * k1)
        return th * c2, th
    else:
        return x * k1, x


@triton.jit
def load_logits(ptr, cols, V, k1, c2, CAP: tl.constexpr):
    """(z / T, tanh) of the row's columns ``cols``; -inf past the row (also under a cap, whose
    tanh would make the padding finite). Without a cap the second value is unused."""
    in_row = cols < V
    x = tl.load(ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    a, th = transform(x, k1, c2, CAP)
    if CAP:
        a = tl.where(in_row, a, float("-inf"))
    return a, th


@triton.jit
def chain(g, th, kd, CAP: tl.constexpr):
    """d loss / dx from d loss / d(z / T): times kd (1 - tanh^2) under a cap, kd without."""
    if CAP:
        return g * (kd * tl.maximum(1.0 - th * th, 0.0))
    else:
        return g * kd
