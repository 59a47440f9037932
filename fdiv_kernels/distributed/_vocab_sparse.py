r"""``vocab_parallel_sparse_divergence``: fk.sparse_divergence, the student's vocabulary sharded.

The sparse loss of a row depends on the student's row only through K + 1 numbers: its scaled
logits a_i on the K support entries and the log-sum-exp of everything off the support,
L_off = LSE_{j not in S} a_j. Both split over vocabulary shards exactly: each rank owns the
support entries inside its columns (it sends a_i there and 0 elsewhere) and the LSE of its own
off-support columns, so ONE all_gather of K + 1 floats per row gives every rank the *compact
row*

    c = (a_1, ..., a_K, L_off)         (padding entries: -inf)

on which the single-process op runs unchanged (ids 0..K-1, temperature 1, no transform): its
normalizer LSE(c) is the full row's L, its off-support column is the whole off-support mass
(so "bucket"'s tail log q_tail = L_off - L is summed over the off-support columns, as the
single-process kernel does, never 1 - Q_S), and "renormalize" ignores it. This module is the one
place that decomposition is written; the per-row math (terms, tails, re-tempering, teacher
gradient) stays in the single-process kernels.

Gradients without a collective: the compact op's gradient dc (K + 1 per row, saved) is the
gradient of the owned support columns as it is, and since L_off = LSE_off(a),

    dD/da_j = dc_off exp(a_j - L_off)        for j off the support

(the single-process kernels' own off-support form, one coefficient per row times a softmax over
the off-support columns; no 1 / q_tail is formed). Then d/dz = d/da f'(z) / T for the logit
transform f.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import SoftmaxOps, select_ops
from fdiv_kernels.core._rows import row_chunks
from fdiv_kernels.core._transforms import check_logit_transform, transform_logits
from fdiv_kernels.divergences._sparse import (
    check_sparse_teacher,
    mass_slack,
    sparse_divergence,
    teacher_alpha,
)
from fdiv_kernels.divergences._sparse_tails import TAIL_RENORMALIZE, check_teacher
from fdiv_kernels.distributed import _comm, _shards
from fdiv_kernels.kinds._registry import KernelSpec, resolve

NO_TRANSFORM = (1.0, 0.0)
# Rows per step of the unfused op: its (rows, V_r) fp32 temporaries stay near this many elements.
CHUNK_ELEMENTS = 1 << 22


def no_dtensor(name: str, x: object) -> None:
    if _shards.is_dtensor(x):
        raise TypeError(f"{name} must be the local shard (x.to_local(), with vocab_start= its "
                        "offset), not a DTensor")


class Support:
    """The teacher's support as one rank sees it: for each (row, entry) whether this rank owns
    the id (a real entry inside [vocab_start, vocab_start + width)) and its local column."""

    def __init__(self, ids: Tensor, mask: Tensor, vocab_start: int, width: int):
        local = ids.long() - vocab_start  # int64 columns for gather / scatter
        real = mask if mask.numel() else torch.ones_like(ids, dtype=torch.bool)
        self.owned = real & (local >= 0) & (local < width)
        self.cols = torch.where(self.owned, local, torch.zeros_like(local))
        self.width = width

    def rows(self, rows: slice) -> "Support":
        out = Support.__new__(Support)
        out.owned, out.cols, out.width = self.owned[rows], self.cols[rows], self.width
        return out

    def put_(self, x: Tensor, values: Tensor) -> Tensor:
        """x[r, col(r, i)] = values[r, i] on the owned entries, in place, without a host sync
        (no nonzero()): the other entries of a row write the row's first owned entry's value to
        its column (or column 0's own value in a row with none), so duplicate writes agree."""
        first = self.owned.to(torch.uint8).argmax(1, keepdim=True)  # 0 when the row owns none
        has = self.owned.any(1, keepdim=True)
        idx = torch.where(self.owned, self.cols,
                          torch.where(has, self.cols.gather(1, first), 0))
        values = values.to(x.dtype)
        fill = torch.where(has, values.gather(1, first), x[:, :1])
        return x.scatter_(1, idx, torch.where(self.owned, values, fill))

    def column_mask(self) -> Tensor:
        """(n, width) bool: the owned support columns (a dummy column takes the others)."""
        n = self.owned.shape[0]
        m = torch.zeros(n, self.width + 1, dtype=torch.bool, device=self.owned.device)
        m.scatter_(1, torch.where(self.owned, self.cols, self.width), True)
        return m[:, : self.width]


def scaled(z: Tensor, transform: tuple[float, float], inv_t: float):
    """(a, da/dz) with a = f(z) / T in the loss dtype (f: the logit transform); ``a`` is ``z``
    itself when f and T change nothing."""
    z = z.to(V.loss_dtype(z.dtype))
    if transform == NO_TRANSFORM:
        return (z if inv_t == 1.0 else z * inv_t), inv_t
    f, df = transform_logits(z, *transform)
    return f.mul_(inv_t), df * inv_t


def local_pieces(z: Tensor, sup: Support, transform, inv_t: float, tail: int,
                 scratch: bool = False) -> Tensor:
    """(K + 1, n): this shard's off-support LSE of a (row 0; -inf under "renormalize", which
    does not use it) and a on the owned support entries (0 elsewhere, so a sum over ranks is
    exact). ``scratch``: ``z`` may be written (it is restored before returning), saving a
    (n, V_r) copy."""
    n, K = sup.owned.shape
    a, _ = scaled(z, transform, inv_t)
    out = a.new_zeros((K + 1, n))
    if sup.width:
        picked = a.gather(1, sup.cols)
        out[1:] = torch.where(sup.owned, picked, torch.zeros_like(picked)).t()
    if tail == TAIL_RENORMALIZE or sup.width == 0:
        out[0] = float("-inf")
    elif a is z and not scratch:
        out[0] = torch.logsumexp(a.masked_fill(sup.column_mask(), float("-inf")), dim=-1)
    else:
        # The owned support columns set to -inf in place for the off-support LSE, then put back
        # (only needed where a is z itself): K stores a row instead of a (n, V_r) copy.
        sup.put_(a, torch.full_like(picked, float("-inf")))
        out[0] = torch.logsumexp(a, dim=-1)
        if a is z:
            sup.put_(a, picked)
    return out


def exchange(pieces: Tensor, support: Tensor, group, world: int, layout: tuple[int, int] | None):
    """The one forward collective: all_gather of the (K + 1, n) pieces (and this rank's layout,
    checked to tile [0, V)); returns the compact rows (n, K + 1), L_off (n,) and V."""
    g, vocab = _shards.gather_rows_vocab(pieces, group, world, layout)  # (world, K + 1, n)
    l_off = torch.logsumexp(g[:, 0], dim=0)
    a_s = g[:, 1:].sum(0).t()  # exactly one rank sent each real entry's value, the others 0
    a_s = torch.where(support, a_s, torch.full_like(a_s, float("-inf")))
    return torch.cat([a_s, l_off[:, None]], 1).contiguous(), l_off, vocab


def compact_forward(c: Tensor, lp: Tensor, mask: Tensor, keep: Tensor, cfg: dict,
                    grad_s: bool, grad_t: bool):
    """The single-process kernel on the compact rows: (loss, dc (n, K+1) or empty, gt (n, K))."""
    n, K = lp.shape
    ids = torch.arange(K, device=c.device).expand(n, K).contiguous()
    spec: KernelSpec = cfg["spec"]
    ops: SoftmaxOps = cfg["ops"]
    loss, dc, gt, _ = ops.sparse_divergence_fwd(
        c, ids, lp, mask, keep, spec.base, spec.swap, spec.param, 1.0, cfg["tail"],
        cfg["alpha"], cfg["slack"], *NO_TRANSFORM, grad_s, grad_t)
    return loss, dc, gt


def local_grad(z: Tensor, sup: Support, dc: Tensor, l_off: Tensor, keep: Tensor,
               transform, inv_t: float, scratch: bool = False, off_support: bool = True) -> Tensor:
    """d loss / d z of this shard from the compact gradient dc (already row-scaled): dc_i on the
    owned support columns, dc_off exp(a_j - L_off) off the support. No collective.
    ``scratch``: the gradient may be written into ``z`` (a buffer the caller discards).
    ``off_support`` False ("renormalize"): exactly 0 off the support, as the single-process
    kernel writes it (0 exp(a_j - L_off) would be NaN at a NaN logit there)."""
    if sup.width == 0:
        return torch.zeros_like(z)
    coef = dc[:, -1:]
    # a_j <= L_off (a term of it): the clamp keeps rounding from making the ratio exceed 1. A
    # row with no off-support mass (L_off = -inf, all its a_j -inf) has coef 0 and gets 0.
    shift = torch.where(l_off > float("-inf"), l_off, torch.zeros_like(l_off))[:, None]
    if transform == NO_TRANSFORM and z.dtype == V.loss_dtype(z.dtype):
        da = inv_t
        g = z if scratch else torch.empty_like(z)
        g = torch.mul(z, inv_t, out=g) if inv_t != 1.0 else (g.copy_(z) if g is not z else g)
    else:
        g, da = scaled(z, transform, inv_t)
    if off_support:
        g.sub_(shift).clamp_(max=0.0).exp_().mul_(coef)
    else:
        g.zero_()
    sup.put_(g, dc[:, :-1])
    g.mul_(da)
    return g.masked_fill_(~keep[:, None], 0.0).to(z.dtype)


def setup(student_like: Tensor, lead, teacher_ids, teacher_logprobs, support_mask, tail, kind,
          beta, alpha, lam, temperature, teacher_temperature, student_logit_scale,
          student_softcap, backend, labels, ignore_index):
    """The checks and settings the sharded sparse forms share. K is checked against the global
    vocabulary after the exchange (no rank knows it before)."""
    ids, lp, mask, tail_id = check_sparse_teacher(
        lead, 1 << 62, student_like.device, teacher_ids, teacher_logprobs, support_mask, tail)
    spec = resolve(kind, beta, alpha, lam)
    inv_t = V.check_temperature(temperature, student_like.dtype)
    transform = check_logit_transform("student_logit_scale", student_logit_scale,
                                      "student_softcap", student_softcap)
    valid = V.row_mask(labels, ignore_index, lead, student_like.device)
    probe = torch.empty(1, dtype=V.loss_dtype(student_like.dtype), device=student_like.device)
    ops = select_ops(backend, probe, "sparse_divergence_fwd", spec.base, NO_TRANSFORM)
    cfg = {"spec": spec, "ops": ops, "tail": tail_id, "inv_t": inv_t, "transform": transform,
           "alpha": teacher_alpha(float(temperature), teacher_temperature),
           "slack": mass_slack(lp.dtype)}
    return ids, lp, mask, valid, cfg


def check_global(ids: Tensor, lp: Tensor, mask: Tensor, keep: Tensor, vocab: int,
                 cfg: dict) -> None:
    """The single-process value checks against the global vocabulary (ids in range and distinct,
    the bucket mass, some mass to renormalize), on the kept rows, the same on every rank (the
    teacher is replicated). ``vocab``: the width the shards tile (after the ``vocab_size``
    cut)."""
    want = cfg.get("vocab_size")
    if want is not None and want != vocab:
        raise ValueError(f"vocab_size={want} is more than the {vocab} columns the shards hold")
    if ids.shape[1] > vocab:
        raise ValueError(f"teacher_ids has K={ids.shape[1]} ids per row, more than the "
                         f"vocabulary V={vocab}")
    support = mask if mask.numel() else torch.ones_like(ids, dtype=torch.bool)
    check_teacher(ids, lp, support, vocab, cfg["tail"], cfg["slack"], keep=keep,
                  retempered=cfg["alpha"] > 0)


class VocabParallelSparseDivergenceFunction(torch.autograd.Function):
    """Per-row sparse divergence of vocabulary-sharded student logits, replicated on every rank.

    Forward: one all_gather of K + 1 floats per row (with the layout check); the compact op's
    gradient (K + 1 per row) is formed then and saved. Backward: no collective.
    """

    @staticmethod
    def forward(ctx, z, lp, ids, mask, keep, cfg, group, world, layout):
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sup = Support(ids, mask, layout[0], z.shape[1])
        pieces = torch.cat([local_pieces(z[r], sup.rows(r), cfg["transform"], cfg["inv_t"],
                                         cfg["tail"])
                            for r in row_chunks(*z.shape, CHUNK_ELEMENTS)], 1)
        c, l_off, vocab = exchange(pieces, sup_mask(mask, ids), group, world, layout)
        if vocab is not None:
            check_global(ids, lp, mask, keep, vocab, cfg)
        loss, dc, gt = compact_forward(c, lp, mask, keep, cfg, grad_s, grad_t)
        ctx.save_for_backward(z, ids, mask, keep, l_off, dc if grad_s else None,
                              gt if grad_t else None)
        ctx.cfg, ctx.start, ctx.lp_dtype = cfg, layout[0], lp.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_sparse_divergence does not support higher-order "
                               "gradients")
        z, ids, mask, keep, l_off, dc, gt = ctx.saved_tensors
        g = grad_loss.contiguous()
        d_z = d_lp = None
        if dc is not None:
            sup = Support(ids, mask, ctx.start, z.shape[1])
            dc = dc * g[:, None].to(dc.dtype)
            keep = keep_mask(keep, z)
            d_z = torch.empty_like(z)
            for r in row_chunks(*z.shape, CHUNK_ELEMENTS):
                d_z[r] = local_grad(z[r], sup.rows(r), dc[r], l_off[r], keep[r],
                                    ctx.cfg["transform"], ctx.cfg["inv_t"],
                                    off_support=ctx.cfg["tail"] != TAIL_RENORMALIZE)
        if gt is not None:
            d_lp = (gt * g[:, None].to(gt.dtype)).to(ctx.lp_dtype)
        return d_z, d_lp, *([None] * 7)


