"""What every backend's registered ops share: the fake (meta) implementation and the backward."""

from __future__ import annotations

import torch
from torch import Tensor


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def fake_divergence_fwd(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    loss = student.new_empty(student.shape[0], dtype=loss_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return loss, gs, gt


def register_fake_fwd(op_name: str) -> None:
    torch.library.register_fake(op_name)(fake_divergence_fwd)


@torch.library.custom_op("fdiv::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, row_scale: Tensor) -> None:
    """grad[i, :] *= row_scale[i], in place: the backward of every fused forward.

    In place so the backward holds one (N, V) gradient, not two. The product is formed in the
    wider of the two dtypes and rounded once.
    """
    grad.mul_(row_scale.unsqueeze(-1))


@scale_rows_.register_fake
def _(grad: Tensor, row_scale: Tensor) -> None:
    return None
