"""Vocabulary-parallel (tensor-parallel lm head) divergences and softmax statistics.

Each rank holds the columns [vocab_start, vocab_start + V_r) of the logits; per row only a few
floats cross ranks (row LSEs, partial sums), never the (N, V) logits, and no backward
communicates. Built on :mod:`fdiv_kernels.phases` over ``torch.distributed`` (gloo or NCCL).
"""

from fdiv_kernels.distributed._comm import Collective, count_collectives
from fdiv_kernels.distributed._fused_linear_tp import (
    VocabParallelFusedLinearDivergenceFunction,
    vocab_parallel_fused_linear_divergence,
)
from fdiv_kernels.distributed._fused_linear_sparse_tp import (
    VocabParallelFusedLinearSparseDivergenceFunction,
    vocab_parallel_fused_linear_sparse_divergence,
)
from fdiv_kernels.distributed._loss_parallel import loss_parallel
from fdiv_kernels.distributed._vocab_divergence import (
    VocabParallelDivergenceFunction,
    vocab_parallel_divergence,
)
from fdiv_kernels.distributed._vocab_sparse import (
    VocabParallelSparseDivergenceFunction,
    vocab_parallel_sparse_divergence,
)
from fdiv_kernels.distributed._vocab_topk import vocab_parallel_topk_logprobs
from fdiv_kernels.distributed._vocab_stats import (
    VocabParallelStatsFunction,
    vocab_parallel_entropy,
    vocab_parallel_logsumexp,
    vocab_parallel_token_logprobs,
)

__all__ = [
    "Collective", "VocabParallelDivergenceFunction", "VocabParallelFusedLinearDivergenceFunction",
    "VocabParallelStatsFunction", "count_collectives", "loss_parallel", "vocab_parallel_divergence",
    "vocab_parallel_entropy", "vocab_parallel_fused_linear_divergence",
    "vocab_parallel_logsumexp", "vocab_parallel_token_logprobs",
    "VocabParallelSparseDivergenceFunction", "vocab_parallel_sparse_divergence",
    "VocabParallelFusedLinearSparseDivergenceFunction",
    "vocab_parallel_fused_linear_sparse_divergence", "vocab_parallel_topk_logprobs",
]
