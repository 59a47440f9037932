"""fdiv-kernels: fused kernels for softmax divergences over large vocabularies.

    import fdiv_kernels as fk
    loss = fk.divergence(student_logits, teacher_logits, kind="js", beta=0.5, temperature=2.0)
    logp = fk.token_logprobs(logits, labels)          # selective log-softmax, one pass
    top = fk.topk_logprobs(teacher_logits, k=64)      # a teacher's top-k (ids, log-probs)

The package is grouped by family (each a subpackage of private modules): ``core`` (dispatch and
the backends' op records, validation, logit transforms), ``kinds``, ``divergences``, ``stats``,
``fused_linear``, ``transport`` (Sinkhorn), ``distributed``, ``integrations``; ``backends`` holds
each backend's ops.
"""

from fdiv_kernels import losses, nn
from fdiv_kernels.backends import torch_ref as _torch_ref  # noqa: F401  (always available)
from fdiv_kernels.core._dispatch import BackendUnavailableError, describe, not_supported_reasons
from fdiv_kernels.divergences import DivergenceStats, divergence, sparse_divergence
from fdiv_kernels.fused_linear import (
    fused_linear_divergence,
    fused_linear_sparse_divergence,
    fused_linear_token_logprobs,
    fused_linear_topk_logprobs,
)
from fdiv_kernels.kinds import (
    DIVERGENCES,
    ROW_DIVERGENCES,
    register_divergence,
    unregister_divergence,
)
from fdiv_kernels.stats import (
    SoftmaxStats,
    TopKLogprobs,
    entropy,
    logsumexp,
    softmax_stats,
    token_logprobs,
    topk_logprobs,
)
from fdiv_kernels.transport import SinkhornResult, sinkhorn, sinkhorn_divergence

__version__ = "0.1.0"
# The built-in kinds fk.divergence takes (ROW_DIVERGENCES: fk.divergence only).
KINDS = tuple(DIVERGENCES) + tuple(ROW_DIVERGENCES)

__all__ = [
    "BackendUnavailableError", "DIVERGENCES", "DivergenceStats", "KINDS", "SinkhornResult",
    "SoftmaxStats", "TopKLogprobs",
    "describe", "divergence", "sinkhorn", "sinkhorn_divergence",
    "entropy", "fused_linear_divergence", "fused_linear_sparse_divergence",
    "fused_linear_token_logprobs", "fused_linear_topk_logprobs", "logsumexp", "losses", "nn",
    "not_supported_reasons",
    "register_divergence", "unregister_divergence",
    "softmax_stats", "sparse_divergence", "token_logprobs", "topk_logprobs",
]
