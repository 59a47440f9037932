r"""``fk.topk_logprobs``: the teacher's side of top-k distillation, in one pass over each row.

Per row, with a = f(z) / T the transformed logits (f: z -> s z, then c tanh(z / c) under a
softcap, the transform ``fk.sparse_divergence`` applies to the student) and L = LSE(a):

    ids = the k largest a, descending (ties: the lower id first)
    lp_i = a_{ids_i} - L = (a_{ids_i} - m) - log s,   m = max a, s = sum_j exp(a_j - m)

The kernels (``fdiv::topk_logprobs_fwd_<backend>``) read each row once: an online log-sum-exp
beside a running top-k (a heap of k on the CPU, a k-slot register buffer merged block by block in
Triton), and write (ids, a of the ids, (m, log s)); forming lp and the ``top_p`` mask is O(k) per
row here. Nothing of size (N, V) is allocated.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import SoftmaxOps, select_ops
from fdiv_kernels.core._transforms import check_logit_transform, transform_logits

# What a masked entry (``support_mask`` False) holds: an id no vocabulary has and a log-prob of
# zero probability, so that a store read without its mask fails ``fk.sparse_divergence``'s id
# check rather than counting padding, and TRL's ``valid = logprobs > -inf`` reads the same mask.
PAD_ID = -1
PAD_LOGPROB = float("-inf")

IDS_DTYPES = (torch.int32, torch.int64)
LOGPROBS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TopKLogprobs(NamedTuple):
    """The teacher's top-k per row, as offline stores keep it and ``fk.sparse_divergence`` takes
    it (``teacher_ids=ids, teacher_logprobs=logprobs, support_mask=support_mask``).

    ids: (..., k) int32 (or int64) vocabulary ids, by descending log-prob (ties: lower id first);
        ``-1`` where ``support_mask`` is False.
    logprobs: (..., k) log softmax of the transformed logits at ``ids`` (float32 by default);
        ``-inf`` where ``support_mask`` is False.
    support_mask: (..., k) bool, True = a real entry; None when ``top_p`` is None (every entry
        real).
    """

    ids: Tensor
    logprobs: Tensor
    support_mask: Tensor | None


# ---- argument checks and the O(k) epilogue, shared with fk.fused_linear_topk_logprobs ---------


def check_k(k: object, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")
    return int(k)


def check_top_p(top_p: object) -> float | None:
    if top_p is None:
        return None
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a real number or None, got {type(top_p).__name__}")
    p = float(top_p)
    if not 0.0 < p <= 1.0:  # NaN fails too
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return p


def check_out_dtypes(ids_dtype: object, logprobs_dtype: object,
                     default: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    if ids_dtype not in IDS_DTYPES:
        raise ValueError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype!r}")
    if logprobs_dtype is None:
        return ids_dtype, default
    if logprobs_dtype not in LOGPROBS_DTYPES:
        raise ValueError(f"logprobs_dtype must be None or one of {list(LOGPROBS_DTYPES)}, got "
                         f"{logprobs_dtype!r}")
    return ids_dtype, logprobs_dtype


def check_scale(logit_scale: object, softcap: object) -> tuple[float, float]:
    return check_logit_transform("logit_scale", 1.0 if logit_scale is None else logit_scale,
                                 "softcap", softcap)


def logprobs_of(values: Tensor, stats: Tensor) -> Tensor:
    """lp = (a - m) - log s from the kernels' values and per-row (m, log s); -inf on a row with
    no mass (every a = -inf), where (a - m) would be NaN."""
    m, log_s = stats[:, :1], stats[:, 1:]
    lp = (values - m) - log_s
    return torch.where(m == -math.inf, torch.full_like(lp, -math.inf), lp)


def finish(ids: Tensor, lp: Tensor, lead: torch.Size, top_p: float | None,
           ids_dtype: torch.dtype, lp_dtype: torch.dtype) -> TopKLogprobs:
    """The result from (N, k) int64 ids and compute-dtype log-probs: the ``top_p`` mask and its
    padding, the output dtypes, the leading shape."""
    k = ids.shape[-1]
    mask = None
    if top_p is not None:
        p = lp.detach().exp()
        before = torch.cumsum(p, dim=-1) - p  # mass of the entries ahead of each
        # The smallest prefix whose mass reaches top_p: an entry stays while the mass ahead of
        # it is below top_p (the first always does). top_p = 1 keeps every entry of nonzero
        # probability, whatever rounding the cumulative sum collects. A NaN entry stays visible.
        # Zero probability as stored: a log-prob below fp16's range is -inf there, so masked.
        keep = lp.detach().to(lp_dtype) != -math.inf
        if top_p < 1.0:
            keep = keep & ~(before >= top_p)
        mask = keep
        ids = torch.where(keep, ids, PAD_ID)
        lp = torch.where(keep, lp, torch.full_like(lp, PAD_LOGPROB))
    out_shape = (*lead, k)
    return TopKLogprobs(ids.to(ids_dtype).reshape(out_shape), lp.to(lp_dtype).reshape(out_shape),
                        mask.reshape(out_shape) if mask is not None else None)


# ---- autograd ----------------------------------------------------------------------------------


class TopKLogprobsFunction(torch.autograd.Function):
    """(ids, lp) of each row from one kernel launch; saves the logits and two floats per row only
    when the logits need a gradient.

    Backward, for an incoming gradient g over the k entries (G = sum_i g_i):
    d/da_j = g_i [j = ids_i] - q_j G, q = softmax(a): the dense part is the softmax-statistics
    backward with g_lse = -G (one read of the row, one write, the transform chained in), the k
    sparse terms are added at the ids. The ids are a piecewise-constant function of the logits:
    no gradient through the selection (as ``torch.topk``).
    """

    @staticmethod
    def forward(ctx, x, k, inv_t, scale, cap, ops):
        ids, values, stats = ops.topk_logprobs_fwd(x, k, inv_t, scale, cap)
        lp = logprobs_of(values, stats)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, ids, stats)
        ctx.args = (inv_t, scale, cap, ops)
        ctx.mark_non_differentiable(ids)
        return ids, lp

    @staticmethod
    def backward(ctx, _g_ids, g_lp):
        if torch.is_grad_enabled():
            raise RuntimeError("fdiv_kernels.topk_logprobs does not support higher-order "
                               "gradients (backward with create_graph=True)")
        if g_lp is None:
            return (None,) * 6
        x, ids, stats = ctx.saved_tensors
        inv_t, scale, cap, ops = ctx.args
        m, log_s = stats[:, 0], stats[:, 1]
        # A row with no mass has constant -inf log-probs: no gradient (an lse of 0 instead of
        # -inf makes its softmax 0 rather than NaN).
        dead = m == -math.inf
        g = torch.where(dead[:, None], torch.zeros_like(g_lp), g_lp.to(stats.dtype))
        lse = torch.where(dead, torch.zeros_like(m), m + log_s).contiguous()
        dx = ops.softmax_stats_bwd(x, None, lse, stats.new_empty(0), (-g.sum(-1)).contiguous(),
                                   None, None, -100, inv_t, scale, cap)
        # The sparse terms g_i at the ids, through the transform: d a / d x = f'(x) / T.
        _, slope = transform_logits(x.gather(1, ids).to(stats.dtype), scale, cap)
        dx = dx.scatter_add(1, ids, (g * slope * inv_t).to(dx.dtype))
        return dx, *([None] * 5)


def topk_logprobs(
    logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    top_p: float | None = None,
    ids_dtype: torch.dtype = torch.int32,
    logprobs_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> TopKLogprobs:
    r"""The k most probable ids of each row and their log-probabilities, in one pass over V.

    With a = f(z) / T the transformed logits (f: z -> ``logit_scale`` z, then c tanh(z / c) with
    c = ``softcap``; the transform :func:`fk.sparse_divergence` applies to the student) and
    L = log sum_j exp(a_j):

        ids = argtopk_k(a)   (descending; ties: the lower id first, on every backend)
        logprobs_i = a_{ids_i} - L    (computed as (a - max a) - log sum exp(a - max a))

    the same as ``torch.log_softmax(a, -1).topk(k)`` without the (N, V) log-softmax: the kernels
    keep a running top-k beside an online log-sum-exp and read each row once.

    ``top_p`` keeps, per row, the smallest prefix of the sorted top-k whose probability mass
    reaches ``top_p`` (the first entry always; ``top_p=1`` keeps every entry of nonzero
    probability); the other entries are masked: ``support_mask`` False, id ``-1``, log-prob
    ``-inf``, which :func:`fk.sparse_divergence` takes with the mask as padding. Entries of
    zero probability (a = -inf) are masked too. Without ``top_p``, ``support_mask`` is None
    (every entry real). The outputs go to ``fk.sparse_divergence`` as they are:
    ``fk.sparse_divergence(student, out.ids, out.logprobs, support_mask=out.support_mask)``.

    Edge rows: a row whose logits are all -inf (no distribution; only without a softcap, which
    maps -inf to the finite -c) gives ids 0..k-1 with log-probs -inf (all masked with
    ``top_p``): such rows should be ignored rows of the loss. A NaN or +inf logit makes the row's
    log-probs NaN (as ``log_softmax``).

    Gradient: when ``logits`` requires grad, ``logprobs`` is differentiable w.r.t. it,
    d lp_i / d a_j = [j = ids_i] - softmax(a)_j (the ids are not); the backward reads the row
    once more from two saved floats per row. Under ``torch.no_grad`` nothing is saved.

    Args:
        logits: (..., V) float32, bfloat16, float16 or float64 logits (any leading shape, zero
            rows allowed).
        k: entries per row, 1 <= k <= V.
        temperature: T > 0 (1/T must be finite in the compute dtype).
        logit_scale: the model's logit scale s (finite, positive; None: 1).
        softcap: the model's final-logit softcap c (finite, positive; None: none).
        top_p: None, or the nucleus mass in (0, 1] (see above).
        ids_dtype: torch.int32 (default, what stores keep) or torch.int64.
        logprobs_dtype: torch.float32, torch.float16, torch.bfloat16 or torch.float64; None:
            float32 (float64 for float64 logits). The kernels compute in float32 (float64) and
            round once at the end.
        backend: "auto", "triton", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").

    Returns:
        :class:`TopKLogprobs` (ids, logprobs, support_mask), each (..., k).
    """
    x = V.check_logits("logits", logits)
    lead, vocab = x.shape[:-1], x.shape[-1]
    k = check_k(k, vocab)
    inv_t = V.check_temperature(temperature, x.dtype)
    scale, cap = check_scale(logit_scale, softcap)
    top_p = check_top_p(top_p)
    ids_dtype, lp_dtype = check_out_dtypes(ids_dtype, logprobs_dtype, V.loss_dtype(x.dtype))
    rows = x.reshape(-1, vocab).contiguous()
    ops: SoftmaxOps = select_ops(backend, rows, "topk_logprobs_fwd", transforms=(scale, cap))
    ids, lp = TopKLogprobsFunction.apply(rows, k, inv_t, scale, cap, ops)
    return finish(ids, lp, lead, top_p, ids_dtype, lp_dtype)


__all__ = ["PAD_ID", "PAD_LOGPROB", "TopKLogprobs", "TopKLogprobsFunction", "topk_logprobs"]
