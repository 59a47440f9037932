"""The divergence's phases as ops of their own, for a vocabulary sharded over devices.

The fused op runs three phases per row; with the vocabulary split into shards (tensor-parallel
lm heads), each shard runs them on its own columns and only per-row numbers cross devices:

    lse_s = combine_lse(all_gather(row_lse(student_shard, T)))      # phase 1 + combine
    lse_t = combine_lse(all_gather(row_lse(teacher_shard, T)))
    sums = all_reduce_sum(partials(student_shard, teacher_shard, lse_s, lse_t, ...))   # phase 2
    loss_rows = sums[:, 0]
    grad_s, grad_t = grads(student_shard, teacher_shard, lse_s, lse_t, sums, ...)      # phase 3

(``torch.distributed`` supplies the collectives; these functions never communicate.) The
gradients are those of each row's loss; scale them by the incoming per-row gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import select_ops
from fdiv_kernels.kinds._registry import KernelSpec, resolve
from fdiv_kernels.stats._softmax import SoftmaxStatsFunction


def row_lse(logits: Tensor, temperature: float = 1.0, *, backend: str = "auto") -> Tensor:
    """Phase 1: log sum exp(logits / T) over this shard's columns, per row (float32)."""
    x = V.check_logits("logits", logits).reshape(-1, logits.shape[-1]).contiguous()
    inv_t = V.check_temperature(temperature, x.dtype)
    ops = select_ops(backend, x, "softmax_stats_fwd")
    with torch.no_grad():
        return SoftmaxStatsFunction.apply(x, None, -100, inv_t, False, ops)[0]


def combine_lse(shard_lse: Tensor) -> Tensor:
    """Combine: the row LSE of the whole vocabulary from the shards' LSEs, shape (shards, N)."""
    return torch.logsumexp(shard_lse, dim=0)


def _row_tensor(name: str, x: object, shape: tuple, device, dtype: torch.dtype) -> Tensor:
    """A per-row float input (lse, sums): checked like the logits, converted to ``dtype``.

    The kernels index it by row without bounds checks (on a GPU a short one is an
    out-of-bounds read), so its shape is checked exactly.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {x.device}")
    return x.to(dtype).contiguous()


def _prepare(student, teacher, kind, beta, alpha, lam, temperature, valid, backend, phase):
    """Checks and flattening shared by the phases; returns (op, s, t, valid, spec, inv_t)."""
    V.check_logits("student", student)
    V.check_logits("teacher", teacher)
    V.check_pair(student, teacher)
    spec: KernelSpec = resolve(kind, beta, alpha, lam)
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    inv_t = V.check_temperature(temperature, dtype)
    s = student.to(dtype).reshape(-1, student.shape[-1]).contiguous()
    t = teacher.to(dtype).reshape(-1, teacher.shape[-1]).contiguous()
    if valid is None:
        keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    elif not isinstance(valid, Tensor):
        raise TypeError(f"valid must be a bool tensor or None, got {type(valid).__name__}")
    elif valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    elif valid.shape != student.shape[:-1]:
        raise ValueError(f"valid must have the logits' leading shape {tuple(student.shape[:-1])}, "
                         f"got {tuple(valid.shape)}")
    elif valid.device != s.device:
        raise ValueError(f"valid must be on the logits' device {s.device}, got {valid.device}")
    else:
        keep = valid.reshape(-1).contiguous()
    ops = select_ops(backend, s, f"divergence_{phase}", spec.base)
    op = ops.divergence_partials if phase == "partials" else ops.divergence_grads
    return op, s, t, keep, spec, inv_t


def _lses(lse_student, lse_teacher, s: Tensor) -> tuple[Tensor, Tensor]:
    shape, ct = (s.shape[0],), V.loss_dtype(s.dtype)
    return (_row_tensor("lse_student", lse_student, shape, s.device, ct),
            _row_tensor("lse_teacher", lse_teacher, shape, s.device, ct))


def partials(
    student: Tensor, teacher: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    kind: str = "kl", *, beta: float | None = None, alpha: float | None = None,
    lam: float | None = None, temperature: float = 1.0, valid: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Phase 2: per-row (sum term, sum h, sum k) over this shard's columns, shape (N, 3).

    Summed over shards, column 0 is the loss of each row.
    """
    op, s, t, keep, spec, inv_t = _prepare(student, teacher, kind, beta, alpha, lam, temperature,
                                           valid, backend, "partials")
    lse_s, lse_t = _lses(lse_student, lse_teacher, s)
    return op(s, t, keep, lse_s, lse_t, spec.base, spec.swap, spec.param, inv_t)


def grads(
    student: Tensor, teacher: Tensor, lse_student: Tensor, lse_teacher: Tensor, sums: Tensor,
    kind: str = "kl", *, beta: float | None = None, alpha: float | None = None,
    lam: float | None = None, temperature: float = 1.0, valid: Tensor | None = None,
    grad_student: bool = True, grad_teacher: bool = False, backend: str = "auto",
) -> tuple[Tensor | None, Tensor | None]:
    """Phase 3: d loss_row / d logits for this shard's columns, from the all-reduced ``sums``."""
    op, s, t, keep, spec, inv_t = _prepare(student, teacher, kind, beta, alpha, lam, temperature,
                                           valid, backend, "grads")
    lse_s, lse_t = _lses(lse_student, lse_teacher, s)
    sums = _row_tensor("sums", sums, (s.shape[0], 3), s.device, V.loss_dtype(s.dtype))
    for name, flag in (("grad_student", grad_student), ("grad_teacher", grad_teacher)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    gs, gt = op(s, t, keep, lse_s, lse_t, sums, spec.base, spec.swap, spec.param,
                inv_t, grad_student, grad_teacher)
    return (gs.reshape(student.shape) if grad_student else None,
            gt.reshape(teacher.shape) if grad_teacher else None)
