"""Softmax statistics of logits in one pass: log-sum-exp, entropy, token log-probabilities."""

from fdiv_kernels.stats._softmax import (
    SoftmaxStats,
    SoftmaxStatsFunction,
    entropy,
    logsumexp,
    softmax_stats,
    token_logprobs,
)

__all__ = ["SoftmaxStats", "SoftmaxStatsFunction", "entropy", "logsumexp", "softmax_stats",
           "token_logprobs"]
