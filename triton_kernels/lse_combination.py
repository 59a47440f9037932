"""Triton row divergences that are weighted sums of three log-sum-exps, with their gradients.

With a = student / T, b = teacher / T (after the optional logit transforms) and three terms
(ca_k, cb_k, w_k) of finite coefficients::

    D = sum_k w_k lse(ca_k a + cb_k b)
    dD/da = sum_k w_k ca_k softmax(ca_k a + cb_k b),   dD/db = sum_k w_k cb_k softmax(...)

(Cauchy-Schwarz and Renyi: ``fdiv_kernels.divergences._row_kinds``). One program per row: one pass
folds the
three online log-sum-exps (``online_softmax``) in float64, one writes the gradients in float32
(in float64 under WIDE_GRAD, see ``wide_grad``). The sums pass is float64 throughout: the terms
cancel as p -> q. A zero coefficient drops its input, also against a -inf logit; a -inf from a
positive coefficient beats the +inf of a negative one (that outcome has no mass), and a term with
a +inf entry has lse = +inf (Renyi above alpha = 1 with q = 0 < p: D = +inf), left out of the
gradient as a term with no mass is.

Transforms per input, in order (no CAP: none): z <- z * scale; z <- cap tanh(z / cap); a = z / T
(the shared ``logit_transform`` blocks).
"""

import torch
import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.logit_transform import chain, load_logits, transform_scalars
from fdiv_kernels.triton_kernels.online_softmax import online_update

# Largest block per loop iteration (tests lower it to run the multi-block loop on small rows).
MAX_BLOCK = 4096


@triton.jit
def _mix(a, b, ca, cb):
    # ca a + cb b, a zero coefficient dropping its input (0 * -inf would be NaN); -inf from
    # either side wins over the +inf of a negative coefficient.
    x = tl.where(ca == 0, 0.0, ca * a)
    y = tl.where(cb == 0, 0.0, cb * b)
    return tl.where((x == float("-inf")) | (y == float("-inf")), float("-inf"), x + y)


@triton.jit
def _grad_term(g, a, b, ca, cb, wc, m, ls, live):
    # g + w c softmax(ca a + cb b); a term with no mass or an infinite lse (live false) adds
    # nothing.
    e = tl.exp((_mix(a, b, ca, cb) - m) - ls)
    return g + tl.where(live & (wc != 0), wc * e, 0.0)


@triton.jit
def _side_grad(a, b, ca0, cb0, ca1, cb1, ca2, cb2, k0, k1, k2, g0, l0, live0, g1, l1, live1,
               g2, l2, live2, gty: tl.constexpr, BLOCK: tl.constexpr):
    # One side's sum_k k_k softmax_k over a block (k_k = w_k ca_k for the student, w_k cb_k for
    # the teacher).
    g = tl.zeros([BLOCK], gty)
    g = _grad_term(g, a, b, ca0, cb0, k0, g0, l0, live0)
    g = _grad_term(g, a, b, ca1, cb1, k1, g1, l1, live1)
    return _grad_term(g, a, b, ca2, cb2, k2, g2, l2, live2)


@triton.jit
def _store_side_grad(g_row, cols, in_row, th, kd, g, CAP: tl.constexpr):
    # The side's gradient through its logit transform, in its dtype.
    g = chain(g.to(tl.float32), th, kd, CAP)
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=in_row)


@triton.jit
def _lse_combination_fwd_kernel(
    s_ptr, t_ptr, valid_ptr, loss_ptr, gs_ptr, gt_ptr,
    V, stride_s, stride_t, stride_gs, stride_gt,
    ca0, cb0, w0, ca1, cb1, w1, ca2, cb2, w2,
    # the transforms' scalars (logit_transform.transform_scalars, 1 / T folded in)
    s_k1, s_c2, s_kd, t_k1, t_c2, t_kd,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, WIDE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    if tl.load(valid_ptr + row) != 0:
        # The sums pass in float64, exps and mixes included: the terms cancel as p -> q
        # (Cauchy-Schwarz: D ~ 1e-6 while each lse ~ 10), where float32 exps would leave ~3e-7
        # of rounding, and a + b rounded to float32 is off by eps |a + b|.
        neg_inf = tl.full([], float("-inf"), tl.float64)
        m0, m1, m2 = neg_inf, neg_inf, neg_inf
        s0 = tl.zeros([], tl.float64)
        s1 = tl.zeros([], tl.float64)
        s2 = tl.zeros([], tl.float64)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            a, _ = load_logits(s_row, cols, V, s_k1, s_c2, S_CAP)
            b, _ = load_logits(t_row, cols, V, t_k1, t_c2, T_CAP)
            a = a.to(tl.float64)
            b = b.to(tl.float64)
            m0, s0 = online_update(m0, s0, _mix(a, b, ca0, cb0))
            m1, s1 = online_update(m1, s1, _mix(a, b, ca1, cb1))
            m2, s2 = online_update(m2, s2, _mix(a, b, ca2, cb2))
        ls0 = tl.log(s0)
        ls1 = tl.log(s1)
        ls2 = tl.log(s2)
        # The maxima carry the magnitudes and combine first (exactly cancelling for identical
        # Cauchy-Schwarz rows); a term with no mass is shifted by 0 (its log-sum is -inf).
        sh0 = tl.where(m0 == float("-inf"), 0.0, m0)
        sh1 = tl.where(m1 == float("-inf"), 0.0, m1)
        sh2 = tl.where(m2 == float("-inf"), 0.0, m2)
        shifts = w0 * sh0 + w1 * sh1 + w2 * sh2
        loss = shifts + (w0 * ls0 + w1 * ls1 + w2 * ls2)
        tl.store(loss_ptr + row, loss.to(tl.float32))
        if GRAD_S or GRAD_T:
            # WIDE_GRAD: the exponents and the sum in float64 (cancelling, amplified terms).
            gty = tl.float64 if WIDE_GRAD else tl.float32
            live0 = (s0 > 0) & (m0 < float("inf"))
            live1 = (s1 > 0) & (m1 < float("inf"))
            live2 = (s2 > 0) & (m2 < float("inf"))
            l0 = tl.where(live0, ls0, 0.0).to(gty)
            l1 = tl.where(live1, ls1, 0.0).to(gty)
            l2 = tl.where(live2, ls2, 0.0).to(gty)
            g0 = tl.where(live0, sh0, 0.0).to(gty)
            g1 = tl.where(live1, sh1, 0.0).to(gty)
            g2 = tl.where(live2, sh2, 0.0).to(gty)
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                in_row = cols < V
                a, th_a = load_logits(s_row, cols, V, s_k1, s_c2, S_CAP)
                b, th_b = load_logits(t_row, cols, V, t_k1, t_c2, T_CAP)
                a = a.to(gty)
                b = b.to(gty)
                if GRAD_S:
                    _store_side_grad(gs_row, cols, in_row, th_a, s_kd, _side_grad(
                        a, b, ca0, cb0, ca1, cb1, ca2, cb2, w0 * ca0, w1 * ca1, w2 * ca2, g0, l0,
                        live0, g1, l1, live1, g2, l2, live2, gty, BLOCK), S_CAP)
                if GRAD_T:  # the teacher's coefficients: w_k cb_k
                    _store_side_grad(gt_row, cols, in_row, th_b, t_kd, _side_grad(
                        a, b, ca0, cb0, ca1, cb1, ca2, cb2, w0 * cb0, w1 * cb1, w2 * cb2, g0, l0,
                        live0, g1, l1, live1, g2, l2, live2, gty, BLOCK), T_CAP)
    else:
        tl.store(loss_ptr + row, 0.0)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], tl.float32)
            if GRAD_S:
                tl.store(gs_row + cols, zero.to(gs_row.dtype.element_ty), mask=cols < V)
            if GRAD_T:
                tl.store(gt_row + cols, zero.to(gt_row.dtype.element_ty), mask=cols < V)


