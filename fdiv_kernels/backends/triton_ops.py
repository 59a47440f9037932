"""The triton backend: the Triton launchers registered as ``fdiv::*_triton`` ops, as one record.

``custom_op`` (not ``triton_op``) so fake-tensor tracing also works under TRITON_INTERPRET=1.
Each op takes its schema from ``fdiv_kernels.core._ops.SCHEMAS``; the registered function only
moves to the tensors' GPU and hands the launcher contiguous tensors. Importing this module imports
Triton; the dispatch only does so when Triton is installed.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from fdiv_kernels.core._ops import SoftmaxOps, define, register
from fdiv_kernels.transport import _ops_triton as _sinkhorn_triton  # noqa: F401  (Sinkhorn ops)
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
from fdiv_kernels.triton_kernels.topk_logprobs import topk_logprobs_fwd


def _on(x: Tensor):
    """Launch on the tensors' GPU, not whichever is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _op(op: str, launch: Callable) -> Callable:
    """``fdiv::<op>_triton``: ``launch`` on the first tensor's device, tensors made contiguous."""

    def run(*args):
        with _on(args[0]):
            return launch(*(a.contiguous() if isinstance(a, Tensor) else a for a in args))

    run.__name__ = f"{op}_triton"
    return define(op, "triton", run)


def _sparse_bwd(student, ids, teacher, support, valid, stats, grad_loss, *rest):
    # The kernel reads the per-row statistics and the incoming gradient in fp32.
    return sparse_divergence_bwd(student, ids, teacher, support, valid, stats.float(),
                                 grad_loss.float(), *rest)


register(SoftmaxOps(
    "triton",
    divergence_fwd=_op("divergence_fwd", divergence_fwd),
    divergence_partials=_op("divergence_partials", divergence_partials),
    divergence_grads=_op("divergence_grads", divergence_grads),
    lse_combination_fwd=_op("lse_combination_fwd", lse_combination_fwd),
    sparse_divergence_fwd=_op("sparse_divergence_fwd", sparse_divergence_fwd),
    sparse_divergence_bwd=_op("sparse_divergence_bwd", _sparse_bwd),
    softmax_stats_fwd=_op("softmax_stats_fwd", softmax_stats_fwd),
    softmax_stats_bwd=_op("softmax_stats_bwd", softmax_stats_bwd),
    topk_logprobs_fwd=_op("topk_logprobs_fwd", topk_logprobs_fwd),
    # The dense divergence kernels take a custom kind's @triton.jit generator as constexprs; the
    # sparse-teacher kernels compile their kinds in.
    custom_kind_ops=("divergence_fwd", "divergence_partials", "divergence_grads"),
    custom_kinds_need_jit=True,
))
