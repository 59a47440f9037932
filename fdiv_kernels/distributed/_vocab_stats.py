"""Vocabulary-parallel softmax statistics: log-sum-exp, token log-probabilities, entropy.

Megatron's vocab-parallel cross-entropy pattern: each rank reduces its columns to a few numbers
per row, one all_gather brings every rank's numbers, each rank combines them, and the backward
is local (the registered softmax-statistics backward op, fed the *global* row statistics, writes
exactly this shard's slice of the gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels import phases
from fdiv_kernels.stats._softmax import entropy, logsumexp, token_logprobs
from fdiv_kernels.core._ops import ops_for
from fdiv_kernels.core._validation import loss_dtype
from fdiv_kernels.distributed import _comm, _shards

LSE, ENTROPY, LOGPROB = 0, 1, 2  # which statistic a StatsFunction returns


def _local_stats(x: Tensor, inv_t: float, backend: str, want_entropy: bool):
    """(lse, entropy) of this shard's columns; an empty shard is (-inf, 0)."""
    n, ctype = x.shape[0], loss_dtype(x.dtype)
    if x.shape[-1] == 0:
        return (x.new_full((n,), float("-inf"), dtype=ctype),
                x.new_zeros(n, dtype=ctype) if want_entropy else None)
    if not want_entropy:
        return phases.row_lse(x, 1.0 / inv_t, backend=backend), None
    lse, ent, _ = ops_for(backend).softmax_stats_fwd(x, None, -100, inv_t, 1.0, 0.0, True)
    return lse, ent


