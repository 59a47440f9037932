"""Fused softmax-then-divergence from logits: forward with the gradient computed in the same launch.

One program per row. Passes over the vocabulary (rows may be far longer than a block):
  1. online (max, sum) of both rows -> LSE of student and teacher        read s, t
  2. loss = sum term, H = sum h, K = sum k                                 read s, t
  3. grad_s = (h - q H) / T, grad_t = (k - p K) / T                        read s, t; write grads
For KL(p||q) with only the student gradient, h = -p so H = -1 is known and passes 2 and 3 merge.
The backward is then a per-row scale of the stored gradient (``fdiv::scale_rows_``).
"""

import math

import torch
import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.divergence_terms import element_terms
from fdiv_kernels.triton_kernels.online_softmax import row_lse


@triton.jit
def _load_row_block(ptr, cols, V, scale):
    return tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale


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
    valid = tl.load(valid_ptr + row) != 0
    if valid:
        lse_q = row_lse(s_row, V, inv_t, BLOCK)
        lse_p = row_lse(t_row, V, inv_t, BLOCK)
        # KL's student gradient is q - p: no need to know a row sum first.
        MERGED: tl.constexpr = BASE == 0 and not SWAP and GRAD_S and not GRAD_T
        loss = tl.zeros([BLOCK], tl.float32)
        h_sum = tl.zeros([BLOCK], tl.float32)
        k_sum = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            lq = _load_row_block(s_row, cols, V, inv_t) - lse_q
            lp = _load_row_block(t_row, cols, V, inv_t) - lse_p
            t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
            in_row = cols < V
            loss += tl.where(in_row, t, 0.0)
            h_sum += tl.where(in_row, h, 0.0)
            k_sum += tl.where(in_row, k, 0.0)
            if MERGED:
                g = (tl.exp(lq) - tl.exp(lp)) * inv_t
                tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=in_row)
        # lse - lse is 0, or NaN when a row held NaN: NaN in, NaN out.
        total = tl.sum(loss, 0) + (lse_q - lse_q) + (lse_p - lse_p)
        tl.store(loss_ptr + row, total)
        if (GRAD_S and not MERGED) or GRAD_T:
            H = tl.sum(h_sum, 0)
            K = tl.sum(k_sum, 0)
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                in_row = cols < V
                lq = _load_row_block(s_row, cols, V, inv_t) - lse_q
                lp = _load_row_block(t_row, cols, V, inv_t) - lse_p
                t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
                if GRAD_S:
                    g = (h - tl.exp(lq) * H) * inv_t
                    tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=in_row)
                if GRAD_T:
                    g = (k - tl.exp(lp) * K) * inv_t
                    tl.store(gt_row + cols, g.to(gt_ptr.dtype.element_ty), mask=in_row)
    else:
        # Ignored row: no loss, zero gradient.
        tl.store(loss_ptr + row, 0.0)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], tl.float32)
            if GRAD_S:
                tl.store(gs_row + cols, zero.to(gs_ptr.dtype.element_ty), mask=cols < V)
            if GRAD_T:
                tl.store(gt_row + cols, zero.to(gt_ptr.dtype.element_ty), mask=cols < V)


# Largest block of 16-bit elements per loop iteration (half that for fp32). Tests lower it to run
# the multi-block online loop on small rows.
MAX_BLOCK = 8192


def block_size(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of length V."""
    cap = MAX_BLOCK // 2 if dtype.itemsize >= 4 else MAX_BLOCK
    block = min(triton.next_power_of_2(V), cap)
    return block, max(1, min(16, block // 512))


def divergence_fwd(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
    base: int, swap: bool, param: float, inv_temperature: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel on (N, V) contiguous logits; allocates loss and requested grads."""
    N, V = student.shape
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    # The mixture weight of JS / skew KL, as logs: 0 < param < 1 there.
    mixes = base in (1, 6) and 0.0 < param < 1.0
    log_w = math.log(param) if mixes else 0.0
    log_1mw = math.log1p(-param) if mixes else 0.0
    block, warps = block_size(V, student.dtype)
    _divergence_fwd_kernel[(N,)](
        student, teacher, valid, loss, gs if grad_student else student,
        gt if grad_teacher else teacher,
        V, student.stride(0), teacher.stride(0),
        gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
        float(param), log_w, log_1mw, float(inv_temperature),
        BASE=base, SWAP=bool(swap), GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher),
        BLOCK=block, num_warps=warps,
    )
    return loss, gs, gt
