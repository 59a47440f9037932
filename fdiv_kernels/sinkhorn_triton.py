"""The Sinkhorn ops of the triton backend, registered on import (imports Triton):

    fdiv::sinkhorn_lse_triton   the batched row/column LSE update, cost on the fly
    fdiv::sinkhorn_fwd_triton   the solve loop of ``sinkhorn_core`` around it

``custom_op`` (not ``triton_op``) so fake-tensor tracing also works under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from fdiv_kernels.sinkhorn_torch import register_fwd, register_lse_fake
from fdiv_kernels.triton_kernels.sinkhorn import sinkhorn_lse


def _on(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("fdiv::sinkhorn_lse_triton", mutates_args=())
def sinkhorn_lse_triton(
    x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], h: Tensor,
    eps_inv: Tensor, kind: int, transpose: bool, active: Optional[Tensor],
) -> Tensor:
    with _on(h):
        return sinkhorn_lse(x, y, cost, h, eps_inv, kind, transpose, active)


register_lse_fake(sinkhorn_lse_triton)


def _lse(x, y, cost, h, eps_inv, kind, transpose, active):
    with _on(h):
        return sinkhorn_lse(x, y, cost, h, eps_inv, kind, transpose, active)


register_fwd("triton", _lse)
