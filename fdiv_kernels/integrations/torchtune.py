"""torchtune's knowledge-distillation losses with its conventions, on fdiv_kernels.

Same constructors and calls as ``torchtune.modules.loss`` (torchtune 0.6.1,
``torchtune/modules/loss/kd_losses.py``); torchtune itself is not needed. Conventions kept:

- its "forward KL" is the cross-entropy to the teacher, -sum p log q = KL(p||q) + H(p), not
  KL(p||q) (computed as ``fk.divergence(kind="kl")`` plus the teacher's ``fk.entropy``, so no
  (N, V) temporary either way); its "reverse KL" is KL(q||p);
- logits are (N, V) or (B, T, V) and ``labels`` any shape with as many elements as rows; the loss
  is summed over rows whose label is not ``ignore_index`` and divided by their count (0 when
  none), or only summed with ``normalize=False``; the loss is float32;
- the chunked-output variants take lists of (B, T_i, V) chunks and ``labels`` (B, T), split by
  the chunks' widths (so both ``.chunk`` (0.6.1) and ``.tensor_split`` (later) chunkings work).

One difference: where the student has a -inf logit and the teacher gives that entry mass,
torchtune drops the term (its ``inf_mask``) while fk returns the true value, +inf.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

import fdiv_kernels as fk

__all__ = [
    "ForwardKLLoss", "ForwardKLWithChunkedOutputLoss", "ForwardKLWithHiddenStatesLoss",
    "ReverseKLLoss", "ReverseKLWithChunkedOutputLoss", "ReverseKLWithHiddenStatesLoss",
    "SymmetricKLLoss", "SymmetricKLWithChunkedOutputLoss", "SymmetricKLWithHiddenStatesLoss",
]


def _rows_sum(kind: str, student: Tensor, teacher: Tensor, labels: Tensor, ignore_index: int,
              ) -> tuple[Tensor, Tensor]:
    """(sum over kept rows of torchtune's per-row loss, number of kept rows)."""
    vocab = student.shape[-1]
    s, t = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    flat = labels.reshape(-1)
    rows = fk.divergence(s, t, "reverse_kl" if kind == "reverse" else "kl", labels=flat,
                         ignore_index=ignore_index, reduction="none")
    if kind == "forward":
        # Cross-entropy = KL(p||q) + H(p); the teacher's entropy only at kept rows.
        rows = rows + torch.where(flat != ignore_index, fk.entropy(t).to(rows.dtype), 0.0)
    return rows.sum(), (flat != ignore_index).sum()


def _normalized(total: Tensor, count: Tensor, normalize: bool = True) -> Tensor:
    # torchtune returns 0 when no row is kept; clamping the count gives that without a host sync.
    return total / count.clamp_min(1) if normalize else total


class ForwardKLLoss(nn.Module):
    r"""torchtune's ``ForwardKLLoss``: -sum_j p_j log q_j per row (cross-entropy to the teacher).

    Args:
        ignore_index: label value of rows that add nothing (and do not count).
        student_logits, teacher_logits: (..., V) logits of the two models (``forward``).
        labels: ids of the leading shape, used only to mask rows.
        normalize: divide by the number of kept rows (torchtune's default), else the sum.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                normalize: bool = True) -> Tensor:
        return _normalized(*_rows_sum("forward", student_logits, teacher_logits, labels,
                                      self.ignore_index), normalize)


class ReverseKLLoss(nn.Module):
    r"""torchtune's ``ReverseKLLoss``: KL(q||p) = sum_j q_j (log q_j - log p_j) per row.

    Args:
        ignore_index: label value of rows that add nothing (and do not count).
        student_logits, teacher_logits: (..., V) logits of the two models (``forward``).
        labels: ids of the leading shape, used only to mask rows.
        normalize: divide by the number of kept rows (torchtune's default), else the sum.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                normalize: bool = True) -> Tensor:
        return _normalized(*_rows_sum("reverse", student_logits, teacher_logits, labels,
                                      self.ignore_index), normalize)


class SymmetricKLLoss(nn.Module):
    r"""torchtune's ``SymmetricKLLoss``: r ForwardKL + (1 - r) ReverseKL, r = ``sym_kd_ratio``.

    Args:
        ignore_index: label value of rows that add nothing (and do not count).
        student_logits, teacher_logits: (..., V) logits of the two models (``forward``).
        labels: ids of the leading shape, used only to mask rows.
        normalize: divide by the number of kept rows (torchtune's default), else the sum.
    """

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100) -> None:
        super().__init__()
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.sym_kd_ratio, self.ignore_index = sym_kd_ratio, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                normalize: bool = True) -> Tensor:
        fwd, count = _rows_sum("forward", student_logits, teacher_logits, labels,
                               self.ignore_index)
        rev, _ = _rows_sum("reverse", student_logits, teacher_logits, labels, self.ignore_index)
        r = self.sym_kd_ratio
        return r * _normalized(fwd, count, normalize) + (1 - r) * _normalized(rev, count, normalize)


