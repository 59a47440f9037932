"""Fused softmax-then-divergence from logits: forward with the gradient computed in the same launch.

One program per row. Phases over the vocabulary (rows may be far longer than a block):
  1. online (max, sum) of both rows -> LSE of student and teacher        read s, t
  2. partial sums: loss = sum term, H = sum h, K = sum k                  read s, t
  3. grad_s = (h - q H) / T, grad_t = (k - p K) / T                        read s, t; write grads
For KL(p||q) with only the student gradient, h = -p so H = -1 is known and phases 2 and 3 merge.
The backward is then a per-row scale of the stored gradient (``fdiv::scale_rows_``).

Phases 2 and 3 are also kernels of their own (``divergence_partials``, ``divergence_grads``): with
the vocabulary sharded over devices, each shard runs them on its columns between the all-reduces
of the row statistics (see ``fdiv_kernels.phases``).
"""

import math

import torch
import triton
import triton.language as tl

from fdiv_kernels import _ids
from fdiv_kernels.triton_kernels.divergence_terms import element_terms
from fdiv_kernels.triton_kernels.ids import KL
from fdiv_kernels.triton_kernels.online_softmax import row_max_logsum

# Largest block of 16-bit elements per loop iteration (half that for fp32). Tests lower it to run
# the multi-block online loop on small rows.
MAX_BLOCK = 8192


