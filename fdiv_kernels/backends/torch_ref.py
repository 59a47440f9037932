"""The torch backend: the readable statement of the op, chunked over rows to bound its memory.

It runs on any device and dtype (float64 included), and is the spec the other backends are tested
against, next to the independent float64 reference in tests/.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.backends.common import loss_dtype, register_fake_fwd
from fdiv_kernels.divergences import KernelSpec, element_terms

# Rows per chunk: the chunk's (rows, V) temporaries are the only memory beyond the outputs.
CHUNK_ELEMENTS = 1 << 22


def _chunk_fwd(spec, s, t, inv_t, grad_s, grad_t):
    ctype = loss_dtype(s.dtype)
    lq = torch.log_softmax(s.to(ctype) * inv_t, dim=-1)
    lp = torch.log_softmax(t.to(ctype) * inv_t, dim=-1)
    term, h, k = element_terms(spec, lp, lq)
    loss = term.sum(-1)
    gs = (h - lq.exp() * h.sum(-1, keepdim=True)) * inv_t if grad_s else None
    gt = (k - lp.exp() * k.sum(-1, keepdim=True)) * inv_t if grad_t else None
    return loss, gs, gt


@torch.library.custom_op("fdiv::divergence_fwd_torch", mutates_args=())
def divergence_fwd_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = KernelSpec("", base, swap, param)
    N, V = student.shape
    loss = student.new_empty(N, dtype=loss_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for lo in range(0, N, rows):
        hi = min(N, lo + rows)
        l, cs, ct = _chunk_fwd(
            spec, student[lo:hi], teacher[lo:hi], inv_temperature, grad_student, grad_teacher
        )
        keep = valid[lo:hi]
        loss[lo:hi] = torch.where(keep, l, torch.zeros_like(l))
        if grad_student:
            gs[lo:hi] = torch.where(keep[:, None], cs, torch.zeros_like(cs))
        if grad_teacher:
            gt[lo:hi] = torch.where(keep[:, None], ct, torch.zeros_like(ct))
    return loss, gs, gt


register_fake_fwd("fdiv::divergence_fwd_torch")
