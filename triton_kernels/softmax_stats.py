"""Softmax statistics of rows in one pass: log-sum-exp, entropy, the label's log-probability.

Forward (one read of the row): online (max, sum[, weighted sum]) -> lse = LSE(x/T),
H = -sum q log q, logprob = x[label]/T - lse. Backward (one read, one write), from the saved
per-row lse and H, for incoming gradients g_lse, g_H, g_lp:

    dx = (g_lse q - g_H q (a - lse + H) + g_lp (onehot(label) - q)) / T,   a = x/T, q = exp(a - lse)

With a logit transform (scale, softcap; ``logit_transform.py``) x is the transformed logit and dx
is chained through the transform's derivative; a CAP constexpr keeps the plain path unchanged.
"""

import torch
import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.logit_transform import (
    chain,
    load_logits,
    tanh,
    transform_scalars,
)
from fdiv_kernels.triton_kernels.online_softmax import (
    finalize_lse,
    online_update,
    online_update_weighted,
)

MAX_BLOCK = 8192  # 16-bit elements per loop iteration (half for fp32); tests lower it


@triton.jit
def _softmax_stats_fwd_kernel(
    # data ptrs
    x_ptr, labels_ptr, lse_ptr, ent_ptr, lp_ptr,
    # sizes and strides
    V, stride_x,
    # scalars (k1, c2: the transform's, see logit_transform.transform_scalars)
    ignore_index, k1, c2,
    # features
    ENTROPY: tl.constexpr, LABELS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        a, _ = load_logits(x_row, off + tl.arange(0, BLOCK), V, k1, c2, CAP)
        if ENTROPY:
            m, s, w = online_update_weighted(m, s, w, a)
        else:
            m, s = online_update(m, s, a)
    lse = finalize_lse(m, s)
    tl.store(lse_ptr + row, lse)
    if ENTROPY:
        tl.store(ent_ptr + row, tl.log(s) - w / s)
    if LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        kept = label != ignore_index
        # Python rejects out-of-range labels; never read outside the row regardless.
        in_range = (label >= 0) & (label < V)
        xl = tl.load(x_row + tl.where(in_range, label, 0)).to(tl.float32) * k1
        if CAP:
            xl = tanh(xl) * c2
        # (x - m) - log s, the max first (x - lse loses eps |lse|); +-inf max: the limits.
        finite = (m != float("inf")) & (m != float("-inf"))
        lp = tl.where(finite, (xl - tl.where(finite, m, 0.0)) - tl.log(s), xl - lse)
        lp = tl.where(in_range, lp, float("nan"))
        tl.store(lp_ptr + row, tl.where(kept, lp, 0.0))


@triton.jit
def _softmax_stats_bwd_kernel(
    # data ptrs
    x_ptr, labels_ptr, lse_ptr, ent_ptr, g_lse_ptr, g_ent_ptr, g_lp_ptr, dx_ptr,
    # sizes and strides
    V, stride_x, stride_dx,
    # scalars (k1, c2, kd: the transform's, see logit_transform.transform_scalars)
    ignore_index, k1, c2, kd,
    # features: which incoming gradients exist; a softcap
    G_LSE: tl.constexpr, G_ENT: tl.constexpr, G_LP: tl.constexpr, CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    lse = tl.load(lse_ptr + row)
    c_q = tl.load(g_lse_ptr + row) if G_LSE else 0.0  # coefficient of q
    if G_ENT:
        g_ent = tl.load(g_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    if G_LP:
        label = tl.load(labels_ptr + row).to(tl.int64)
        kept = label != ignore_index
        g_lp = tl.where(kept, tl.load(g_lp_ptr + row), 0.0)
        c_q -= g_lp
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        a, th = load_logits(x_row, cols, V, k1, c2, CAP)
        q = tl.exp(a - lse)
        g = c_q * q
        if G_ENT:
            g -= tl.where(q == 0, 0.0, g_ent * q * (a - lse + ent))
        if G_LP:
            g += tl.where(cols == label, g_lp, 0.0)
            if not G_LSE and not G_ENT:
                # Only the label's log-prob flows back: an ignored row is inert, zero gradient
                # even where its logits hold NaN (0 * q would be NaN).
                g = tl.where(kept, g, 0.0)
        g = chain(g, th, kd, CAP)  # d/d(z / T) -> d/dx
        tl.store(dx_row + cols, g.to(dx_ptr.dtype.element_ty), mask=cols < V)


def _block(V: int, dtype: torch.dtype) -> tuple[int, int]:
    cap = MAX_BLOCK // 2 if dtype.itemsize >= 4 else MAX_BLOCK
    block = min(triton.next_power_of_2(V), cap)
    return block, max(1, min(16, block // 512))


def softmax_stats_fwd(x, labels, ignore_index, inv_temperature, scale, softcap, entropy):
    """(lse, entropy | [0], label logprob | [0]) for (N, V) contiguous x, all float32."""
    N, V = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    lse = torch.empty(N, **f32)
    ent = torch.empty(N if entropy else 0, **f32)
    lp = torch.empty(N if labels is not None else 0, **f32)
    if N == 0:  # an empty batch: nothing to launch
        return lse, ent, lp
    block, warps = _block(V, x.dtype)
    _softmax_stats_fwd_kernel[(N,)](
        x, labels if labels is not None else lse, lse, ent if entropy else lse,
        lp if labels is not None else lse,
        V, x.stride(0), int(ignore_index),
        *transform_scalars(float(scale), float(softcap), float(inv_temperature))[:2],
        ENTROPY=bool(entropy), LABELS=labels is not None, CAP=bool(softcap), BLOCK=block,
        num_warps=warps,
    )
    return lse, ent, lp


def softmax_stats_bwd(x, labels, lse, ent, g_lse, g_ent, g_lp, ignore_index, inv_temperature,
                      scale, softcap):
    """dx for (N, V) contiguous x from the saved lse / entropy and the incoming row gradients."""
    N, V = x.shape
    dx = torch.empty_like(x)
    if N == 0:
        return dx
    block, warps = _block(V, x.dtype)
    _softmax_stats_bwd_kernel[(N,)](
        x, labels if labels is not None else lse, lse, ent if g_ent is not None else lse,
        g_lse if g_lse is not None else lse, g_ent if g_ent is not None else lse,
        g_lp if g_lp is not None else lse, dx,
        V, x.stride(0), dx.stride(0), int(ignore_index),
        *transform_scalars(float(scale), float(softcap), float(inv_temperature)),
        G_LSE=g_lse is not None, G_ENT=g_ent is not None, G_LP=g_lp is not None,
        CAP=bool(softcap), BLOCK=block, num_warps=warps,
    )
    return dx


def launch_variants(widths=(1000, 128256, 262144),
                    dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Every launch of the forward (entropy x labels) and backward (which incoming gradients)
    launchers per dtype and row width, as (labels, call) on one-row CPU inputs: see
    ``divergence.launch_variants``."""
    for V in widths:
        for dt in dtypes:
            for entropy in (True, False):
                for has_labels in (True, False):
                    def fwd(V=V, dt=dt, entropy=entropy, has_labels=has_labels):
                        labels = torch.zeros(1, dtype=torch.int64) if has_labels else None
                        softmax_stats_fwd(torch.randn(1, V, dtype=dt), labels, -100, 1.0, 1.0,
                                          0.0, entropy)
                    yield {"dtype": str(dt).removeprefix("torch."), "V": V, "entropy": entropy,
                           "labels": has_labels}, fwd
            for g_lse, g_ent, g_lp in [(a, b, c) for a in (1, 0) for b in (1, 0) for c in (1, 0)
                                       if a or b or c]:
                def bwd(V=V, dt=dt, g_lse=g_lse, g_ent=g_ent, g_lp=g_lp):
                    row = torch.zeros(1)
                    labels = torch.zeros(1, dtype=torch.int64) if g_lp else None
                    softmax_stats_bwd(torch.randn(1, V, dtype=dt), labels, row, row,
                                      row if g_lse else None, row if g_ent else None,
                                      row if g_lp else None, -100, 1.0, 1.0, 0.0)
                yield {"dtype": str(dt).removeprefix("torch."), "V": V,
                       "grads": "+".join(n for n, on in (("lse", g_lse), ("entropy", g_ent),
                                                         ("logprob", g_lp)) if on)}, bwd
    # Softcapped variants (CAP constexpr): forward with everything, backward with every gradient.
    for dt in dtypes:
        def fwd_cap(dt=dt, V=widths[0]):
            softmax_stats_fwd(torch.randn(1, V, dtype=dt), torch.zeros(1, dtype=torch.int64),
                              -100, 1.0, 0.0625, 30.0, True)

        def bwd_cap(dt=dt, V=widths[0]):
            row = torch.zeros(1)
            softmax_stats_bwd(torch.randn(1, V, dtype=dt), torch.zeros(1, dtype=torch.int64), row,
                              row, row, row, row, -100, 1.0, 0.0625, 30.0)
        label = {"dtype": str(dt).removeprefix("torch."), "V": widths[0], "softcap": 30.0}
        yield {**label, "entropy": True, "labels": True}, fwd_cap
        yield {**label, "grads": "lse+entropy+logprob"}, bwd_cap
