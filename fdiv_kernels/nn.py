"""``nn.Module`` forms of the functional API."""

from __future__ import annotations

from torch import Tensor, nn

from fdiv_kernels.divergence import divergence
from fdiv_kernels.divergences import resolve


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
