"""Per-element divergence terms for the Triton kernels: the only Triton code that knows the math.

Every function returns (term, h, k) with h = d term / d log q and k = d term / d log p; the
statement in torch, with the same guards, is ``fdiv_kernels.kinds._terms``. Base ids are the
constexpr names of ``ids.py``.
"""

import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.ids import (ALPHA, CHI2, HELLINGER, JEFFREYS, JS, KL, SKEW_KL,
                                             SOFT_CE, TV)

# A constexpr: Triton's compiler rejects any other global inside @triton.jit code.
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


@triton.jit
def _nz(x, value):
    # value where x != 0, else 0: the 0 log 0 = 0 convention (a NaN x stays NaN).
    return tl.where(x == 0, 0.0, value)


@triton.jit
def _xlogy_ratio(x, lx, ly):
    return _nz(x, x * (lx - ly))


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0 (Triton has no expm1 on every target): a degree-9
    # Taylor polynomial for |x| < 1/2 (relative error < 6e-10), exp(x) - 1 beyond (no
    # cancellation there: <= 2.6 ulp). exp's +-inf and NaN pass through the second branch.
    p = 1.0 + x * (1.0 / 9.0)
    p = 1.0 + x * (1.0 / 8.0) * p
    p = 1.0 + x * (1.0 / 7.0) * p
    p = 1.0 + x * (1.0 / 6.0) * p
    p = 1.0 + x * (1.0 / 5.0) * p
    p = 1.0 + x * (1.0 / 4.0) * p
    p = 1.0 + x * (1.0 / 3.0) * p
    p = 1.0 + x * 0.5 * p
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)


@triton.jit
def _log_mix(lp, lq, log_w, log_1mw):
    # log(w p + (1-w) q) in log space, -inf (not NaN) when both are 0.
    x = lp + log_w
    y = lq + log_1mw
    mx = tl.maximum(x, y)
    safe = tl.where(mx == NEG_INF, 0.0, mx)
    return tl.where(mx == NEG_INF, NEG_INF, safe + tl.log(tl.exp(x - safe) + tl.exp(y - safe)))


@triton.jit
def _base_terms(lp, lq, param, log_w, log_1mw, BASE: tl.constexpr):
    p = tl.exp(lp)
    q = tl.exp(lq)
    if BASE == KL:  # KL(p||q)
        t = _xlogy_ratio(p, lp, lq)
        h = -p
        k = _nz(p, t + p)
    elif BASE == JS:  # generalized JS
        lm = _log_mix(lp, lq, log_w, log_1mw)
        k = param * _xlogy_ratio(p, lp, lm)
        h = (1.0 - param) * _xlogy_ratio(q, lq, lm)
        t = h + k
    elif BASE == TV:  # total variation
        sgn = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
        t = 0.5 * tl.abs(p - q)
        h = 0.5 * sgn * q
        k = -0.5 * sgn * p
    elif BASE == HELLINGER:  # squared Hellinger
        g = tl.exp(0.5 * (lp + lq))
        t = 0.5 * (p + q) - g
        h = 0.5 * (q - g)
        k = 0.5 * (p - g)
    elif BASE == CHI2:  # Pearson chi^2
        r = _nz(p, tl.exp(2.0 * lp - lq))
        t = r - 2.0 * p + q
        h = q - r
        k = 2.0 * (r - p)
    elif BASE == ALPHA:  # Amari alpha, in the expm1 form of _kinds._terms (accurate near 0 and 1)
        d = lp - lq
        x = param * d
        y = (param - 1.0) * d
        # past 80, v expm1(x) = e^(lv + x) - v: e^x alone overflows fp32 where q e^x need not
        h = _nz(q, -tl.where(x > 80.0, tl.exp(lq + x) - q, q * _expm1(x))) / param
        k = _nz(p, -tl.where(y > 80.0, tl.exp(lp + y) - p, p * _expm1(y))) / (1.0 - param)
        t = tl.where(param >= 0.5, (q - p + k) / param, (p - q + h) / (1.0 - param))
    elif BASE == SKEW_KL:  # skew KL: KL(p || lam p + (1-lam) q)
        lm = _log_mix(lp, lq, log_w, log_1mw)
        t = _xlogy_ratio(p, lp, lm)
        pr = _nz(p, p * tl.exp(log_1mw + lq - lm))
        h = -pr
        k = _nz(p, t + pr)
    elif BASE == SOFT_CE:  # cross-entropy to the teacher, -sum p log q
        t = _nz(p, -p * lq)
        h = -p
        k = t
    else:  # Jeffreys: KL(p||q) + KL(q||p)
        # Any other id (a custom kind of fk.register_divergence, ids from 1024) fails to compile
        # here rather than computing Jeffreys: custom kinds go through custom_terms (kind_terms
        # with F / F_PRIME given); the dispatch refuses them on kernels that do not pass those.
        tl.static_assert(BASE == JEFFREYS, "unknown divergence base id: custom kinds "
                                           "(fk.register_divergence) need F / F_PRIME")
        d = lq - lp
        t = _xlogy_ratio(p, lp, lq) + _xlogy_ratio(q, lq, lp)
        h = _nz(q, q * d) + q - p
        k = _nz(p, -p * d) + p - q
    return t, h, k


