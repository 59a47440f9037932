"""Fused softmax-then-divergence from logits: forward with the gradient computed in the same launch.

One program per row. Phases over the vocabulary (rows may be far longer than a block):
  1. online (max, sum) of both rows -> LSE of student and teacher        read s, t
  2. partial sums: loss = sum term, H = sum h, K = sum k                  read s, t
  3. grad_s = (h - q H) / T, grad_t = (k - p K) / T                        read s, t; write grads
For KL(p||q) with only the student gradient, h = -p so H = -1 is known and phases 2 and 3 merge.
The backward is then a per-row scale of the stored gradient (``fdiv::scale_rows_``).
Logit transforms (scale, softcap) are applied on load and chained into the gradients
(``logit_transform.py``); phase 2 also sums the student's -q log q for its entropy.

Phases 2 and 3 are also kernels of their own (``divergence_partials``, ``divergence_grads``): with
the vocabulary sharded over devices, each shard runs them on its columns between the all-reduces
of the row statistics (see ``fdiv_kernels.phases``).
"""

import math

import torch
import triton
import triton.language as tl

from fdiv_kernels.core import _ids
from fdiv_kernels.kinds._custom import CUSTOM_BASE, triton_generator
from fdiv_kernels.triton_kernels.divergence_terms import kind_terms
from fdiv_kernels.triton_kernels.ids import KL
from fdiv_kernels.triton_kernels.logit_transform import (
    chain,
    load_logits,
    transform_scalars,
)
from fdiv_kernels.triton_kernels.online_softmax import online_update

# Largest block of 16-bit elements per loop iteration (half that for fp32). Tests lower it to run
# the multi-block online loop on small rows.
MAX_BLOCK = 8192


@triton.jit
def _row_max_logsum(ptr, V, k1, c2, CAP: tl.constexpr, BLOCK: tl.constexpr):
    """(m, log s) of the transformed row / T: m its max, s = sum exp(x - m)."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        a, _ = load_logits(ptr, off + tl.arange(0, BLOCK), V, k1, c2, CAP)
        m, s = online_update(m, s, a)
    return m, tl.log(s)


@triton.jit
def _block_terms(s_row, t_row, off, V, s_k1, s_c2, t_k1, t_c2, m_q, ls_q, m_p, ls_p, param,
                 log_w, log_1mw, BASE: tl.constexpr, SWAP: tl.constexpr, F: tl.constexpr,
                 F_PRIME: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The block of columns at ``off``: (cols, in_row, lp, lq, the tanh of each side under a cap
    (for its gradient), term, h, k)."""
    cols = off + tl.arange(0, BLOCK)
    # log q = (a - m) - log s, the row max subtracted first: the error stays at fp32 rounding of
    # the small terms for any |x / T| (x - lse cancels eps |lse| away). The phase kernels, given
    # only the lse, pass (lse, 0).
    a, th_a = load_logits(s_row, cols, V, s_k1, s_c2, S_CAP)
    b, th_b = load_logits(t_row, cols, V, t_k1, t_c2, T_CAP)
    lp, lq = (b - m_p) - ls_p, (a - m_q) - ls_q
    t, h, k = kind_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP, F, F_PRIME)
    return cols, cols < V, lp, lq, th_a, th_b, t, h, k


@triton.jit
def _row_sums(s_row, t_row, gs_row, V, m_q, ls_q, m_p, ls_p, param, log_w, log_1mw,
              s_k1, s_c2, s_kd, t_k1, t_c2,
              BASE: tl.constexpr, SWAP: tl.constexpr, F: tl.constexpr, F_PRIME: tl.constexpr,
              MERGED: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr, BLOCK: tl.constexpr):
    """(sum term, sum h, sum k, sum q log q) of a row; MERGED also writes KL's student gradient
    q - p (chained through the student's transform)."""
    loss = tl.zeros([BLOCK], tl.float32)
    h_sum = tl.zeros([BLOCK], tl.float32)
    k_sum = tl.zeros([BLOCK], tl.float32)
    qlq = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        cols, in_row, lp, lq, th_a, th_b, t, h, k = _block_terms(
            s_row, t_row, off, V, s_k1, s_c2, t_k1, t_c2, m_q, ls_q, m_p, ls_p, param, log_w,
            log_1mw, BASE, SWAP, F, F_PRIME, S_CAP, T_CAP, BLOCK)
        loss += tl.where(in_row, t, 0.0)
        h_sum += tl.where(in_row, h, 0.0)
        k_sum += tl.where(in_row, k, 0.0)
        q = tl.exp(lq)
        qlq += tl.where(in_row & (q > 0), q * lq, 0.0)  # 0 log 0 = 0
        if MERGED:
            g = chain(q - tl.exp(lp), th_a, s_kd, S_CAP)
            tl.store(gs_row + cols, g.to(gs_row.dtype.element_ty), mask=in_row)
    return tl.sum(loss, 0), tl.sum(h_sum, 0), tl.sum(k_sum, 0), tl.sum(qlq, 0)


