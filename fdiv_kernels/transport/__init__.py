"""Batched entropic optimal transport (Sinkhorn): public ``sinkhorn``, ``sinkhorn_divergence``,
``SinkhornResult``; the solver, autograd and per-backend ops live in the private modules beside this
one."""

from fdiv_kernels.transport._sinkhorn import SinkhornResult, sinkhorn, sinkhorn_divergence

__all__ = ["SinkhornResult", "sinkhorn", "sinkhorn_divergence"]
