"""Triton Cauchy-Schwarz divergence of softmax rows, with its logit gradients.

With a = student / T, b = teacher / T (after the optional logit transforms)::

    D_CS = 1/2 lse(2a) + 1/2 lse(2b) - lse(a + b)
    dD/da = softmax(2a) - softmax(a + b),   dD/db = softmax(2b) - softmax(a + b)

One program per row: one pass folds the three online log-sum-exps (``online_softmax``), one
writes the gradients. The running sums are float64 (per block the exps are float32): D_CS -> 0 as
p -> q, where the three terms cancel. The torch statement is ``fdiv_kernels._row_kinds``.

Transforms per input, in order (CAP = 0: none): z <- z * scale; z <- cap tanh(z / cap); a = z / T.
"""

import torch
import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.online_softmax import online_update

# Largest block per loop iteration (tests lower it to run the multi-block loop on small rows).
MAX_BLOCK = 4096


@triton.jit
def _tanh(u):
    # tanh without a libdevice call (the interpreter has none): sign(u) (1 - e) / (1 + e),
    # e = exp(-2|u|), with 1 - e = -expm1(-2|u|) by a short Taylor series where it would cancel.
    x = -2.0 * tl.abs(u)
    p = 1.0 + x * (1.0 / 7.0)
    p = 1.0 + x * (1.0 / 6.0) * p
    p = 1.0 + x * (1.0 / 5.0) * p
    p = 1.0 + x * (1.0 / 4.0) * p
    p = 1.0 + x * (1.0 / 3.0) * p
    p = 1.0 + x * 0.5 * p
    e = tl.exp(x)
    one_minus_e = tl.where(x > -0.25, -(x * p), 1.0 - e)
    t = one_minus_e / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _load(row, cols, V, scale, cap, inv_t, HAS_CAP: tl.constexpr):
    """(a, da/dz) of one block: the transformed logits (-inf past the row) and their slope."""
    z = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
    if HAS_CAP:
        th = _tanh(z / cap)
        a = tl.where(cols < V, cap * th * inv_t, float("-inf"))
        slope = scale * inv_t * (1.0 - th * th)
    else:
        a = tl.where(cols < V, z * inv_t, float("-inf"))
        slope = tl.zeros_like(z) + scale * inv_t
    return a, slope


@triton.jit
def _cauchy_schwarz_fwd_kernel(
    s_ptr, t_ptr, valid_ptr, loss_ptr, gs_ptr, gt_ptr,
    V, stride_s, stride_t, stride_gs, stride_gt,
    inv_t, s_scale, s_cap, t_scale, t_cap,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    if tl.load(valid_ptr + row) != 0:
        neg_inf = tl.full([], float("-inf"), tl.float32)
        m2a, m2b, mab = neg_inf, neg_inf, neg_inf
        s2a = tl.zeros([], tl.float64)
        s2b = tl.zeros([], tl.float64)
        sab = tl.zeros([], tl.float64)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            a, _ = _load(s_row, cols, V, s_scale, s_cap, inv_t, S_CAP)
            b, _ = _load(t_row, cols, V, t_scale, t_cap, inv_t, T_CAP)
            m2a, s2a = online_update(m2a, s2a, 2.0 * a)
            m2b, s2b = online_update(m2b, s2b, 2.0 * b)
            mab, sab = online_update(mab, sab, a + b)
        ls2a = tl.log(s2a)
        ls2b = tl.log(s2b)
        lsab = tl.log(sab)
        # The maxima carry the magnitudes and cancel first (exactly for identical rows); NaN
        # anywhere makes a sum NaN; disjoint supports: sab = 0, lsab = -inf, D = +inf.
        shifts = 0.5 * m2a.to(tl.float64) + 0.5 * m2b.to(tl.float64) - mab.to(tl.float64)
        shifts = tl.where(mab == float("-inf"), 0.0, shifts)
        loss = shifts + (0.5 * ls2a + 0.5 * ls2b - lsab)
        tl.store(loss_ptr + row, loss.to(tl.float32))
        if GRAD_S or GRAD_T:
            joint = sab > 0
            mab_safe = tl.where(joint, mab, 0.0)
            lsab_safe = tl.where(joint, lsab, 0.0).to(tl.float32)
            la = ls2a.to(tl.float32)
            lb = ls2b.to(tl.float32)
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                in_row = cols < V
                a, da = _load(s_row, cols, V, s_scale, s_cap, inv_t, S_CAP)
                b, db = _load(t_row, cols, V, t_scale, t_cap, inv_t, T_CAP)
                mix = tl.where(joint, tl.exp(((a + b) - mab_safe) - lsab_safe), 0.0)
                if GRAD_S:
                    g = (tl.exp((2.0 * a - m2a) - la) - mix) * da
                    tl.store(gs_row + cols, g.to(gs_row.dtype.element_ty), mask=in_row)
                if GRAD_T:
                    g = (tl.exp((2.0 * b - m2b) - lb) - mix) * db
                    tl.store(gt_row + cols, g.to(gt_row.dtype.element_ty), mask=in_row)
    else:
        tl.store(loss_ptr + row, 0.0)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], tl.float32)
            if GRAD_S:
                tl.store(gs_row + cols, zero.to(gs_row.dtype.element_ty), mask=cols < V)
            if GRAD_T:
                tl.store(gt_row + cols, zero.to(gt_row.dtype.element_ty), mask=cols < V)


def block_size(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of length V."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK)
    return block, max(1, min(16, block // 512))


def cauchy_schwarz_fwd(student, teacher, valid, inv_temperature, student_scale, student_softcap,
                       teacher_scale, teacher_softcap, grad_student, grad_teacher):
    """Launch on (N, V) contiguous logits: float32 per-row D_CS and the requested gradients."""
    N, V = student.shape
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    if N == 0:
        return loss, gs, gt
    block, warps = block_size(V)
    _cauchy_schwarz_fwd_kernel[(N,)](
        student, teacher, valid, loss, gs if grad_student else student,
        gt if grad_teacher else teacher,
        V, student.stride(0), teacher.stride(0),
        gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
        float(inv_temperature), float(student_scale), float(student_softcap or 1.0),
        float(teacher_scale), float(teacher_softcap or 1.0),
        S_CAP=bool(student_softcap), T_CAP=bool(teacher_softcap),
        GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher), BLOCK=block, num_warps=warps,
    )
    return loss, gs, gt


def launch_variants(widths=(1000, 128256), dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Every launch ``cauchy_schwarz_fwd`` makes (gradient flags x softcap x dtype x width), as
    (labels, call) for the compile check (``fdiv_kernels/triton_compile_check.py``)."""
    flags = {(True, True): "s+t", (True, False): "s", (False, True): "t", (False, False): "none"}
    for V in widths:
        for (gs, gt), grads in flags.items():
            for cap in (0.0, 30.0):
                for dt in dtypes:
                    def call(V=V, gs=gs, gt=gt, cap=cap, dt=dt):
                        s = torch.randn(1, V, dtype=dt)
                        valid = torch.ones(1, dtype=torch.bool)
                        cauchy_schwarz_fwd(s, s, valid, 1.0, 1.0, cap, 1.0, cap, gs, gt)
                    yield {"kind": "cauchy_schwarz", "dtype": str(dt).removeprefix("torch."),
                           "V": V, "grads": grads, "softcap": cap}, call
