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
    # Once the max is +inf, s counts the +inf entries (exp(0) each, the rest 0) instead of
    # turning NaN through inf - inf: then only a NaN entry makes s, and the lse, NaN.
    big = m_new == float("inf")
    shift = tl.where((m_new == float("-inf")) | big, 0.0, m_new)
    xs = tl.where(big, tl.where(x == float("inf"), 0.0, tl.where(x == x, float("-inf"), x)),
                  x - shift)
    ms = tl.where(big, tl.where(m == float("inf"), 0.0, float("-inf")), m - shift)
    s = s * tl.exp(ms) + tl.sum(tl.exp(xs), 0)
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
    """log-sum-exp from (max, sum): -inf for an all -inf row, +inf if any entry is +inf (NaN if
    any is NaN, as torch.logsumexp): at m = +inf, s counts the +inf entries or is NaN."""
    return m + tl.log(s)


@triton.jit
def row_max_logsum(ptr, V, scale, BLOCK: tl.constexpr):
    """(m, log s) of ``scale * row`` at ``ptr``, one pass: m the row max, s = sum exp(x - m).

    Log-probabilities formed as (x - m) - log s stay exact to fp32 rounding of the small terms,
    however large |x| is; x - (m + log s) would lose eps |lse| (1e-3 at |x/T| ~ 1e4).
    """
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
        m, s = online_update(m, s, x)
    return m, tl.log(s)


@triton.jit
def logsumexp_of_row(ptr, V, scale, BLOCK: tl.constexpr):
    """log-sum-exp of ``scale * row`` for the contiguous row at ``ptr``, in one pass."""
    m, log_s = row_max_logsum(ptr, V, scale, BLOCK)
    return m + log_s
