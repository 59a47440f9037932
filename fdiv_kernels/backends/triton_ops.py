"""The triton backend: the Triton launchers registered as ``fdiv::*_triton`` ops.

``custom_op`` (not ``triton_op``) so fake-tensor tracing also works under TRITON_INTERPRET=1.
Importing this module imports Triton; the dispatch only does so when Triton is installed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fdiv_kernels.transport import _ops_triton as _sinkhorn_triton  # noqa: F401  (fdiv::sinkhorn_*_triton)
from fdiv_kernels.core._ops import SoftmaxOps, register
from fdiv_kernels.triton_kernels.divergence import (
    divergence_fwd,
    divergence_grads,
    divergence_partials,
)
from fdiv_kernels.triton_kernels.lse_combination import lse_combination_fwd
from fdiv_kernels.triton_kernels.softmax_stats import softmax_stats_bwd, softmax_stats_fwd
from fdiv_kernels.triton_kernels.sparse_divergence import (
    sparse_divergence_bwd,
    sparse_divergence_fwd,
)


def _on(x: Tensor):
    """Launch on the tensors' GPU, not whichever is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("fdiv::divergence_fwd_triton", mutates_args=())
def divergence_fwd_triton(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, student_scale: float, student_softcap: float, teacher_scale: float,
    teacher_softcap: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _on(student):
        return divergence_fwd(
            student.contiguous(), teacher.contiguous(), valid.contiguous(), base, swap, param,
            inv_temperature, student_scale, student_softcap, teacher_scale, teacher_softcap,
            grad_student, grad_teacher,
        )


@torch.library.custom_op("fdiv::divergence_partials_triton", mutates_args=())
def divergence_partials_triton(
    student: Tensor, teacher: Tensor, valid: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    base: int, swap: bool, param: float, inv_temperature: float,
) -> Tensor:
    with _on(student):
        return divergence_partials(
            student.contiguous(), teacher.contiguous(), valid.contiguous(),
            lse_student.contiguous(), lse_teacher.contiguous(), base, swap, param, inv_temperature,
        )


@torch.library.custom_op("fdiv::divergence_grads_triton", mutates_args=())
def divergence_grads_triton(
    student: Tensor, teacher: Tensor, valid: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    sums: Tensor, base: int, swap: bool, param: float, inv_temperature: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor]:
    with _on(student):
        return divergence_grads(
            student.contiguous(), teacher.contiguous(), valid.contiguous(),
            lse_student.contiguous(), lse_teacher.contiguous(), sums.contiguous(), base, swap,
            param, inv_temperature, grad_student, grad_teacher,
        )


@torch.library.custom_op("fdiv::softmax_stats_fwd_triton", mutates_args=())
def softmax_stats_fwd_triton(
    x: Tensor, labels: Tensor | None, ignore_index: int, inv_temperature: float, scale: float,
    softcap: float, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with _on(x):
        return softmax_stats_fwd(x.contiguous(), labels, ignore_index, inv_temperature, scale,
                                 softcap, entropy)


@torch.library.custom_op("fdiv::softmax_stats_bwd_triton", mutates_args=())
def softmax_stats_bwd_triton(
    x: Tensor, labels: Tensor | None, lse: Tensor, entropy: Tensor, g_lse: Tensor | None,
    g_entropy: Tensor | None, g_logprob: Tensor | None, ignore_index: int, inv_temperature: float,
    scale: float, softcap: float,
) -> Tensor:
    with _on(x):
        return softmax_stats_bwd(
            x.contiguous(), labels, lse, entropy, g_lse, g_entropy, g_logprob, ignore_index,
            inv_temperature, scale, softcap,
        )


# ---- sparse (top-k) teacher: fk.sparse_divergence ------------------------------------------


@torch.library.custom_op("fdiv::sparse_divergence_fwd_triton", mutates_args=())
def sparse_divergence_fwd_triton(
    student: Tensor, ids: Tensor, teacher: Tensor, support: Tensor, valid: Tensor, base: int,
    swap: bool, param: float, inv_temperature: float, tail: int, teacher_alpha: float,
    mass_slack: float, logit_scale: float, softcap: float, grad_student: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _on(student):
        return sparse_divergence_fwd(
            student.contiguous(), ids.contiguous(), teacher.contiguous(), support.contiguous(),
            valid.contiguous(), base, swap, param, inv_temperature, tail, teacher_alpha,
            mass_slack, logit_scale, softcap, grad_student, grad_teacher,
        )


@torch.library.custom_op("fdiv::sparse_divergence_bwd_triton", mutates_args=())
def sparse_divergence_bwd_triton(
    student: Tensor, ids: Tensor, teacher: Tensor, support: Tensor, valid: Tensor, stats: Tensor,
    grad_loss: Tensor, base: int, swap: bool, param: float, inv_temperature: float, tail: int,
    teacher_alpha: float, logit_scale: float, softcap: float,
) -> Tensor:
    with _on(student):
        return sparse_divergence_bwd(
            student.contiguous(), ids.contiguous(), teacher.contiguous(), support.contiguous(),
            valid.contiguous(), stats.float().contiguous(), grad_loss.float().contiguous(), base,
            swap, param, inv_temperature, tail, teacher_alpha, logit_scale, softcap,
        )


# ---- fk.divergence(kind="cauchy_schwarz" / "renyi"): weighted per-row log-sum-exps ----------


@torch.library.custom_op("fdiv::lse_combination_fwd_triton", mutates_args=())
def lse_combination_fwd_triton(
    student: Tensor, teacher: Tensor, valid: Tensor, coeffs: list[float], inv_temperature: float,
    student_scale: float, student_softcap: float, teacher_scale: float, teacher_softcap: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with _on(student):
        return lse_combination_fwd(
            student.contiguous(), teacher.contiguous(), valid.contiguous(), coeffs,
            inv_temperature,
            student_scale, student_softcap, teacher_scale, teacher_softcap, grad_student,
            grad_teacher,
        )


register(SoftmaxOps(
    "triton",
    divergence_fwd=divergence_fwd_triton,
    divergence_partials=divergence_partials_triton,
    divergence_grads=divergence_grads_triton,
    lse_combination_fwd=lse_combination_fwd_triton,
    sparse_divergence_fwd=sparse_divergence_fwd_triton,
    sparse_divergence_bwd=sparse_divergence_bwd_triton,
    softmax_stats_fwd=softmax_stats_fwd_triton,
    softmax_stats_bwd=softmax_stats_bwd_triton,
    # The dense divergence kernels take a custom kind's @triton.jit generator as constexprs; the
    # sparse-teacher kernels compile their kinds in.
    custom_kind_ops=("divergence_fwd", "divergence_partials", "divergence_grads"),
    custom_kinds_need_jit=True,
))
