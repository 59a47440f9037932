"""fdiv-kernels: fused kernels for softmax divergences over large vocabularies.

    import fdiv_kernels as fk
    loss = fk.divergence(student_logits, teacher_logits, kind="js", beta=0.5, temperature=2.0)
    logp = fk.token_logprobs(logits, labels)          # selective log-softmax, one pass
"""

from fdiv_kernels import losses, nn
from fdiv_kernels.backends import common as _common  # noqa: F401  (registers fdiv::scale_rows_)
from fdiv_kernels.backends import torch_ref as _torch_ref  # noqa: F401  (always available)
from fdiv_kernels.dispatch import BackendUnavailableError, describe, not_supported_reasons
from fdiv_kernels._divergence import divergence
from fdiv_kernels._stats import DivergenceStats
from fdiv_kernels._kinds import DIVERGENCES, ROW_DIVERGENCES
from fdiv_kernels._custom_kinds import register_divergence, unregister_divergence
from fdiv_kernels._fused_linear import fused_linear_divergence
from fdiv_kernels._fused_linear_logprobs import fused_linear_token_logprobs
from fdiv_kernels._sparse_divergence import sparse_divergence
from fdiv_kernels._fused_linear_sparse import fused_linear_sparse_divergence
from fdiv_kernels.transport import SinkhornResult, sinkhorn, sinkhorn_divergence
from fdiv_kernels._softmax_stats import (
    SoftmaxStats,
    entropy,
    logsumexp,
    softmax_stats,
    token_logprobs,
)

__version__ = "0.1.0"
# The built-in kinds fk.divergence takes (ROW_DIVERGENCES: fk.divergence only).
KINDS = tuple(DIVERGENCES) + tuple(ROW_DIVERGENCES)

__all__ = [
    "BackendUnavailableError", "DIVERGENCES", "DivergenceStats", "KINDS", "SinkhornResult",
    "SoftmaxStats",
    "describe", "divergence", "sinkhorn", "sinkhorn_divergence",
    "entropy", "fused_linear_divergence", "fused_linear_sparse_divergence",
    "fused_linear_token_logprobs", "logsumexp", "losses", "nn", "not_supported_reasons",
    "register_divergence", "unregister_divergence",
    "softmax_stats", "sparse_divergence", "token_logprobs",
]
