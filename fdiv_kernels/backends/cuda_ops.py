"""The cuda backend: the CUDA C++ kernels of ``fdiv_kernels._C`` (csrc/cuda/), as one record.

They exist only when the extension was built against a CUDA torch with nvcc (the C++ side declares
the ``*_cuda`` schemas in that build alone); a CPU-only build registers no record, and the dispatch
says why. The kernels do not fuse the logit transforms yet (declared below).
"""

import torch

import fdiv_kernels._C  # noqa: F401  (registers torch.ops.fdiv.*_cuda in a CUDA build)
from fdiv_kernels.core._ops import SoftmaxOps, register

fdiv = torch.ops.fdiv
if hasattr(fdiv, "divergence_fwd_cuda"):  # the one build-time question: was csrc/cuda compiled
    register(SoftmaxOps(
        "cuda",
        divergence_fwd=fdiv.divergence_fwd_cuda,
        softmax_stats_fwd=fdiv.softmax_stats_fwd_cuda,
        softmax_stats_bwd=fdiv.softmax_stats_bwd_cuda,
        fuses_transforms=False,
    ))
