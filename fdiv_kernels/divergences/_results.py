"""``DivergenceStats``: the training statistics ``return_stats=True`` hands back with a loss."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class DivergenceStats(NamedTuple):
    """Detached side outputs of one :func:`fk.divergence` / :func:`fk.fused_linear_divergence`
    call, computed in the same pass as the loss (nothing is read twice, nothing syncs the host).

    entropy_sum: 0-dim float32 (float64 for float64 inputs): sum over kept rows of the student's
        entropy -sum_j q_j log q_j, q = softmax(transformed student logits / T).
    num_rows: 0-dim int64: the number of kept rows (labels != ignore_index).
    soft_loss: the divergence part, reduced as the loss is (for ``ce_weight = w`` the loss is
        (1 - w) soft_loss + w hard_loss).
    hard_loss: the cross-entropy part reduced likewise; None when ``ce_weight == 0`` (and always
        for :func:`fk.divergence`).
    """

    entropy_sum: Tensor
    num_rows: Tensor
    soft_loss: Tensor
    hard_loss: Tensor | None


__all__ = ["DivergenceStats"]