def sup_mask(mask: Tensor, ids: Tensor) -> Tensor:
    return mask if mask.numel() else torch.ones_like(ids, dtype=torch.bool)


def keep_mask(keep: Tensor, z: Tensor) -> Tensor:
    return keep if keep.numel() else torch.ones(z.shape[0], dtype=torch.bool, device=z.device)


def vocab_parallel_sparse_divergence(
    student_shard: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    kind: str = "kl",
    *,
    tail: str = "bucket",
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0, teacher_temperature: float | None = None,
    support_mask: Tensor | None = None,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean", num_items_in_batch: int | float | Tensor | None = None,
    student_logit_scale: float = 1.0, student_softcap: float | None = None,
    backend: str = "auto",
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    r""":func:`fk.sparse_divergence` with the student's logits split by vocabulary over ``group``.

    Each rank passes its columns (..., V_r) of the student logits, [vocab_start, vocab_start +
    V_r) of the vocabulary (uneven or empty shards allowed), and the same teacher triple with
    GLOBAL ids. The result is :func:`fk.sparse_divergence` of the concatenated logits, the same
    on every rank; the student gradient is this rank's columns of it and the
    ``teacher_logprobs`` gradient (when it requires grad) is the whole (..., K) one on every rank.

    Per row, with a = f(z) / T (f: the logit transform) and S the support: each rank owns the
    support entries in its columns, and one all_gather of K + 1 floats per row (a_i on its owned
    entries, 0 on the others, and the LSE of its off-support columns) gives every rank the
    compact row c = (a_1..a_K, L_off), L_off = LSE_{j not in S} a_j over all ranks. The
    single-process kernel on c (ids 0..K-1, T = 1) is the loss exactly: LSE(c) = L, and
    "bucket"'s tail log q_tail = L_off - L. The backward, without a collective, writes
    dD/dz_j = dc_i f'(z_j) / T on an owned support column (entry i) and
    dc_off exp(a_j - L_off) f'(z_j) / T off the support, dc being the compact gradient (K + 1
    floats a row, saved by the forward).

    Collectives: one all_gather of (K + 1) N floats per rank (+ 2 for the layout) per forward;
    none in the backward. The teacher's value checks (ids in [0, V) and distinct, the bucket
    mass) run against the global V on every rank (one host sync). A support holding every id of
    the vocabulary is handled up to the mass slack (its tail is empty within rounding rather
    than by construction). With one rank (or no process group) this is exactly
    :func:`fk.sparse_divergence`.

    Args:
        student_shard: this rank's (..., V_r) columns of the student logits.
        teacher_ids, teacher_logprobs, support_mask: the teacher's top-k (..., K) global ids,
            log-probs and real-entry mask (True = real), replicated, as in
            :func:`fk.sparse_divergence`.
        kind, tail, beta, alpha, lam: the divergence, the tail convention ("bucket",
            "renormalize", "none") and the kind's parameter.
        temperature, teacher_temperature: the student's T and the teacher's production
            temperature (re-tempered when it differs).
        labels, ignore_index: rows whose label is ``ignore_index`` add nothing.
        reduction, num_items_in_batch: "none", "sum" or "mean" (over kept rows, or / the count).
        student_logit_scale, student_softcap: the student's logit transform, as the
            single-process op.
        backend: the backend of the per-row kernel ("auto", "cpu", "triton", "cuda", "torch").
        vocab_size: the tokenizer's size when the vocabulary is padded: only global columns
            below it take part (the padding columns, on the last ranks, get exactly 0 gradient).
        vocab_start: this rank's first global vocabulary id (required with several ranks).
        group: the process group the vocabulary is split over (None: the default group).
    """
    no_dtensor("student_shard", student_shard)
    world, _ = _comm.world(group)
    vocab_start = _shards.check_vocab_start(vocab_start)
    if world == 1:
        return sparse_divergence(
            student_shard, teacher_ids, teacher_logprobs, kind, tail=tail, beta=beta,
            alpha=alpha, lam=lam, temperature=temperature,
            teacher_temperature=teacher_temperature, support_mask=support_mask, labels=labels,
            ignore_index=ignore_index, reduction=reduction,
            num_items_in_batch=num_items_in_batch, student_logit_scale=student_logit_scale,
            student_softcap=student_softcap, backend=backend, vocab_size=vocab_size)
    _shards.check_shard("student_shard", student_shard)
    start, width = _shards.resolve_width("student_shard", student_shard.shape[-1], vocab_start,
                                 vocab_size, world)
    lead = student_shard.shape[:-1]
    ids, lp, mask, valid, cfg = setup(
        student_shard, lead, teacher_ids, teacher_logprobs, support_mask, tail, kind,
        beta, alpha, lam, temperature, teacher_temperature, student_logit_scale,
        student_softcap, backend, labels, ignore_index)
    reduction = V.check_reduction(reduction)
    cfg["vocab_size"] = vocab_size
    # A view: the columns at or past vocab_size get exactly zero gradient through the slice.
    z = _shards.rows(student_shard[..., :width])
    keep = valid.reshape(-1) if valid is not None else torch.empty(0, dtype=torch.bool,
                                                                  device=z.device)
    loss = VocabParallelSparseDivergenceFunction.apply(z, lp, ids, mask, keep, cfg, group, world,
                                                       (start, width))
    return V.reduce_rows(loss, valid, reduction, lead, num_items_in_batch)


__all__ = ["VocabParallelSparseDivergenceFunction", "vocab_parallel_sparse_divergence"]