def gather_stats(x: Tensor, local_labels: Tensor | None, keep: Tensor | None, inv_t: float,
                 backend: str, group, world: int, want_entropy: bool,
                 layout: tuple[int, int] | None = None):
    """Global (lse, entropy or None, label log-prob or None) of (N, V_local) shards: one
    all_gather of 1-3 floats per row.

    ``local_labels`` holds the label's column in this shard, or -1 where another rank owns it or
    the row is ignored (``keep`` False). ``layout``: this rank's (vocab_start, width), checked
    against the other ranks' in the same all_gather.
    """
    lse, ent = _local_stats(x, inv_t, backend, want_entropy)
    pieces = [lse] + ([ent] if want_entropy else [])
    if local_labels is not None:
        owned = local_labels >= 0
        picked = (x.gather(-1, local_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                  if x.shape[-1] else lse.new_zeros(lse.shape))
        pieces += [torch.where(owned, picked.to(lse.dtype) * inv_t, torch.zeros_like(lse)),
                   owned.to(lse.dtype)]
    g = _shards.gather_rows(torch.stack(pieces), group, world, layout)  # (world, pieces, N)
    L = phases.combine_lse(g[:, 0])
    H = lp = None
    if want_entropy:
        # H = sum_r w_r (H_r + L - l_r), w_r = exp(l_r - L) the shard's probability mass:
        # shift-invariant (no L - E[x] cancellation); shards of mass 0 add nothing.
        w = torch.exp(g[:, 0] - L)
        H = torch.where(w > 0, w * (g[:, 1] + L - g[:, 0]), torch.zeros_like(w)).sum(0)
    if local_labels is not None:
        # A label no rank owns (out of range) gives NaN, as the torch backend does.
        lp = torch.where(g[:, -1].sum(0) == 1, g[:, -2].sum(0) - L, torch.full_like(L, torch.nan))
        lp = torch.where(keep, lp, torch.zeros_like(lp))
    return L, H, lp


def local_grad(x: Tensor, local_labels: Tensor | None, keep: Tensor | None, L: Tensor,
               H: Tensor | None,
               g_lse: Tensor | None, g_ent: Tensor | None, g_lp: Tensor | None, inv_t: float,
               backend: str) -> Tensor:
    """This shard's slice of the gradient, from the global row statistics: no collective.

    The registered backward op, fed the global lse and entropy, writes g_lse q + g_ent dH/dx for
    these columns; for the label term, d lp / dx = (onehot - q) / T on the owning rank and
    -q / T on the others, so non-owning rows move g_lp into g_lse with a minus sign.
    """
    if x.shape[-1] == 0:
        return torch.zeros_like(x)
    bwd = ops_for(backend).softmax_stats_bwd
    as_rows = lambda g: None if g is None else g.to(L.dtype).contiguous()  # noqa: E731
    g_lse, g_ent, g_lp = as_rows(g_lse), as_rows(g_ent), as_rows(g_lp)
    labels = None
    if g_lp is not None and local_labels is not None:
        owned = local_labels >= 0  # -1: ignored row or another rank's label
        moved = torch.where(owned | ~keep, torch.zeros_like(g_lp), -g_lp)
        g_lse = moved if g_lse is None else g_lse + moved
        labels = torch.where(owned, local_labels, torch.full_like(local_labels, -100))
    else:
        g_lp = None
    if g_lse is None:  # the ops want at least one row gradient
        g_lse = torch.zeros_like(L)
    ent = H if H is not None else L.new_zeros(0)
    return bwd(x, labels, L, ent, g_lse, g_ent if H is not None else None, g_lp, -100, inv_t,
               1.0, 0.0)


class VocabParallelStatsFunction(torch.autograd.Function):
    """One global statistic of (N, V_local) shards; 1 all_gather forward, nothing backward."""

    @staticmethod
    def forward(ctx, x, which, local_labels, keep, inv_t, backend, group, world, layout=None):
        labels = local_labels if which == LOGPROB else None
        L, H, lp = gather_stats(x, labels, keep, inv_t, backend, group, world, which == ENTROPY,
                                layout)
        ctx.save_for_backward(x, labels, keep, L, H)
        ctx.which, ctx.inv_t, ctx.backend = which, inv_t, backend
        return (L, H, lp)[which]

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab-parallel statistics do not support higher-order gradients")
        x, labels, keep, L, H = ctx.saved_tensors
        g = [None, None, None]
        g[ctx.which] = grad
        dx = local_grad(x, labels, keep, L, H, *g, ctx.inv_t, ctx.backend)
        return dx, *([None] * 8)


def _setup(name, x, group, vocab_start, backend):
    x, info = (_shards.unwrap(name, x) if _shards.is_dtensor(x) else (x, None))
    group, vocab_start = _shards.resolve_group(group, info, vocab_start)
    world, _ = _comm.world(group)
    return x, info, group, vocab_start, world


def _cut(x, info, vocab_start, vocab_size, world):
    """The shard's columns below ``vocab_size`` (a view: the rest get exactly zero gradient) and
    the layout its all_gather checks: (vocab_start, width[, vocab_size]) or None."""
    if vocab_size is None:
        layout = None if vocab_start is None or info is not None else (vocab_start, x.shape[-1])
        return x, layout
    start, width = _shards.resolve_width("logits_shard", x.shape[-1], vocab_start, vocab_size,
                                         world)
    return x[..., :width], (start, width, vocab_size)


def _apply(x, which, local_labels, keep, inv_t, backend, group, world, lead, layout=None):
    rows = _shards.rows(x)
    name = _shards.pick_backend(backend, rows, ("softmax_stats_fwd", "softmax_stats_bwd"))
    n = rows.shape[0]
    if local_labels is None:
        local_labels = torch.full((n,), -1, dtype=torch.long, device=rows.device)
    if keep is None:
        keep = torch.ones(n, dtype=torch.bool, device=rows.device)
    out = VocabParallelStatsFunction.apply(rows, which, local_labels, keep, inv_t, name, group,
                                           world, layout)
    return out.reshape(lead)


def vocab_parallel_logsumexp(
    logits_shard: Tensor, *, group: dist.ProcessGroup | None = None, backend: str = "auto",
    vocab_start: int | None = None, vocab_size: int | None = None,
) -> Tensor:
    r"""log sum_j exp(x_j) over the last dim of logits sharded across ``group``'s ranks.

    Collectives per forward: one all_gather of N floats per rank; none in the backward (each
    rank writes softmax(x)_j g for its own columns). The result has the logits' dtype, the
    leading shape, and is the same on every rank. One rank: exactly ``fk.logsumexp(x, -1)``.

    Args:
        logits_shard: this rank's (..., V_r) columns x (or a DTensor placed ``Shard(-1)``).
        group: the process group the vocabulary is split over (None: the default group).
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        vocab_start: this rank's first global vocabulary id (optional; when given the ranks'
            layouts ride in the all_gather and must tile [0, V) exactly once).
        vocab_size: the tokenizer's size when the vocabulary is padded: only global columns
            below it take part (padding columns get exactly zero gradient); needs
            ``vocab_start`` with several ranks.
    """
    x, info, group, vocab_start, world = _setup("logits_shard", logits_shard, group,
                                                vocab_start, backend)
    x, layout = _cut(x, info, vocab_start, vocab_size, world)
    if world == 1:
        return _shards.rewrap(logsumexp(x, -1, backend=backend), info)
    _shards.check_shard("logits_shard", x)
    out = _apply(x, LSE, None, None, 1.0, backend, group, world, x.shape[:-1], layout)
    return _shards.rewrap(out.to(x.dtype), info)


def vocab_parallel_entropy(
    logits_shard: Tensor, temperature: float = 1.0, *, group: dist.ProcessGroup | None = None,
    backend: str = "auto", vocab_start: int | None = None, vocab_size: int | None = None,
) -> Tensor:
    r"""Per-row entropy of softmax(x / T) over a vocabulary sharded across ``group``'s ranks.

    Each rank sends its shard's (lse_r, H_r); with w_r = exp(lse_r - L) (the shard's mass),
    H = sum_r w_r (H_r + L - lse_r). Collectives per forward: one all_gather of 2N floats per
    rank; none in the backward. One rank: exactly ``fk.entropy``.

    Args:
        logits_shard: this rank's (..., V_r) columns x (or a DTensor placed ``Shard(-1)``).
        temperature: T > 0.
        group: the process group the vocabulary is split over (None: the default group).
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        vocab_start: this rank's first global vocabulary id (optional, as
            :func:`vocab_parallel_logsumexp`).
        vocab_size: only global columns below it take part (as
            :func:`vocab_parallel_logsumexp`).
    """
    x, info, group, vocab_start, world = _setup("logits_shard", logits_shard, group,
                                                vocab_start, backend)
    x, layout = _cut(x, info, vocab_start, vocab_size, world)
    if world == 1:
        return _shards.rewrap(entropy(x, temperature, backend=backend), info)
    _shards.check_shard("logits_shard", x)
    inv_t = 1.0 / V.check_real("temperature", temperature, positive=True)
    return _shards.rewrap(_apply(x, ENTROPY, None, None, inv_t, backend, group, world,
                                 x.shape[:-1], layout), info)


def vocab_parallel_token_logprobs(
    logits_shard: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100, *,
    group: dist.ProcessGroup | None = None, vocab_start: int | None = None,
    backend: str = "auto", vocab_size: int | None = None,
) -> Tensor:
    r"""log softmax(x / T)[label] per row, the vocabulary sharded across ``group``'s ranks.

    ``labels`` are global ids (the full leading shape on every rank); the rank whose columns
    [vocab_start, vocab_start + V_r) hold a label contributes its logit (Megatron's pattern).
    ``vocab_start`` is required with more than one rank (DTensor inputs supply it). Ignored rows
    give 0 and zero gradient; a label that no rank owns gives NaN (no host sync to raise).
    Collectives per forward: one all_gather of 3N floats per rank (shard lse, label logit, owner
    flag); none in the backward. One rank: exactly ``fk.token_logprobs``. The ranks' layouts
    ride in that all_gather: shards that do not tile [0, V) exactly once (a wrong ``vocab_start``)
    raise a ValueError on every rank.

    Args:
        logits_shard: this rank's (..., V_r) columns x (or a DTensor placed ``Shard(-1)``).
        labels: global ids of the leading shape (...).
        temperature: T > 0.
        ignore_index: label value of rows that give 0 and zero gradient.
        group: the process group the vocabulary is split over (None: the default group).
        vocab_start: this rank's first vocabulary id.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        vocab_size: the tokenizer's size when the vocabulary is padded: only global columns
            below it take part (padding columns get exactly zero gradient; a label at or past
            it is owned by no rank: NaN).
    """
    x, info, group, vocab_start, world = _setup("logits_shard", logits_shard, group, vocab_start,
                                                backend)
    x, cut_layout = _cut(x, info, vocab_start, vocab_size, world)
    if world == 1:
        return _shards.rewrap(token_logprobs(x, labels, temperature, ignore_index,
                                             backend=backend), info)
    _shards.check_shard("logits_shard", x)
    inv_t = 1.0 / V.check_real("temperature", temperature, positive=True)
    lead = x.shape[:-1]
    keep = V.row_mask(labels, ignore_index, lead, x.device)
    if keep is None:
        raise TypeError("labels must be an integer tensor, got None")
    if vocab_start is None:
        raise ValueError("vocab_start is required with more than one rank: the first global "
                         "vocabulary id of this rank's shard")
    flat = labels.reshape(-1).long() - vocab_start
    owned = keep & (flat >= 0) & (flat < x.shape[-1])
    local = torch.where(owned, flat, torch.full_like(flat, -1))
    # Checked in the op's all_gather (a DTensor's own offsets need no check).
    layout = (vocab_start, x.shape[-1]) if info is None else None
    if vocab_size is not None:
        layout = cut_layout
    return _shards.rewrap(_apply(x, LOGPROB, local, keep, inv_t, backend, group, world, lead,
                                 layout), info)