@triton.jit
def _row_grads(s_row, t_row, gs_row, gt_row, V, m_q, ls_q, m_p, ls_p, H, K, param, log_w, log_1mw,
               s_k1, s_c2, s_kd, t_k1, t_c2, t_kd,
               BASE: tl.constexpr, SWAP: tl.constexpr, F: tl.constexpr, F_PRIME: tl.constexpr,
               GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
               BLOCK: tl.constexpr):
    for off in range(0, V, BLOCK):
        cols, in_row, lp, lq, th_a, th_b, t, h, k = _block_terms(
            s_row, t_row, off, V, s_k1, s_c2, t_k1, t_c2, m_q, ls_q, m_p, ls_p, param, log_w,
            log_1mw, BASE, SWAP, F, F_PRIME, S_CAP, T_CAP, BLOCK)
        if GRAD_S:
            g = chain(h - tl.exp(lq) * H, th_a, s_kd, S_CAP)
            tl.store(gs_row + cols, g.to(gs_row.dtype.element_ty), mask=in_row)
        if GRAD_T:
            g = chain(k - tl.exp(lp) * K, th_b, t_kd, T_CAP)
            tl.store(gt_row + cols, g.to(gt_row.dtype.element_ty), mask=in_row)


@triton.jit
def _zero_row(g_row, V, BLOCK: tl.constexpr):
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(g_row.dtype.element_ty),
                 mask=cols < V)


