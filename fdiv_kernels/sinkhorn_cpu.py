"""The Sinkhorn ops of the cpu backend, registered on import (needs fdiv_kernels._C built with
csrc/cpu/sinkhorn.cpp):

    fdiv::sinkhorn_lse_cpu   the batched row/column LSE update (C++, cost on the fly or dense)
    fdiv::sinkhorn_fwd_cpu   the solve loop of ``sinkhorn_core`` around it
"""

from __future__ import annotations

import types

import torch

import fdiv_kernels._C  # noqa: F401  (defines torch.ops.fdiv.sinkhorn_lse_cpu)
from fdiv_kernels.sinkhorn_torch import register_fwd, register_lse_fake

if hasattr(torch.ops.fdiv, "sinkhorn_lse_cpu") and not hasattr(torch.ops.fdiv, "sinkhorn_fwd_cpu"):
    # register_lse_fake wants an object with .register_fake (a custom_op): the C++ op's stands in.
    register_lse_fake(types.SimpleNamespace(
        register_fake=torch.library.register_fake("fdiv::sinkhorn_lse_cpu")))

    def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
        return torch.ops.fdiv.sinkhorn_lse_cpu(x, y, cost, h, eps_inv, kind, transpose, active)

    register_fwd("cpu", _lse)