class _Chunked(nn.Module):
    kinds: tuple[str, ...] = ()

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100) -> None:
        super().__init__()
        self.num_output_chunks, self.ignore_index = num_output_chunks, ignore_index

    def _weights(self) -> tuple[float, ...]:
        return (1.0,)

    def forward(self, student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor],
                labels: Tensor) -> Tensor:
        if len(student_logits) != len(teacher_logits):
            raise ValueError(f"student_logits and teacher_logits must hold as many chunks, got "
                             f"{len(student_logits)} and {len(teacher_logits)}")
        # The labels follow the given chunks' widths, whichever split made them: torchtune 0.6
        # chunks with .chunk, later versions with .tensor_split (widths differ when T % n != 0).
        widths = [c.shape[1] if c.dim() == 3 else -1 for c in student_logits]
        if -1 in widths or sum(widths) != labels.shape[-1]:
            raise ValueError(
                f"student_logits and teacher_logits must be chunks (B, T_i, V) of the labels' "
                f"(B, T) = {tuple(labels.shape)} along dim 1, got chunks of shapes "
                f"{[tuple(c.shape) for c in student_logits]}")
        label_chunks = labels.split(widths, dim=1)
        total = 0.0
        for kind, w in zip(self.kinds, self._weights()):
            for s, t, lab in zip(student_logits, teacher_logits, label_chunks):
                part, _ = _rows_sum(kind, s, t, lab, self.ignore_index)
                total = total + w * part
        count = (labels != self.ignore_index).sum()
        return _normalized(total, count)


class ForwardKLWithChunkedOutputLoss(_Chunked):
    """torchtune's ``ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``."""

    kinds = ("forward",)


class ReverseKLWithChunkedOutputLoss(_Chunked):
    """torchtune's ``ReverseKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``."""

    kinds = ("reverse",)


class SymmetricKLWithChunkedOutputLoss(_Chunked):
    """torchtune's ``SymmetricKLWithChunkedOutputLoss(num_output_chunks=8, sym_kd_ratio=0.5,
    ignore_index=-100)``."""

    kinds = ("forward", "reverse")

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5,
                 ignore_index: int = -100) -> None:
        super().__init__(num_output_chunks, ignore_index)
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.sym_kd_ratio = sym_kd_ratio

    def _weights(self) -> tuple[float, ...]:
        return (self.sym_kd_ratio, 1.0 - self.sym_kd_ratio)


class _HiddenStates(nn.Module):
    kinds: tuple[str, ...] = ()

    def __init__(self, ignore_index: int = -100, chunk_size: int | None = None) -> None:
        super().__init__()
        self.ignore_index, self.chunk_size = ignore_index, chunk_size

    def _weights(self) -> tuple[float, ...]:
        return (1.0,)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        hs = student_hidden.reshape(-1, student_hidden.shape[-1])
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        wt = teacher_weight.detach()
        flat = labels.reshape(-1)
        if flat.numel() != hs.shape[0]:
            raise ValueError(f"labels must hold one label per row of the hidden states "
                             f"({hs.shape[0]}), got {tuple(labels.shape)}")
        kept = flat != self.ignore_index
        total = 0.0
        for kind, w in zip(self.kinds, self._weights()):
            part = fk.fused_linear_divergence(
                hs, student_weight, ht, wt, "reverse_kl" if kind == "reverse" else "kl",
                labels=flat, ignore_index=self.ignore_index, reduction="sum",
                chunk_size=self.chunk_size)
            if kind == "forward":
                # torchtune's forward KL is the cross-entropy to the teacher: + H(p) per kept row,
                # from the teacher's hidden states in chunks (its logits never formed either).
                with torch.no_grad():
                    _, ent = fk.fused_linear_token_logprobs(
                        ht, wt, flat, ignore_index=self.ignore_index, return_entropy=True,
                        chunk_size=self.chunk_size)
                part = part + torch.where(kept, ent.to(part.dtype), 0.0).sum()
            total = total + w * part
        return _normalized(total, kept.sum(), normalize)


class ForwardKLWithHiddenStatesLoss(_HiddenStates):
    r"""torchtune's ``ForwardKLWithChunkedOutputLoss`` from hidden states: the same loss without
    the (N, V) logits of either model (``fk.fused_linear_divergence``).

    ``loss(student_hidden (B, T, H_s), student_weight (V, H_s), teacher_hidden (B, T, H_t),
    teacher_weight (V, H_t), labels (B, T), normalize=True)``: per kept row -sum_j p_j log q_j,
    p = softmax(h_t W_t^T), q = softmax(h_s W_s^T), summed over rows whose label is not
    ``ignore_index`` / their count (0 when none), float32. The output projections are the
    models' ``output`` weights (torchtune's have no bias). Gradients reach the student's hidden
    states and weight; the teacher gets none (the recipes run it under no_grad).
    """

    kinds = ("forward",)


class ReverseKLWithHiddenStatesLoss(_HiddenStates):
    """torchtune's ``ReverseKLWithChunkedOutputLoss`` (KL(q||p)) from hidden states; arguments
    as :class:`ForwardKLWithHiddenStatesLoss`."""

    kinds = ("reverse",)


class SymmetricKLWithHiddenStatesLoss(_HiddenStates):
    """torchtune's ``SymmetricKLWithChunkedOutputLoss`` (r forward + (1 - r) reverse) from hidden
    states, r = ``sym_kd_ratio`` in [0, 1]; ``ignore_index`` and ``chunk_size`` (rows per chunk
    of the fused form) and the call as :class:`ForwardKLWithHiddenStatesLoss`."""

    kinds = ("forward", "reverse")

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100,
                 chunk_size: int | None = None) -> None:
        super().__init__(ignore_index, chunk_size)
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.sym_kd_ratio = sym_kd_ratio

    def _weights(self) -> tuple[float, ...]:
        return (self.sym_kd_ratio, 1.0 - self.sym_kd_ratio)