@triton.jit
def _divergence_fwd_kernel(
    # data ptrs
    s_ptr, t_ptr, valid_ptr, loss_ptr, gs_ptr, gt_ptr, ent_ptr,
    # sizes and strides (rows are contiguous)
    V, stride_s, stride_t, stride_gs, stride_gt,
    # scalars (the transforms' as logit_transform.transform_scalars gives them)
    param, log_w, log_1mw, s_k1, s_c2, s_kd, t_k1, t_c2, t_kd,
    # features
    BASE: tl.constexpr, SWAP: tl.constexpr, F: tl.constexpr, F_PRIME: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N x V may exceed 2^31
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    if tl.load(valid_ptr + row) != 0:
        m_q, ls_q = _row_max_logsum(s_row, V, s_k1, s_c2, S_CAP, BLOCK)
        m_p, ls_p = _row_max_logsum(t_row, V, t_k1, t_c2, T_CAP, BLOCK)
        # KL's student gradient is q - p: no need to know a row sum first.
        MERGED: tl.constexpr = BASE == KL and not SWAP and GRAD_S and not GRAD_T
        loss, H, K, qlq = _row_sums(s_row, t_row, gs_row, V, m_q, ls_q, m_p, ls_p, param, log_w,
                                    log_1mw, s_k1, s_c2, s_kd, t_k1, t_c2, BASE, SWAP, F, F_PRIME,
                                    MERGED, S_CAP, T_CAP, BLOCK)
        # lse - lse is 0, or NaN when a row held NaN: NaN in, NaN out.
        lse_q = m_q + ls_q
        lse_p = m_p + ls_p
        tl.store(loss_ptr + row, loss + (lse_q - lse_q) + (lse_p - lse_p))
        # The student's entropy (the pointers are never swapped: SWAP only exchanges the terms).
        tl.store(ent_ptr + row, -qlq + (lse_q - lse_q))
        if (GRAD_S and not MERGED) or GRAD_T:
            _row_grads(s_row, t_row, gs_row, gt_row, V, m_q, ls_q, m_p, ls_p, H, K, param,
                       log_w, log_1mw, s_k1, s_c2, s_kd, t_k1, t_c2, t_kd, BASE, SWAP, F, F_PRIME,
                       GRAD_S, GRAD_T, S_CAP, T_CAP, BLOCK)
    else:
        # Ignored row: no loss, zero gradient.
        tl.store(loss_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        if GRAD_S:
            _zero_row(gs_row, V, BLOCK)
        if GRAD_T:
            _zero_row(gt_row, V, BLOCK)


@triton.jit
def _divergence_partials_kernel(
    s_ptr, t_ptr, valid_ptr, lse_q_ptr, lse_p_ptr, sums_ptr,
    V, stride_s, stride_t,
    param, log_w, log_1mw, inv_t,
    BASE: tl.constexpr, SWAP: tl.constexpr, F: tl.constexpr, F_PRIME: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    loss = 0.0
    H = 0.0
    K = 0.0
    if tl.load(valid_ptr + row) != 0:
        lse_q = tl.load(lse_q_ptr + row)
        lse_p = tl.load(lse_p_ptr + row)
        loss, H, K, _ = _row_sums(s_ptr + row * stride_s, t_ptr + row * stride_t, s_ptr, V,
                                  lse_q, 0.0, lse_p, 0.0, param, log_w, log_1mw, inv_t, 0.0,
                                  inv_t, inv_t, 0.0, BASE, SWAP, F, F_PRIME, False, False, False,
                                  BLOCK)
    tl.store(sums_ptr + row * 3, loss)
    tl.store(sums_ptr + row * 3 + 1, H)
    tl.store(sums_ptr + row * 3 + 2, K)


@triton.jit
def _divergence_grads_kernel(
    s_ptr, t_ptr, valid_ptr, lse_q_ptr, lse_p_ptr, sums_ptr, gs_ptr, gt_ptr,
    V, stride_s, stride_t, stride_gs, stride_gt,
    param, log_w, log_1mw, inv_t,
    BASE: tl.constexpr, SWAP: tl.constexpr, F: tl.constexpr, F_PRIME: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    if tl.load(valid_ptr + row) != 0:
        _row_grads(s_ptr + row * stride_s, t_ptr + row * stride_t, gs_row, gt_row, V,
                   tl.load(lse_q_ptr + row), 0.0, tl.load(lse_p_ptr + row), 0.0,
                   tl.load(sums_ptr + row * 3 + 1), tl.load(sums_ptr + row * 3 + 2),
                   param, log_w, log_1mw, inv_t, 0.0, inv_t, inv_t, 0.0, inv_t, BASE, SWAP,
                   F, F_PRIME, GRAD_S, GRAD_T, False, False, BLOCK)
    else:
        if GRAD_S:
            _zero_row(gs_row, V, BLOCK)
        if GRAD_T:
            _zero_row(gt_row, V, BLOCK)


def block_size(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of length V."""
    cap = MAX_BLOCK // 2 if dtype.itemsize >= 4 else MAX_BLOCK
    block = min(triton.next_power_of_2(V), cap)
    return block, max(1, min(16, block // 512))


def _generator(base: int) -> dict:
    """The F / F_PRIME constexprs: a custom kind's ``@triton.jit`` generator and derivative (the
    kernel is specialized on them), None for the built-in kinds."""
    if base < CUSTOM_BASE:
        return {"F": None, "F_PRIME": None}
    f, fp = triton_generator(base)
    return {"F": f, "F_PRIME": fp}


def _mix_logs(base: int, param: float) -> tuple[float, float]:
    # The mixture weight of JS / skew KL, as logs: 0 < param < 1 there.
    if base in (_ids.JS, _ids.SKEW_KL) and 0.0 < param < 1.0:
        return math.log(param), math.log1p(-param)
    return 0.0, 0.0


def divergence_fwd(student, teacher, valid, base, swap, param, inv_temperature,
                   student_scale, student_softcap, teacher_scale, teacher_softcap,
                   grad_student, grad_teacher):
    """Launch the fused kernel on (N, V) contiguous logits; allocates loss, the requested grads
    and the student's per-row entropy."""
    N, V = student.shape
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    ent = torch.empty(N, dtype=torch.float32, device=student.device)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    if N == 0:  # an empty batch: nothing to launch (a zero grid is an error on some targets)
        return loss, gs, gt, ent
    block, warps = block_size(V, student.dtype)
    inv_t = float(inv_temperature)
    s_k1, s_c2, s_kd = transform_scalars(float(student_scale), float(student_softcap), inv_t)
    t_k1, t_c2, t_kd = transform_scalars(float(teacher_scale), float(teacher_softcap), inv_t)
    _divergence_fwd_kernel[(N,)](
        student, teacher, valid, loss, gs if grad_student else student,
        gt if grad_teacher else teacher, ent,
        V, student.stride(0), teacher.stride(0),
        gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
        float(param), *_mix_logs(base, param), s_k1, s_c2, s_kd, t_k1, t_c2, t_kd,
        BASE=base, SWAP=bool(swap), **_generator(base), GRAD_S=bool(grad_student),
        GRAD_T=bool(grad_teacher), S_CAP=bool(student_softcap), T_CAP=bool(teacher_softcap),
        BLOCK=block, num_warps=warps,
    )
    return loss, gs, gt, ent


def divergence_partials(student, teacher, valid, lse_s, lse_t, base, swap, param,
                        inv_temperature):
    """(N, 3) float32 row sums (term, h, k) of the given columns, under the given row LSEs."""
    N, V = student.shape
    sums = torch.empty(N, 3, dtype=torch.float32, device=student.device)
    if N == 0:
        return sums
    block, warps = block_size(V, student.dtype)
    _divergence_partials_kernel[(N,)](
        student, teacher, valid, lse_s, lse_t, sums, V, student.stride(0), teacher.stride(0),
        float(param), *_mix_logs(base, param), float(inv_temperature),
        BASE=base, SWAP=bool(swap), **_generator(base), BLOCK=block, num_warps=warps,
    )
    return sums


def divergence_grads(student, teacher, valid, lse_s, lse_t, sums, base, swap, param,
                     inv_temperature, grad_student, grad_teacher):
    """Gradients of the given columns from the row LSEs and the (all-reduced) row sums."""
    N, V = student.shape
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    if N == 0:
        return gs, gt
    block, warps = block_size(V, student.dtype)
    _divergence_grads_kernel[(N,)](
        student, teacher, valid, lse_s, lse_t, sums,
        gs if grad_student else student, gt if grad_teacher else teacher,
        V, student.stride(0), teacher.stride(0),
        gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
        float(param), *_mix_logs(base, param), float(inv_temperature),
        BASE=base, SWAP=bool(swap), **_generator(base), GRAD_S=bool(grad_student),
        GRAD_T=bool(grad_teacher), BLOCK=block, num_warps=warps,
    )
    return gs, gt


def launch_variants(widths=(1000, 128256, 262144),
                    dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Every launch these launchers make, per registry kind (base, swap) x gradient flags x dtype
    x row width (plus the softcapped variants), as (labels, call): ``call()`` runs the launcher
    on a one-row CPU input. The
    compile check (``tools/triton_compile_check.py``) intercepts the kernel launches, so it
    compiles exactly what the launchers pass, with their own block and warp choice."""
    from fdiv_kernels.kinds._registry import DIVERGENCES

    kinds = {}
    for name, d in DIVERGENCES.items():  # one per (base, swap): the compiled code is the same
        kinds.setdefault((d.base, d.swap), (name, d.default))
    flags = [(True, True), (True, False), (False, True), (False, False)]
    for V in widths:
        for (base, swap), (name, param) in kinds.items():
            for gs, gt in flags:
                for dt in dtypes:
                    def call(V=V, base=base, swap=swap, param=param, gs=gs, gt=gt, dt=dt):
                        s = torch.randn(1, V, dtype=dt)
                        valid = torch.ones(1, dtype=torch.bool)
                        lse = torch.zeros(1)
                        divergence_fwd(s, s, valid, base, swap, param, 1.0, 1.0, 0.0, 1.0, 0.0,
                                       gs, gt)
                        if not gs and not gt:
                            divergence_partials(s, s, valid, lse, lse, base, swap, param, 1.0)
                        else:
                            divergence_grads(s, s, valid, lse, lse, torch.zeros(1, 3), base, swap,
                                             param, 1.0, gs, gt)
                    grads = {(True, True): "s+t", (True, False): "s", (False, True): "t"}
                    yield {"kind": name, "dtype": str(dt).removeprefix("torch."), "V": V,
                           "grads": grads.get((gs, gt), "none")}, call
    # Softcapped variants (S_CAP / T_CAP constexprs): one kind with both gradients, per dtype.
    for V in widths[:1]:
        for caps in ((30.0, 0.0), (0.0, 30.0), (30.0, 30.0)):
            for dt in dtypes:
                def call(V=V, caps=caps, dt=dt):
                    s = torch.randn(1, V, dtype=dt)
                    valid = torch.ones(1, dtype=torch.bool)
                    divergence_fwd(s, s, valid, _ids.JS, False, 0.5, 1.0, 0.0625, caps[0],
                                   1.0, caps[1], True, True)
                yield {"kind": "js", "dtype": str(dt).removeprefix("torch."), "V": V,
                       "grads": "s+t", "softcap": f"s={caps[0]:g},t={caps[1]:g}"}, call
