"""The cpu backend: the C++ kernels of ``fdiv_kernels._C`` (csrc/cpu/), as one record.

The schemas and CPU kernels are defined in C++ (``TORCH_LIBRARY(fdiv, m)``); importing the
extension registers them as ``torch.ops.fdiv.*_cpu``, and this module declares them.
"""

import torch

import fdiv_kernels._C  # noqa: F401  (registers torch.ops.fdiv.*_cpu)
from fdiv_kernels.core._ops import SoftmaxOps, register

# The Sinkhorn ops of the C++ extension and their fakes (the transport family's own record).
from fdiv_kernels.transport import _ops_cpu as _sinkhorn_cpu  # noqa: F401
from fdiv_kernels.transport import _unrolled as _sinkhorn_unrolled  # noqa: F401

fdiv = torch.ops.fdiv
register(SoftmaxOps(
    "cpu",
    divergence_fwd=fdiv.divergence_fwd_cpu,
    lse_combination_fwd=fdiv.lse_combination_fwd_cpu,
    sparse_divergence_fwd=fdiv.sparse_divergence_fwd_cpu,
    sparse_divergence_fwd_inplace=fdiv.sparse_divergence_fwd_inplace_cpu,
    sparse_divergence_bwd=fdiv.sparse_divergence_bwd_cpu,
    softmax_stats_fwd=fdiv.softmax_stats_fwd_cpu,
    softmax_stats_bwd=fdiv.softmax_stats_bwd_cpu,
    topk_logprobs_fwd=fdiv.topk_logprobs_fwd_cpu,
))