def wide_grad(coeffs) -> bool:
    """Whether the gradient pass needs float64: a coefficient negative or above 2 (float32
    rounding of c a is eps |c a| in the exponent) or a weighted coefficient above 1 in magnitude
    (terms that nearly cancel, amplified: Renyi's teacher side alpha / (alpha - 1) (r - p) near
    alpha = 1). Cauchy-Schwarz stays float32. Stated alike in csrc/cpu/lse_combination.cpp."""
    c = [float(x) for x in coeffs]
    return any(not 0.0 <= x <= 2.0 for i, x in enumerate(c) if i % 3 != 2) or any(
        abs(c[k + 2] * c[k + j]) > 1.0 for k in (0, 3, 6) for j in (0, 1))


def block_size(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of length V."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK)
    return block, max(1, min(16, block // 512))


def lse_combination_fwd(student, teacher, valid, coeffs, inv_temperature, student_scale,
                        student_softcap, teacher_scale, teacher_softcap, grad_student,
                        grad_teacher):
    """Launch on (N, V) contiguous logits: float32 per-row D and the requested gradients."""
    N, V = student.shape
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    if N == 0:
        return loss, gs, gt
    block, warps = block_size(V)
    _lse_combination_fwd_kernel[(N,)](
        student, teacher, valid, loss, gs if grad_student else student,
        gt if grad_teacher else teacher,
        V, student.stride(0), teacher.stride(0),
        gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
        *[float(c) for c in coeffs],
        *transform_scalars(float(student_scale), float(student_softcap), float(inv_temperature)),
        *transform_scalars(float(teacher_scale), float(teacher_softcap), float(inv_temperature)),
        S_CAP=bool(student_softcap), T_CAP=bool(teacher_softcap),
        GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher), WIDE_GRAD=wide_grad(coeffs),
        BLOCK=block, num_warps=warps,
    )
    return loss, gs, gt


def launch_variants(widths=(1000, 128256), dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Every launch ``lse_combination_fwd`` makes (gradient flags x softcap x float32 / float64
    gradient pass x dtype x width), as (labels, call) for the compile check
    (``tools/triton_compile_check.py``)."""
    from fdiv_kernels.divergences._row_kinds import CAUCHY_SCHWARZ_COEFFS, renyi_coeffs

    flags = {(True, True): "s+t", (True, False): "s", (False, True): "t", (False, False): "none"}
    # Cauchy-Schwarz: the float32 gradient pass; Renyi above alpha = 1: the float64 one.
    coeff_sets = {"cauchy_schwarz": CAUCHY_SCHWARZ_COEFFS, "renyi": renyi_coeffs(2.0)}
    for V in widths:
        for (gs, gt), grads in flags.items():
            for cap in (0.0, 30.0):
                for kind, coeffs in coeff_sets.items():
                    for dt in dtypes:
                        def call(V=V, gs=gs, gt=gt, cap=cap, dt=dt, coeffs=coeffs):
                            s = torch.randn(1, V, dtype=dt)
                            valid = torch.ones(1, dtype=torch.bool)
                            lse_combination_fwd(s, s, valid, coeffs, 1.0, 1.0, cap, 1.0, cap,
                                                gs, gt)
                        yield {"op": "lse_combination", "dtype": str(dt).removeprefix("torch."),
                               "V": V, "grads": grads, "softcap": cap, "coeffs": kind}, call
