"""The triton backend: registers the Triton launcher as ``fdiv::divergence_fwd_triton``.

``custom_op`` (not ``triton_op``) so fake-tensor tracing also works under TRITON_INTERPRET=1.
Importing this module imports Triton; the dispatch only does so when Triton is installed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fdiv_kernels.backends.common import register_fake_fwd
from fdiv_kernels.triton_kernels.divergence import divergence_fwd


@torch.library.custom_op("fdiv::divergence_fwd_triton", mutates_args=())
def divergence_fwd_triton(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # Launch on the tensors' GPU, not whichever is current.
    on = torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext()
    with on:
        return divergence_fwd(
            student.contiguous(), teacher.contiguous(), valid.contiguous(), base, swap, param,
            inv_temperature, grad_student, grad_teacher,
        )


register_fake_fwd("fdiv::divergence_fwd_triton")
