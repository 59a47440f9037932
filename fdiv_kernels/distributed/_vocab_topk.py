r"""``vocab_parallel_topk_logprobs``: the teacher's top-k log-probs from vocabulary-sharded logits.

The global top k of a row is among the union of the shards' top k, and log softmax needs only the
row's global LSE; so each rank sends its k best (scaled logit, global id) pairs and its shard's
(max, log-sum), one all_gather of 2k + 2 numbers a row, and every rank merges the same candidates
to the same answer. Exact: no candidate outside a shard's top k can be in the global top k. The
max and the log-sum stay apart (a log-prob is (a - M) - log S): folded into one LSE first, a
logit of 1e30 would leave no digit of log S (l = 1e30 + 0.69 is 1e30 in float64).
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import select_ops
from fdiv_kernels.distributed import _comm, _shards
from fdiv_kernels.distributed._vocab_sparse import no_dtensor
from fdiv_kernels.stats._topk import (
    TopKLogprobs,
    check_out_dtypes,
    check_scale,
    check_top_p,
    finish,
)

# The id of a missing candidate (a shard narrower than k): above every real id, so it sorts
# after any real candidate of equal (-inf) value. Ids travel in float64: exact below 2^53.
_NO_ID = float(1 << 52)


def _check_k(k: object) -> int:
    """k's type and sign, checked as fk.topk_logprobs checks them (k <= V once the shards' total
    is known)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}")
    return int(k)


