"""Online-softmax building blocks shared by every row kernel (divergences, log-sum-exp, entropy).

A row longer than one block is reduced with a running max ``m`` and a running sum
``s = sum exp(x - m)``, rescaled whenever the max grows (Milakov & Gimelshein, 2018), so one read
of the row gives its log-sum-exp.
"""

import triton
import triton.language as tl


@triton.jit
def online_update(m, s, x):
    """Fold block ``x`` (masked entries = -inf) into the running (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    # While every entry seen is -inf, shift by 0 so exp() sees -inf and gives 0 rather than NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
    return m_new, s


@triton.jit
def online_update_weighted(m, s, w, x):
    """Also keep ``w = sum exp(x - m) (x - m)``, rescaled with the max, for the entropy.

    Shifted by the running max so that entropy = log s - w / s never subtracts two large numbers.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    e = tl.exp(x - shift)
    # s > 0 implies m is finite; otherwise nothing was accumulated yet.
    moved = tl.where(s > 0, (m - shift) * s, 0.0)
    w = scale * (w + moved) + tl.sum(tl.where(e == 0, 0.0, e * (x - shift)), 0)
    s = s * scale + tl.sum(e, 0)
    return m_new, s, w


@triton.jit
def finalize_lse(m, s):
    """log-sum-exp from (max, sum): -inf for an all -inf row, +inf if any entry is +inf."""
    return tl.where(m == float("inf"), m, m + tl.log(s))


@triton.jit
def logsumexp_of_row(ptr, V, scale, BLOCK: tl.constexpr):
    """log-sum-exp of ``scale * row`` for the contiguous row at ``ptr``, in one pass."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
        m, s = online_update(m, s, x)
    return finalize_lse(m, s)
