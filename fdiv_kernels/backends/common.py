"""What every backend's registered ops share: the fake (meta) implementation and the backward."""

from __future__ import annotations

import torch
from torch import Tensor


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def fake_divergence_fwd(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, student_scale: float, student_softcap: float, teacher_scale: float,
    teacher_softcap: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss = student.new_empty(student.shape[0], dtype=loss_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return loss, gs, gt, torch.empty_like(loss)


# Elements per chunk of the CPU mixed-dtype row scale. torch's CPU mul_ of a 16-bit tensor by a
# float32 one materializes float32 copies of its operands (two (N, V) fp32 temporaries: 19 MiB
# peak for a 3.9 MiB bf16 gradient); row chunks bound them to 2 x 1 MiB.
SCALE_CHUNK_ELEMENTS = 1 << 18


@torch.library.custom_op("fdiv::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, row_scale: Tensor) -> None:
    """grad[i, :] *= row_scale[i], in place: the backward of every fused forward.

    In place so the backward holds one (N, V) gradient, not two. The product is formed in the
    wider of the two dtypes and rounded once.
    """
    scale = row_scale.unsqueeze(-1)
    if grad.device.type != "cpu" or grad.dtype == row_scale.dtype or grad.dim() != 2:
        grad.mul_(scale)
        return
    rows = max(1, SCALE_CHUNK_ELEMENTS // max(grad.shape[1], 1))
    for lo in range(0, grad.shape[0], rows):
        grad[lo:lo + rows].mul_(scale[lo:lo + rows])


@scale_rows_.register_fake
def _(grad: Tensor, row_scale: Tensor) -> None:
    return None


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


def register_fakes(backend: str) -> None:
    """Fakes (shape/dtype functions) of the ops ``backend`` registered, for torch.compile."""
    fakes = {
        "divergence_fwd": fake_divergence_fwd,
        "softmax_stats_fwd": fake_softmax_stats_fwd,
        "softmax_stats_bwd": fake_softmax_stats_bwd,
        "divergence_partials": fake_divergence_partials,
        "divergence_grads": fake_divergence_grads,
        "sparse_divergence_fwd": fake_sparse_divergence_fwd,
        "sparse_divergence_bwd": fake_sparse_divergence_bwd,
        "lse_combination_fwd": fake_lse_combination_fwd,
    }
    for op, fake in fakes.items():
        if hasattr(torch.ops.fdiv, f"{op}_{backend}"):
            torch.library.register_fake(f"fdiv::{op}_{backend}")(fake)