def _order(vals: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (value, id) pairs of each row: value descending, ties by the lower id."""
    by_id = ids.argsort(dim=-1, stable=True)
    vals, ids = vals.gather(-1, by_id), ids.gather(-1, by_id)
    by_val = vals.argsort(dim=-1, descending=True, stable=True)[:, :k]
    return vals.gather(-1, by_val), ids.gather(-1, by_val)


def _local_topk(x: Tensor, k: int, inv_t: float, transform: tuple[float, float], start: int,
                backend: str):
    """(the shard's (max, log-sum) (2, n), its k best scaled logits (n, k), their global ids
    (n, k)), float64.

    The single-process kernel (``fdiv::topk_logprobs_fwd``, one pass over the shard) gives the
    shard's min(k, V_r) best and its (max, log-sum); a shard narrower than k pads with -inf.
    A shard with no mass has (max, log-sum) = (-inf, -inf).
    """
    n, width = x.shape
    vals = x.new_full((n, k), float("-inf"), dtype=torch.float64)
    ids = torch.full_like(vals, _NO_ID)
    if width == 0:
        return vals[:, :1].t().expand(2, n).clone(), vals, ids
    m = min(k, width)
    ops = select_ops(backend, x, "topk_logprobs_fwd", transforms=transform)
    top_i, top_v, stats = ops.topk_logprobs_fwd(x, m, inv_t, *transform)
    vals[:, :m], ids[:, :m] = top_v.double(), (top_i + start).double()
    mx, log_s = stats[:, 0].double(), stats[:, 1].double()
    log_s = torch.where(mx == float("-inf"), mx, log_s)  # a shard of -inf only: no mass
    return torch.stack([mx, log_s]), vals, ids


def _merge_stats(stats: Tensor) -> tuple[Tensor, Tensor]:
    """(M, log S) of a row from the shards' (max m_r, log-sum log s_r), (W, 2, n): M = max m_r,
    S = sum_r s_r exp(m_r - M). A row with no mass anywhere: (-inf, -inf)."""
    mx, log_s = stats[:, 0], stats[:, 1]
    M = mx.max(dim=0).values
    shift = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    log_S = torch.logsumexp(mx - shift + log_s, dim=0)  # -inf terms: the shards with no mass
    return M, log_S


def vocab_parallel_topk_logprobs(
    logits_shard: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    top_p: float | None = None,
    ids_dtype: torch.dtype = torch.int32,
    logprobs_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> TopKLogprobs:
    r"""The top ``k`` log-probs of softmax(f(x) / T) per row, from logits sharded by vocabulary.

    f is the logit transform (x -> s x, then c tanh(x / c) under a softcap). Each rank passes its
    (..., V_r) columns [vocab_start, vocab_start + V_r) (uneven or empty shards allowed); every
    rank returns the same global result:

        ids (..., k) global ids, log-probs (..., k) = a_id - L, sorted by log-prob descending,
        ties by the lower id; with ``top_p`` also support_mask (..., k), True = a real entry:
        the smallest prefix whose mass reaches ``top_p`` (an entry is kept while the mass
        before it is below top_p), the rest masked as :func:`fk.topk_logprobs` masks them
        (id -1, log-prob -inf).

    Per row, each rank finds its shard's LSE l_r and its k best (a, global id) pairs in one
    pass (the kernel of :func:`fk.topk_logprobs`; fewer columns than k: the rest -inf) and
    sends them with its (max m_r, log-sum log s_r): one all_gather of 2k + 2 float64 numbers
    (+ 2 for the layout check). Then M = max_r m_r, S = sum_r s_r exp(m_r - M), each log-prob
    is (a - M) - log S (exact for logits of any size), and the global top k of the W k
    candidates is exact (a shard's (k+1)-th entry is below k entries of its own). No gradient (the teacher's side).
    ``vocab_size``: only global columns below it take part. With one rank (or no process group)
    the same computation without a collective.

    Args:
        logits_shard: this rank's (..., V_r) columns of the logits.
        k: entries per row, 1 <= k <= V.
        temperature: T > 0.
        logit_scale, softcap: the logit transform (as the student's in
            :func:`fk.sparse_divergence`; None: none).
        top_p: None, or the nucleus mass in (0, 1] that sets support_mask.
        ids_dtype: int32 (the default, what offline stores keep) or int64.
        logprobs_dtype: float32, bfloat16, float16 or float64; None: float32 (float64 for
            float64 logits).
        vocab_size: the tokenizer's size when the vocabulary is padded.
        vocab_start: this rank's first global vocabulary id (required with several ranks).
        group: the process group the vocabulary is split over (None: the default group).
        backend: the local kernel's backend ("auto", "triton", "cpu" or "torch").

    Returns:
        :class:`fk.TopKLogprobs` (ids, logprobs, support_mask), support_mask None without
        ``top_p``.
    """
    no_dtensor("logits_shard", logits_shard)
    world, _ = _comm.world(group)
    vocab_start = _shards.check_vocab_start(vocab_start)
    V.check_float_rows("logits_shard", logits_shard)
    if world > 1:  # one rank takes zero rows (as the single-process ops)
        _shards.check_shard("logits_shard", logits_shard)
    k = _check_k(k)
    inv_t = V.check_temperature(temperature, logits_shard.dtype)
    transform = check_scale(logit_scale, softcap)
    top_p = check_top_p(top_p)
    ids_dtype, lp_dtype = check_out_dtypes(ids_dtype, logprobs_dtype,
                                           V.loss_dtype(logits_shard.dtype))
    start, width = _shards.resolve_width("logits_shard", logits_shard.shape[-1], vocab_start,
                                 vocab_size, world)
    lead = logits_shard.shape[:-1]
    with torch.no_grad():
        x = _shards.rows(logits_shard.detach()[..., :width]).contiguous()
        stats, vals, ids = _local_topk(x, k, inv_t, transform, start, backend)
        if world == 1:
            total, cand_v, cand_i = width, vals, ids
            M, log_S = _merge_stats(stats[None])
        else:
            pieces = torch.cat([stats, vals.t(), ids.t()])  # (2k + 2, n)
            g, total = _shards.gather_rows_vocab(pieces, group, world, (start, width))
            M, log_S = _merge_stats(g[:, :2])
            cand_v = g[:, 2:k + 2].permute(2, 0, 1).reshape(x.shape[0], -1)  # (n, W k)
            cand_i = g[:, k + 2:].permute(2, 0, 1).reshape(x.shape[0], -1)
        if vocab_size is not None and total != vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is more than the {total} columns the "
                             "shards hold")
        if k > total:
            raise ValueError(f"k={k} is more than the vocabulary V={total}")
        top_v, top_i = _order(cand_v, cand_i, k)
        # No mass in the row: its (all -inf) values as they are, not -inf - -inf.
        dead = (M == float("-inf"))[:, None]
        lp = torch.where(dead, top_v, (top_v - M[:, None]) - log_S[:, None])
        return finish(top_i.to(torch.int64), lp, lead, top_p, ids_dtype, lp_dtype)


__all__ = ["vocab_parallel_topk_logprobs"]
