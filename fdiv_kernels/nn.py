"""``nn.Module`` forms of the functional API."""

from __future__ import annotations

from torch import Tensor, nn

from fdiv_kernels._divergence import divergence
from fdiv_kernels._kinds import resolve
from fdiv_kernels._fused_linear import fused_linear_divergence
from fdiv_kernels.transport._sinkhorn import SinkhornDistillationLoss  # noqa: F401  (fk.nn.SinkhornDistillationLoss)


class FDivergenceLoss(nn.Module):
    """``fk.divergence`` as a module: ``FDivergenceLoss(kind="js", beta=0.5)(student, teacher)``.

    Parameters are checked at construction, so a bad ``kind`` fails where it is written.
    """

    def __init__(
        self,
        kind: str = "kl",
        *,
        beta: float | None = None,
        alpha: float | None = None,
        lam: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        resolve(kind, beta, alpha, lam)
        self.kind, self.beta, self.alpha, self.lam = kind, beta, alpha, lam
        self.temperature, self.ignore_index = temperature, ignore_index
        self.reduction, self.backend = reduction, backend

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return divergence(
            student_logits, teacher_logits, self.kind, beta=self.beta, alpha=self.alpha,
            lam=self.lam, temperature=self.temperature, labels=labels,
            ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}, reduction={self.reduction!r}"


class FusedLinearDivergenceLoss(nn.Module):
    """``fk.fused_linear_divergence`` as a module, called with hidden states and lm-head weights:

    ``crit(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None)``.
    """

    def __init__(
        self,
        kind: str = "kl",
        *,
        beta: float | None = None,
        alpha: float | None = None,
        lam: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        ce_weight: float = 0.0,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        resolve(kind, beta, alpha, lam)
        self.kwargs = dict(kind=kind, beta=beta, alpha=alpha, lam=lam, temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, ce_weight=ce_weight,
                           chunk_size=chunk_size, backend=backend)

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return fused_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels=labels,
            student_bias=student_bias, teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch, **self.kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if v is not None)


class SparseDivergenceLoss(nn.Module):
    """``fk.sparse_divergence`` as a module (a top-k teacher):
    ``SparseDivergenceLoss("kl", tail="bucket")(student_logits, teacher_ids, teacher_logprobs,
    support_mask=None, labels=None, num_items_in_batch=None)``."""

    def __init__(self, kind: str = "kl", *, tail: str = "bucket", beta: float | None = None,
                 alpha: float | None = None, lam: float | None = None, temperature: float = 1.0,
                 teacher_temperature: float | None = None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        from fdiv_kernels._sparse_tails import TAILS

        resolve(kind, beta, alpha, lam)
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {sorted(TAILS)}, got {tail!r}")
        self.kind, self.tail, self.beta, self.alpha, self.lam = kind, tail, beta, alpha, lam
        self.temperature, self.teacher_temperature = temperature, teacher_temperature
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                support_mask: Tensor | None = None, labels: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None) -> Tensor:
        from fdiv_kernels._sparse_divergence import sparse_divergence

        return sparse_divergence(
            student_logits, teacher_ids, teacher_logprobs, self.kind, tail=self.tail,
            beta=self.beta, alpha=self.alpha, lam=self.lam, temperature=self.temperature,
            teacher_temperature=self.teacher_temperature, support_mask=support_mask,
            labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tail={self.tail!r}, temperature={self.temperature}"
