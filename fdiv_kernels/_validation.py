"""Argument checks shared by the functional API: one clear error per bad input, before dispatch."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean")


def check_logits(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point logits, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V) with at least one dim, got a scalar")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student_logits and teacher_logits must share the vocabulary size, got "
            f"V={student.shape[-1]} and V={teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on one device, got {student.device} "
            f"and {teacher.device}"
        )


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # Comparisons, not math.isfinite: they also trace on a symbolic float (torch.compile with
    # dynamic=True); NaN fails both.
    if not -math.inf < v < math.inf or (positive and v <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {v}")
    return v


def row_mask(labels: object, ignore_index: object, lead_shape: torch.Size, device) -> Tensor | None:
    """Bool mask of kept rows from ``labels != ignore_index`` (None when no labels)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead_shape)}, got "
            f"{tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")
    return labels.reshape(-1) != ignore_index


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def reduce_rows(
    loss: Tensor, valid: Tensor | None, reduction: str, lead_shape: torch.Size,
    num_items_in_batch: object,
) -> Tensor:
    """Reduce per-row losses; 'mean' divides by the kept rows (or num_items_in_batch), 0 if none."""
    if reduction == "none":
        return loss.reshape(lead_shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
        return total / check_real("num_items_in_batch", num_items_in_batch, positive=True)
    count = loss.new_tensor(loss.numel()) if valid is None else valid.sum().to(loss.dtype)
    return total / count.clamp(min=1)  # all rows ignored: 0 / 1 = 0, not NaN
