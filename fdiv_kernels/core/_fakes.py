"""The fake (meta) implementation of every softmax-family op, shared by all backends: output
shapes and dtypes only, for torch.compile and opcheck (``_ops.register`` registers them)."""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core._validation import loss_dtype


def fake_divergence_fwd(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, student_scale: float, student_softcap: float, teacher_scale: float,
    teacher_softcap: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss = student.new_empty(student.shape[0], dtype=loss_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return loss, gs, gt, torch.empty_like(loss)


def fake_softmax_stats_fwd(
    x: Tensor, labels: Tensor | None, ignore_index: int, inv_temperature: float, scale: float,
    softcap: float, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[0]
    f32 = dict(dtype=loss_dtype(x.dtype))
    return (x.new_empty(n, **f32), x.new_empty(n if entropy else 0, **f32),
            x.new_empty(n if labels is not None else 0, **f32))


def fake_softmax_stats_bwd(
    x: Tensor, labels: Tensor | None, lse: Tensor, entropy: Tensor, g_lse: Tensor | None,
    g_entropy: Tensor | None, g_logprob: Tensor | None, ignore_index: int, inv_temperature: float,
    scale: float, softcap: float,
) -> Tensor:
    return torch.empty_like(x)


def fake_divergence_partials(
    student: Tensor, teacher: Tensor, valid: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    base: int, swap: bool, param: float, inv_temperature: float,
) -> Tensor:
    return student.new_empty(student.shape[0], 3, dtype=loss_dtype(student.dtype))


def fake_divergence_grads(
    student: Tensor, teacher: Tensor, valid: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    sums: Tensor, base: int, swap: bool, param: float, inv_temperature: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor]:
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return gs, gt


def fake_sparse_divergence_fwd(
    student: Tensor, ids: Tensor, teacher: Tensor, support: Tensor, valid: Tensor, base: int,
    swap: bool, param: float, inv_temperature: float, tail: int, teacher_alpha: float,
    mass_slack: float, logit_scale: float, softcap: float, grad_student: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ctype = loss_dtype(student.dtype)
    loss = student.new_empty(student.shape[0], dtype=ctype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = student.new_empty(ids.shape, dtype=ctype) if grad_teacher else student.new_empty(0)
    return loss, gs, gt, student.new_empty(student.shape[0], 2, dtype=ctype)


def fake_sparse_divergence_bwd(
    student: Tensor, ids: Tensor, teacher: Tensor, support: Tensor, valid: Tensor, stats: Tensor,
    grad_loss: Tensor, base: int, swap: bool, param: float, inv_temperature: float, tail: int,
    teacher_alpha: float, logit_scale: float, softcap: float,
) -> Tensor:
    return torch.empty_like(student)


def fake_lse_combination_fwd(
    student: Tensor, teacher: Tensor, valid: Tensor, coeffs: list[float], inv_temperature: float,
    student_scale: float, student_softcap: float, teacher_scale: float, teacher_softcap: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    loss = student.new_empty(student.shape[0], dtype=loss_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return loss, gs, gt


# The fake of each op of the record, by field name (fdiv_kernels.core._ops.SoftmaxOps).
FAKES = {
    "divergence_fwd": fake_divergence_fwd,
    "divergence_partials": fake_divergence_partials,
    "divergence_grads": fake_divergence_grads,
    "lse_combination_fwd": fake_lse_combination_fwd,
    "sparse_divergence_fwd": fake_sparse_divergence_fwd,
    "sparse_divergence_bwd": fake_sparse_divergence_bwd,
    "softmax_stats_fwd": fake_softmax_stats_fwd,
    "softmax_stats_bwd": fake_softmax_stats_bwd,
}
