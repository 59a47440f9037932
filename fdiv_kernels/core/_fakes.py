"""The fake (meta) implementation of every softmax-family op, shared by all backends: output
shapes and dtypes only, for torch.compile and opcheck (``_ops.register`` registers them).

Each reads only the arguments that set its outputs' shapes; the rest of the op's arguments are
those of its schema (``_ops.SCHEMAS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core._validation import loss_dtype


def _grads(student: Tensor, teacher: Tensor, grad_student: bool, grad_teacher: bool):
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return gs, gt


def _rows(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], dtype=loss_dtype(x.dtype))


def fake_divergence_fwd(student: Tensor, teacher: Tensor, *args) -> tuple[Tensor, ...]:
    # args: valid, kind, swap, param, inv_t, four transforms, grad_student, grad_teacher
    loss = _rows(student)
    return (loss, *_grads(student, teacher, *args[-2:]), torch.empty_like(loss))


def fake_divergence_partials(student: Tensor, *args) -> Tensor:
    return student.new_empty(student.shape[0], 3, dtype=loss_dtype(student.dtype))


def fake_divergence_grads(student: Tensor, teacher: Tensor, *args) -> tuple[Tensor, Tensor]:
    return _grads(student, teacher, *args[-2:])


def fake_lse_combination_fwd(student: Tensor, teacher: Tensor, *args) -> tuple[Tensor, ...]:
    return (_rows(student), *_grads(student, teacher, *args[-2:]))


def fake_sparse_divergence_fwd(student: Tensor, ids: Tensor, *args) -> tuple[Tensor, ...]:
    grad_student, grad_teacher = args[-2:]
    ctype = loss_dtype(student.dtype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = student.new_empty(ids.shape, dtype=ctype) if grad_teacher else student.new_empty(0)
    return _rows(student), gs, gt, student.new_empty(student.shape[0], 2, dtype=ctype)


def fake_sparse_divergence_fwd_inplace(student: Tensor, ids: Tensor, *args
                                       ) -> tuple[Tensor, ...]:
    loss, _, gt, stats = fake_sparse_divergence_fwd(student, ids, *args, False, args[-1])
    return loss, gt, stats


def fake_sparse_divergence_bwd(student: Tensor, *args) -> Tensor:
    return torch.empty_like(student)


def fake_softmax_stats_fwd(x: Tensor, labels: Tensor | None, *args) -> tuple[Tensor, ...]:
    entropy = args[-1]
    n, f32 = x.shape[0], dict(dtype=loss_dtype(x.dtype))
    return (x.new_empty(n, **f32), x.new_empty(n if entropy else 0, **f32),
            x.new_empty(n if labels is not None else 0, **f32))


def fake_softmax_stats_bwd(x: Tensor, *args) -> Tensor:
    return torch.empty_like(x)


def fake_topk_logprobs_fwd(x: Tensor, k: int, *args) -> tuple[Tensor, Tensor, Tensor]:
    ctype = loss_dtype(x.dtype)
    n = x.shape[0]
    return (x.new_empty(n, k, dtype=torch.int64), x.new_empty(n, k, dtype=ctype),
            x.new_empty(n, 2, dtype=ctype))


# The fake of each op of the record, by field name (fdiv_kernels.core._ops.SoftmaxOps).
FAKES = {
    "divergence_fwd": fake_divergence_fwd,
    "divergence_partials": fake_divergence_partials,
    "divergence_grads": fake_divergence_grads,
    "lse_combination_fwd": fake_lse_combination_fwd,
    "sparse_divergence_fwd": fake_sparse_divergence_fwd,
    "sparse_divergence_fwd_inplace": fake_sparse_divergence_fwd_inplace,
    "sparse_divergence_bwd": fake_sparse_divergence_bwd,
    "softmax_stats_fwd": fake_softmax_stats_fwd,
    "softmax_stats_bwd": fake_softmax_stats_bwd,
    "topk_logprobs_fwd": fake_topk_logprobs_fwd,
}
