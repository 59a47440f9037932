"""The ground costs of a Sinkhorn problem: from a dense (B, n, m) tensor or computed on the fly
from point clouds x (B, n, d), y (B, m, d), one (B, rows, m) block at a time."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fdiv_kernels.core._ids import COSINE, DOT, EUCLIDEAN, L1, SQEUCLIDEAN
from fdiv_kernels.core._rows import row_chunks

# The cost kinds, ids shared with the C++ and Triton kernels (fdiv_kernels/_ids.py).
COST_KINDS = {"sqeuclidean": SQEUCLIDEAN, "euclidean": EUCLIDEAN, "l1": L1, "dot": DOT,
              "cosine": COSINE}
# Elements of one (B, rows, m) block: the only memory the torch paths hold beyond O(B(n + m));
# small enough to stay in cache (4x faster on CPU than 1 << 22).
CHUNK_ELEMENTS = 1 << 18


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pairwise_cost(x: Tensor, y: Tensor, kind: int) -> Tensor:
    """(B, r, m) cost between x (B, r, d) and y (B, m, d), differentiable (safe at x_i = y_j)."""
    if kind in (SQEUCLIDEAN, EUCLIDEAN):
        sq = ((x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
              - 2 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0)
        if kind == SQEUCLIDEAN:
            return sq
        # sqrt has an infinite slope at 0: where two points coincide, take the 0 subgradient.
        return torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))
    if kind == L1:
        return torch.cdist(x, y, p=1)
    if kind == DOT:
        return -torch.bmm(x, y.transpose(1, 2))
    if kind == COSINE:
        xn, yn = F.normalize(x, dim=-1, eps=1e-12), F.normalize(y, dim=-1, eps=1e-12)
        return 1 - torch.bmm(xn, yn.transpose(1, 2))
    raise ValueError(f"unknown cost kind {kind}")


def cost_rows(x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], rows: slice,
              kind: int, ctype: torch.dtype, transpose: bool = False) -> Tensor:
    """Rows ``rows`` of the (B, n, m) cost (of its transpose when ``transpose``), in ``ctype``."""
    if cost is not None:
        c = cost.transpose(1, 2) if transpose else cost
        return c[:, rows].to(ctype)
    return pairwise_cost(x[:, rows].to(ctype), y.to(ctype), kind)


def max_finite_cost(x: Optional[Tensor], y: Optional[Tensor], cost: Optional[Tensor], kind: int,
                    ctype: torch.dtype) -> Tensor:
    """Per-problem largest |C_ij| over the finite entries (B,): the top of the eps-scaling
    schedule. An infinite entry is a forbidden pair, not a scale; a NaN one leaves the problem
    NaN, which its solve then reports as not converged."""
    def finite_max(c: Tensor) -> Tensor:
        c = c.abs()
        return torch.where(torch.isfinite(c), c, torch.zeros_like(c)).amax((1, 2))

    with torch.no_grad():
        if cost is not None:
            return finite_max(cost.to(ctype))
        B, n = x.shape[:2]
        out = torch.zeros(B, dtype=ctype, device=x.device)
        for rows in row_chunks(n, B * y.shape[1], CHUNK_ELEMENTS):
            out = torch.maximum(out, finite_max(cost_rows(x, y, None, rows, kind, ctype)))
        return out
