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

from fdiv_kernels import _validation as V
from fdiv_kernels.dispatch import select
from fdiv_kernels._kinds import KernelSpec, resolve
from fdiv_kernels._softmax_stats import SoftmaxStatsFunction


def row_lse(logits: Tensor, temperature: float = 1.0, *, backend: str = "auto") -> Tensor:
    """Phase 1: log sum exp(logits / T) over this shard's columns, per row (float32)."""
    x = V.check_logits("logits", logits).reshape(-1, logits.shape[-1]).contiguous()
    inv_t = 1.0 / V.check_real("temperature", temperature, positive=True)
    name = select(backend, x, "softmax_stats_fwd")
    with torch.no_grad():
        return SoftmaxStatsFunction.apply(x, None, -100, inv_t, False, name)[0]


def combine_lse(shard_lse: Tensor) -> Tensor:
    """Combine: the row LSE of the whole vocabulary from the shards' LSEs, shape (shards, N)."""
    return torch.logsumexp(shard_lse, dim=0)


def _prepare(student, teacher, kind, beta, alpha, lam, temperature, valid, backend, phase):
    """Checks and flattening shared by the phases; returns (op, s, t, valid, spec, inv_t)."""
    V.check_pair(student, teacher)
    spec: KernelSpec = resolve(kind, beta, alpha, lam)
    inv_t = 1.0 / V.check_real("temperature", temperature, positive=True)
    s = student.reshape(-1, student.shape[-1]).contiguous()
    t = teacher.reshape(-1, teacher.shape[-1]).contiguous()
    keep = (torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if valid is None
            else valid.reshape(-1))
    op = f"divergence_{phase}"
    op = getattr(torch.ops.fdiv, f"{op}_{select(backend, s, op)}")
    return op, s, t, keep, spec, inv_t


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
    return op(s, t, keep, lse_student, lse_teacher, spec.base, spec.swap, spec.param, inv_t)


def grads(
    student: Tensor, teacher: Tensor, lse_student: Tensor, lse_teacher: Tensor, sums: Tensor,
    kind: str = "kl", *, beta: float | None = None, alpha: float | None = None,
    lam: float | None = None, temperature: float = 1.0, valid: Tensor | None = None,
    grad_student: bool = True, grad_teacher: bool = False, backend: str = "auto",
) -> tuple[Tensor | None, Tensor | None]:
    """Phase 3: d loss_row / d logits for this shard's columns, from the all-reduced ``sums``."""
    op, s, t, keep, spec, inv_t = _prepare(student, teacher, kind, beta, alpha, lam, temperature,
                                           valid, backend, "grads")
    gs, gt = op(s, t, keep, lse_student, lse_teacher, sums, spec.base, spec.swap, spec.param,
                inv_t, grad_student, grad_teacher)
    return (gs.reshape(student.shape) if grad_student else None,
            gt.reshape(teacher.shape) if grad_teacher else None)