@triton.jit
def _log_probs(s_row, t_row, cols, V, inv_t, m_q, ls_q, m_p, ls_p):
    # log q = (a - m) - log s, the row max subtracted first: the error stays at fp32 rounding of
    # the small terms for any |x / T| (x - lse cancels eps |lse| away). The phase kernels, given
    # only the lse, pass (lse, 0).
    a = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    b = tl.load(t_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    return (b * inv_t - m_p) - ls_p, (a * inv_t - m_q) - ls_q


@triton.jit
def _row_sums(s_row, t_row, gs_row, V, m_q, ls_q, m_p, ls_p, param, log_w, log_1mw, inv_t,
              BASE: tl.constexpr, SWAP: tl.constexpr, MERGED: tl.constexpr, BLOCK: tl.constexpr):
    """(sum term, sum h, sum k) of a row; MERGED also writes KL's student gradient q - p."""
    loss = tl.zeros([BLOCK], tl.float32)
    h_sum = tl.zeros([BLOCK], tl.float32)
    k_sum = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        in_row = cols < V
        lp, lq = _log_probs(s_row, t_row, cols, V, inv_t, m_q, ls_q, m_p, ls_p)
        t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
        loss += tl.where(in_row, t, 0.0)
        h_sum += tl.where(in_row, h, 0.0)
        k_sum += tl.where(in_row, k, 0.0)
        if MERGED:
            g = (tl.exp(lq) - tl.exp(lp)) * inv_t
            tl.store(gs_row + cols, g.to(gs_row.dtype.element_ty), mask=in_row)
    return tl.sum(loss, 0), tl.sum(h_sum, 0), tl.sum(k_sum, 0)


@triton.jit
def _row_grads(s_row, t_row, gs_row, gt_row, V, m_q, ls_q, m_p, ls_p, H, K, param, log_w, log_1mw,
               inv_t,
               BASE: tl.constexpr, SWAP: tl.constexpr, GRAD_S: tl.constexpr,
               GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        in_row = cols < V
        lp, lq = _log_probs(s_row, t_row, cols, V, inv_t, m_q, ls_q, m_p, ls_p)
        t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
        if GRAD_S:
            g = (h - tl.exp(lq) * H) * inv_t
            tl.store(gs_row + cols, g.to(gs_row.dtype.element_ty), mask=in_row)
        if GRAD_T:
            g = (k - tl.exp(lp) * K) * inv_t
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
    s_ptr, t_ptr, valid_ptr, loss_ptr, gs_ptr, gt_ptr,
    # sizes and strides (rows are contiguous)
    V, stride_s, stride_t, stride_gs, stride_gt,
    # scalars
    param, log_w, log_1mw, inv_t,
    # features
    BASE: tl.constexpr, SWAP: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N x V may exceed 2^31
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    if tl.load(valid_ptr + row) != 0:
        m_q, ls_q = row_max_logsum(s_row, V, inv_t, BLOCK)
        m_p, ls_p = row_max_logsum(t_row, V, inv_t, BLOCK)
        # KL's student gradient is q - p: no need to know a row sum first.
        MERGED: tl.constexpr = BASE == KL and not SWAP and GRAD_S and not GRAD_T
        loss, H, K = _row_sums(s_row, t_row, gs_row, V, m_q, ls_q, m_p, ls_p, param, log_w,
                               log_1mw, inv_t, BASE, SWAP, MERGED, BLOCK)
        # lse - lse is 0, or NaN when a row held NaN: NaN in, NaN out.
        lse_q = m_q + ls_q
        lse_p = m_p + ls_p
        tl.store(loss_ptr + row, loss + (lse_q - lse_q) + (lse_p - lse_p))
        if (GRAD_S and not MERGED) or GRAD_T:
            _row_grads(s_row, t_row, gs_row, gt_row, V, m_q, ls_q, m_p, ls_p, H, K, param,
                       log_w, log_1mw, inv_t, BASE, SWAP, GRAD_S, GRAD_T, BLOCK)
    else:
        # Ignored row: no loss, zero gradient.
        tl.store(loss_ptr + row, 0.0)
        if GRAD_S:
            _zero_row(gs_row, V, BLOCK)
        if GRAD_T:
            _zero_row(gt_row, V, BLOCK)


@triton.jit
def _divergence_partials_kernel(
    s_ptr, t_ptr, valid_ptr, lse_q_ptr, lse_p_ptr, sums_ptr,
    V, stride_s, stride_t,
    param, log_w, log_1mw, inv_t,
    BASE: tl.constexpr, SWAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    loss = 0.0
    H = 0.0
    K = 0.0
    if tl.load(valid_ptr + row) != 0:
        lse_q = tl.load(lse_q_ptr + row)
        lse_p = tl.load(lse_p_ptr + row)
        loss, H, K = _row_sums(s_ptr + row * stride_s, t_ptr + row * stride_t, s_ptr, V, lse_q,
                               0.0, lse_p, 0.0, param, log_w, log_1mw, inv_t, BASE, SWAP, False,
                               BLOCK)
    tl.store(sums_ptr + row * 3, loss)
    tl.store(sums_ptr + row * 3 + 1, H)
    tl.store(sums_ptr + row * 3 + 2, K)


@triton.jit
def _divergence_grads_kernel(
    s_ptr, t_ptr, valid_ptr, lse_q_ptr, lse_p_ptr, sums_ptr, gs_ptr, gt_ptr,
    V, stride_s, stride_t, stride_gs, stride_gt,
    param, log_w, log_1mw, inv_t,
    BASE: tl.constexpr, SWAP: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    if tl.load(valid_ptr + row) != 0:
        _row_grads(s_ptr + row * stride_s, t_ptr + row * stride_t, gs_row, gt_row, V,
                   tl.load(lse_q_ptr + row), 0.0, tl.load(lse_p_ptr + row), 0.0,
                   tl.load(sums_ptr + row * 3 + 1), tl.load(sums_ptr + row * 3 + 2),
                   param, log_w, log_1mw, inv_t, BASE, SWAP, GRAD_S, GRAD_T, BLOCK)
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


def _mix_logs(base: int, param: float) -> tuple[float, float]:
    # The mixture weight of JS / skew KL, as logs: 0 < param < 1 there.
    if base in (_ids.JS, _ids.SKEW_KL) and 0.0 < param < 1.0:
        return math.log(param), math.log1p(-param)
    return 0.0, 0.0


def divergence_fwd(student, teacher, valid, base, swap, param, inv_temperature,
                   grad_student, grad_teacher):
    """Launch the fused kernel on (N, V) contiguous logits; allocates loss and requested grads."""
    N, V = student.shape
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    if N == 0:  # an empty batch: nothing to launch (a zero grid is an error on some targets)
        return loss, gs, gt
    block, warps = block_size(V, student.dtype)
    _divergence_fwd_kernel[(N,)](
        student, teacher, valid, loss, gs if grad_student else student,
        gt if grad_teacher else teacher,
        V, student.stride(0), teacher.stride(0),
        gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
        float(param), *_mix_logs(base, param), float(inv_temperature),
        BASE=base, SWAP=bool(swap), GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher),
        BLOCK=block, num_warps=warps,
    )
    return loss, gs, gt


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
        BASE=base, SWAP=bool(swap), BLOCK=block, num_warps=warps,
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
        BASE=base, SWAP=bool(swap), GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher),
        BLOCK=block, num_warps=warps,
    )
    return gs, gt


def launch_variants(widths=(1000, 128256, 262144),
                    dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Every launch these launchers make, per registry kind (base, swap) x gradient flags x dtype
    x row width, as (labels, call): ``call()`` runs the launcher on a one-row CPU input. The
    compile check (``fdiv_kernels/triton_compile_check.py``) intercepts the kernel launches, so it
    compiles exactly what the launchers pass, with their own block and warp choice."""
    from fdiv_kernels._kinds import DIVERGENCES

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
                        divergence_fwd(s, s, valid, base, swap, param, 1.0, gs, gt)
                        if not gs and not gt:
                            divergence_partials(s, s, valid, lse, lse, base, swap, param, 1.0)
                        else:
                            divergence_grads(s, s, valid, lse, lse, torch.zeros(1, 3), base, swap,
                                             param, 1.0, gs, gt)
                    grads = {(True, True): "s+t", (True, False): "s", (False, True): "t"}
                    yield {"kind": name, "dtype": str(dt).removeprefix("torch."), "V": V,
                           "grads": grads.get((gs, gt), "none")}, call