@triton.jit
def element_terms(lp, lq, param, log_w, log_1mw, BASE: tl.constexpr, SWAP: tl.constexpr):
    """(term, d/d log q, d/d log p); SWAP evaluates the base kind with p and q exchanged."""
    if SWAP:
        t, k, h = _base_terms(lq, lp, param, log_w, log_1mw, BASE)
    else:
        t, h, k = _base_terms(lp, lq, param, log_w, log_1mw, BASE)
    return t, h, k


@triton.jit
def custom_terms(lp, lq, F: tl.constexpr, F_PRIME: tl.constexpr):
    """(term, h, k) of D_f = sum q f(p / q) from the user's generator F and its derivative F_PRIME
    (``@triton.jit`` functions of one fp32 block, passed as constexprs: the kernel is compiled
    once per pair), with the zero conventions of ``fdiv_kernels.kinds._custom.custom_terms``:
    p = 0 < q: term = h = q f(0), k = 0; q = 0 < p: term = k = p f'(inf), h = 0; p = q = 0: 0.

    In fp32, unlike the torch path (float64): r = p / q, f(r) or r f'(r) overflow once q is
    ~e^-44 (chi^2: r^2) to e^-88 times p, where q f(r) is still finite and q (f(r) - r f'(r))
    would be inf - inf. Such an element (r > 1) takes the q = 0 limit instead (term = k =
    p f'(inf), h = 0), never NaN: +inf for unbounded f', where the float64 torch path gives a
    finite but huge term (chi^2: p^2 / q >= ~1e19); the accurate limit for bounded f'."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    p0 = p == 0
    q0 = q == 0
    # r where both are positive; placeholders elsewhere (their results are replaced below).
    r = tl.exp(tl.where(p0 | q0, 0.0, lp - lq))
    r = tl.where(p0 & (q > 0), 0.0, r)  # p = 0 < q: r = 0, f(0) is the user's limit
    fr = F(r).to(tl.float32)
    fpr = F_PRIME(r).to(tl.float32)
    # f'(inf) on a block of +inf: the user's function is only promised to be elementwise.
    fp_inf = F_PRIME(tl.zeros_like(lp) + POS_INF).to(tl.float32)
    r_fpr = tl.where(r == 0, 0.0, r * fpr)  # r f'(r) -> 0 as r -> 0 (t log t: f'(0) = -inf)
    over = (r > 1.0) & ((tl.abs(fr) == POS_INF) | (tl.abs(r_fpr) == POS_INF))
    qlim = q0 | over
    t = tl.where(qlim, tl.where(p0, 0.0, p * fp_inf), q * fr)
    h = tl.where(qlim, 0.0, q * (fr - r_fpr))
    k = tl.where(p0, 0.0, tl.where(qlim, p * fp_inf, p * fpr))
    return t, h, k


@triton.jit
def kind_terms(lp, lq, param, log_w, log_1mw, BASE: tl.constexpr, SWAP: tl.constexpr,
               F: tl.constexpr, F_PRIME: tl.constexpr):
    """``element_terms``, or the custom kind's ``custom_terms`` when its generator F is given."""
    if F is not None:
        if SWAP:
            t, k, h = custom_terms(lq, lp, F, F_PRIME)
        else:
            t, h, k = custom_terms(lp, lq, F, F_PRIME)
    else:
        t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
    return t, h, k
