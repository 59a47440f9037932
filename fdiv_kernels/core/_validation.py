"""Argument checks shared by the functional API: one clear error per bad input, before dispatch."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean")


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-row results: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_float_rows(name: str, x: object) -> Tensor:
    """A floating point tensor of shape (..., V) (any V, any number of rows)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point logits, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V) with at least one dim, got a scalar")
    return x


def check_logits(name: str, x: object) -> Tensor:
    check_float_rows(name, x)
    if x.shape[-1] == 0:
        # Zero rows are a valid (empty) batch; a zero-width row has no softmax.
        raise ValueError(f"{name} must have a non-empty last dim (V >= 1), got shape "
                         f"{tuple(x.shape)}")
    return x


def check_vocab_size(vocab_size: object, widths: dict[str, int]) -> int | None:
    """The ``vocab_size`` of ops whose inputs may be padded to different widths (Qwen-style
    vocabularies: 151936 vs 152064 columns): None (every width equal) or an int in
    [1, min(widths)]; mismatched widths without it raise, naming both and the argument."""
    if vocab_size is None:
        if len(set(widths.values())) > 1:
            given = ", ".join(f"{name} has {w}" for name, w in widths.items())
            raise ValueError(
                f"vocabulary widths differ ({given}): pass vocab_size= (the tokenizer's size) "
                "so that only the first vocab_size columns take part and the padding columns "
                "are excluded"
            )
        return None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    narrowest = min(widths.values())
    if not 1 <= vocab_size <= narrowest:
        given = ", ".join(f"{name} has {w}" for name, w in widths.items())
        raise ValueError(f"vocab_size must be in [1, {narrowest}] ({given}), got {vocab_size}")
    return int(vocab_size)


def check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student_logits and teacher_logits must share the vocabulary size, got "
            f"V={student.shape[-1]} and V={teacher.shape[-1]} (pass vocab_size= for "
            "vocabularies padded to different widths)"
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
        what = "a finite positive" if positive else "a finite"
        raise ValueError(f"{name} must be {what} number, got {v}")
    return v


# The reciprocal 1/T must stay finite in the dtype the kernels compute in (float32 for every
# input but float64): 1/T = inf turns every logit into +-inf or NaN.
def check_temperature(value: object, compute_dtype: torch.dtype = torch.float32) -> float:
    """1 / temperature, after checking T is finite, positive and >= 1 / finfo(compute).max."""
    t = check_real("temperature", value, positive=True)
    ct = torch.promote_types(compute_dtype, torch.float32)
    lo = 1.0 / torch.finfo(ct).max
    if t < lo:
        raise ValueError(
            f"temperature must be in [{lo:.4g}, inf) for {ct} computation (its reciprocal "
            f"must be finite), got {t:g}"
        )
    return 1.0 / t


# Labels are compared with ignore_index; the kernels read int32 or int64.
LABEL_DTYPES = (torch.int32, torch.int64)


def check_labels(labels: object, ignore_index: object, lead_shape: torch.Size, device) -> Tensor:
    """Checked labels as int32/int64 (narrower integer dtypes widened to int64, never wrapped)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
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
    if labels.dtype not in LABEL_DTYPES:
        # uint8 cannot hold -100: comparing in it would wrap ignore_index to 156 and silently
        # drop the rows labelled 156. Widen what can hold ignore_index; reject the rest.
        info = torch.iinfo(labels.dtype)
        if not info.min <= int(ignore_index) <= info.max:
            raise TypeError(
                f"labels of dtype {labels.dtype} cannot hold ignore_index={int(ignore_index)}; "
                f"pass int64 or int32 labels"
            )
        labels = labels.to(torch.int64)
    elif not torch.iinfo(labels.dtype).min <= int(ignore_index) <= torch.iinfo(labels.dtype).max:
        labels = labels.to(torch.int64)
    return labels


def row_mask(labels: object, ignore_index: object, lead_shape: torch.Size, device) -> Tensor | None:
    """Bool mask of kept rows from ``labels != ignore_index`` (None when no labels)."""
    if labels is None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        return None
    labels = check_labels(labels, ignore_index, lead_shape, device)
    return labels.reshape(-1) != int(ignore_index)


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_num_items(value: object) -> float | Tensor | None:
    """num_items_in_batch: None, a positive number, or a 0-d / one-element tensor (a scalar)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            # A (2,) tensor would broadcast the loss into shape (2,).
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got a tensor of "
                f"shape {tuple(value.shape)}"
            )
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"num_items_in_batch must be a real number, got dtype {value.dtype}")
        return value.reshape(())
    return check_real("num_items_in_batch", value, positive=True)


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
    num_items_in_batch = check_num_items(num_items_in_batch)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
        return total / num_items_in_batch
    count = loss.new_tensor(loss.numel()) if valid is None else valid.sum().to(loss.dtype)
    return total / count.clamp(min=1)  # all rows ignored: 0 / 1 = 0, not NaN


def full_precision(fn):
    """Run ``fn`` with autocast off on every device where it is on: an op that states its own
    precision (fp32 logits, fp32 Sinkhorn potentials) must not have autocast round its matmuls
    to 16 bits (the bf16 GEMM rounding of the logits is exactly what it promises to avoid)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for dev in ("cpu", "cuda"):
                if torch.is_autocast_enabled(dev):
                    stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)

    return wrapper
