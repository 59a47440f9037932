"""Divergences between two softmax distributions, from logits: the dense op (element-term kinds and
the row kinds Renyi / Cauchy-Schwarz) and the sparse (top-k) teacher with its tails."""

from fdiv_kernels.divergences._dense import DivergenceFunction, divergence
from fdiv_kernels.divergences._results import DivergenceStats
from fdiv_kernels.divergences._sparse import SparseDivergenceFunction, sparse_divergence

__all__ = ["DivergenceFunction", "DivergenceStats", "SparseDivergenceFunction", "divergence",
           "sparse_divergence"]
