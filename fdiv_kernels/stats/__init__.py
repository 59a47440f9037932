"""Softmax statistics of logits in one pass: log-sum-exp, entropy, token log-probabilities, and
the top-k log-probabilities a teacher hands to ``fk.sparse_divergence``."""

from fdiv_kernels.stats._softmax import (
    SoftmaxStats,
    SoftmaxStatsFunction,
    entropy,
    logsumexp,
    softmax_stats,
    token_logprobs,
)
from fdiv_kernels.stats._topk import TopKLogprobs, TopKLogprobsFunction, topk_logprobs

__all__ = ["SoftmaxStats", "SoftmaxStatsFunction", "TopKLogprobs", "TopKLogprobsFunction",
           "entropy", "logsumexp", "softmax_stats", "token_logprobs", "topk_logprobs"]
