"""Fused linear forms: an lm head and a per-row kernel in one chunked pass, the (N, V) logits never
materialized. One chunk engine (``_engine``) and thin forms: the dense divergence, the sparse
(top-k) teacher, token log-probabilities, the teacher's top-k log-probabilities (and the vocabulary-parallel form in
``fdiv_kernels.distributed``)."""

from fdiv_kernels.fused_linear._dense import (
    FusedLinearDivergenceFunction,
    fused_linear_divergence,
)
from fdiv_kernels.fused_linear._logprobs import (
    FusedLinearTokenLogprobsFunction,
    fused_linear_token_logprobs,
)
from fdiv_kernels.fused_linear._sparse import (
    FusedLinearSparseDivergenceFunction,
    fused_linear_sparse_divergence,
)
from fdiv_kernels.fused_linear._topk import fused_linear_topk_logprobs

__all__ = ["FusedLinearDivergenceFunction", "FusedLinearSparseDivergenceFunction",
           "FusedLinearTokenLogprobsFunction", "fused_linear_divergence",
           "fused_linear_sparse_divergence", "fused_linear_token_logprobs",
           "fused_linear_topk_logprobs"]
