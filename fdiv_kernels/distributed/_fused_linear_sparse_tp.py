r"""``vocab_parallel_fused_linear_sparse_divergence``: a vocab-sharded lm head + a sparse teacher.

Each rank holds rows [vocab_start, vocab_start + V_r) of the student's lm head and the full hidden
states; the teacher (top-k global ids and log-probs) is replicated. The chunk engine
(``fused_linear/_engine.py``) forms a chunk's (chunk, V_r) logits in fp32; the chunk's compact
rows (``_vocab_sparse``: the owned support logits and the off-support LSE, K + 1 floats a row)
cross ranks in one all_gather, the single-process sparse kernel runs on them, and the chunk's
logit gradient (local, from the compact gradient) updates dW / db and this rank's partial
dh = dz_r W_r. The (N, V_r) logits never exist for all rows at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels.distributed import _comm, _shards
from fdiv_kernels.distributed._vocab_sparse import (
    Support,
    check_global,
    compact_forward,
    exchange,
    local_grad,
    local_pieces,
    no_dtensor,
    setup,
)
from fdiv_kernels.divergences._sparse_tails import TAIL_RENORMALIZE
from fdiv_kernels.fused_linear import _engine as E
from fdiv_kernels.fused_linear._sparse import cpu_chunk_rows, fused_linear_sparse_divergence


def _run(a: dict, head: E.Head, lp: Tensor | None, row_weights: Tensor, grad_t: bool,
         saved: tuple[Tensor, Tensor] | None = None, store: bool = False):
    """Per-row loss, the row-weighted student gradients and the (n, K) teacher gradient.

    Without ``saved`` each chunk issues its all_gather (the first one also carries the layout);
    ``store`` keeps the compact gradient and L_off of every row for a later backward. With
    ``saved`` = (dc, L_off) no collective runs but the final dh all_reduce.
    """
    hs = head.hidden
    n, K = hs.shape[0], a["ids"].shape[1]
    acc = torch.promote_types(hs.dtype, torch.float32)
    grad_s = head.needs_grad
    want_dc = grad_s or store
    cfg, sup_all, keep, mask = a["cfg"], a["support"], a["keep"], a["mask"]
    real = mask if mask.numel() else torch.ones_like(a["ids"], dtype=torch.bool)
    loss = hs.new_zeros(n, dtype=acc)
    gt_all = hs.new_zeros(n, K, dtype=acc) if grad_t else None
    dc_all = hs.new_zeros(n, K + 1, dtype=acc) if store else None
    l_off_all = hs.new_zeros(n, dtype=acc) if store else None
    layout = [a["layout"]]

    def step(rows: slice, z: dict):
        z = z["s"]
        sup = sup_all.rows(rows)
        if saved is None:
            pieces = local_pieces(z, sup, cfg["transform"], cfg["inv_t"], cfg["tail"],
                                  scratch=True)
            c, l_off, vocab = exchange(pieces, real[rows], a["group"], a["world"], layout.pop()
                                       if layout else None)
            if vocab is not None:  # the first chunk: the global vocabulary is known now
                check_global(a["ids"], lp, mask, keep, vocab, cfg)
            loss[rows], dc, gt = compact_forward(
                c, lp[rows], mask[rows] if mask.numel() else mask, keep[rows], cfg, want_dc,
                grad_t)
            if grad_t:
                gt_all[rows] = gt * row_weights[rows, None]
            if store:
                dc_all[rows], l_off_all[rows] = dc, l_off
        else:
            dc, l_off = saved[0][rows], saved[1][rows]
        if not grad_s or sup.width == 0:
            return None
        # Written into the chunk's logits buffer: the engine reads dz before the next GEMM.
        dz = local_grad(z, sup, dc * row_weights[rows, None], l_off, keep[rows],
                        cfg["transform"], cfg["inv_t"], scratch=True,
                        off_support=cfg["tail"] != TAIL_RENORMALIZE)
        return {"s": dz}  # dh here is this rank's partial dz_r W_r

    grads = E.run({"s": head}, n, a["chunk"], step, acc=acc, zero_hidden=True, fixed=a["fixed"],
                  reuse_logits=("s",))
    if a["reduce_hidden_grad"] and grads["s"].h is not None:
        grads["s"].h = _comm.all_reduce_sum(grads["s"].h, a["group"])
    return loss, grads["s"], gt_all, (dc_all, l_off_all)


class VocabParallelFusedLinearSparseDivergenceFunction(torch.autograd.Function):
    """The autograd op behind :func:`vocab_parallel_fused_linear_sparse_divergence`.

    Scalar reductions form the gradients in the forward (the backward scales them);
    ``reduction="none"`` saves the compact gradient (K + 1 floats a row) and the off-support
    LSE, and the backward recomputes the chunks' logits from them with no collective but the dh
    all_reduce.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, lp, args, row_weights, reduction):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.needs, ctx.args = reduction, needs, args
        grad_t = ctx.needs_input_grad[3]
        ctx.lp_dtype = lp.dtype
        if reduction == "none":
            loss, _, gt, stored = _run(args, E.Head(hs, ws, bs), lp, torch.ones_like(row_weights),
                                       grad_t, store=any(needs))
            ctx.save_for_backward(hs, ws, bs, gt, *stored)
            return loss
        head = E.Head(hs, ws, bs, *needs)
        loss, grads, gt, _ = _run(args, head, lp, row_weights, grad_t)
        ctx.head, ctx.grads, ctx.gt = head, grads, gt
        return (loss * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_fused_linear_sparse_divergence does not support "
                               "higher-order gradients")
        if ctx.reduction == "none":
            hs, ws, bs, gt, dc, l_off = ctx.saved_tensors
            g = grad_out.contiguous().to(torch.promote_types(hs.dtype, torch.float32))
            out = (None, None, None)
            if any(ctx.needs):
                head = E.Head(hs, ws, bs, *ctx.needs)
                _, grads, _, _ = _run(ctx.args, head, None, g, False, saved=(dc, l_off))
                out = grads.out(head)
            d_lp = None if gt is None else (gt * g[:, None]).to(ctx.lp_dtype)
            return (*out, d_lp, None, None, None)
        if ctx.grads is None:
            raise RuntimeError("vocab_parallel_fused_linear_sparse_divergence: the gradients were "
                               "handed out by an earlier backward (a second backward through the "
                               "same graph is not supported)")
        head, grads, gt = ctx.head, ctx.grads, ctx.gt
        ctx.grads = ctx.gt = None
        out = grads.out(head, grad_out)
        d_lp = None if gt is None else (gt * grad_out).to(ctx.lp_dtype)
        return (*out, d_lp, None, None, None)


def vocab_parallel_fused_linear_sparse_divergence(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    kind: str = "kl",
    *,
    tail: str = "bucket",
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0, teacher_temperature: float | None = None,
    support_mask: Tensor | None = None,
    student_bias_shard: Tensor | None = None,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    student_logit_scale: float = 1.0, student_softcap: float | None = None,
    backend: str = "auto",
    vocab_size: int | None = None,
    batch_invariant: bool = False,
    vocab_start: int | None = None,
    group: dist.ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
) -> Tensor:
    r""":func:`fk.fused_linear_sparse_divergence` with the student's lm head column-parallel.

    The weight is this rank's (V_r, H) rows of the head (uneven or empty shards allowed), the
    bias its (V_r,) slice; the hidden states are the full (..., H) on every rank; the teacher
    triple (global ids) is replicated. The loss equals :func:`fk.fused_linear_sparse_divergence`
    on the concatenated head, the same on every rank; no (N, V) or (N, V_r) logits exist (the
    engine forms (chunk, V_r) at a time). dW and db are this rank's shard; dh is the full
    gradient (``reduce_hidden_grad=True``: summed over the ranks here) or this rank's partial
    dz_r W_r (False: for a caller whose region op sums it); the ``teacher_logprobs`` gradient is
    the whole (..., K) one on every rank.

    Per chunk, as :func:`vocab_parallel_sparse_divergence`: z_r = h W_r^T + b_r, a = f(z_r) / T;
    one all_gather of K + 1 floats a row (the owned support entries' a_i and this shard's
    off-support LSE) gives the compact row c = (a_1..a_K, L_off); the single-process kernel on it
    gives the loss and the compact gradient dc; locally dz_j = dc_i f'/T on an owned support
    column, dc_off exp(a_j - L_off) f'/T elsewhere, and dW += dz^T h, db += sum dz,
    dh += dz W_r.

    Collectives per forward: without ``chunk_size``, one all_gather of one number first (the
    ranks take the smallest of their budget chunks, which follow each shard's width); one
    all_gather of (K + 1) c floats per chunk of c rows (+ 2 for the layout in the first), then, for a scalar reduction with ``reduce_hidden_grad``, one
    all_reduce of the (N, H) hidden gradient. Backward: none for scalar reductions; with
    ``reduction="none"`` the chunks are recomputed from the saved compact gradients (K + 2 floats
    a row) and only the dh all_reduce runs there. One rank: exactly the single-process op.

    Args:
        student_hidden: (..., H) hidden states, the full rows on every rank.
        student_weight_shard: this rank's (V_r, H) rows of the lm head.
        teacher_ids, teacher_logprobs, support_mask: the teacher's top-k global ids, log-probs
            and real-entry mask, as in :func:`fk.sparse_divergence`.
        kind, tail, beta, alpha, lam: the divergence, the tail convention and the kind's
            parameter.
        temperature, teacher_temperature: the student's T and the teacher's production T.
        student_bias_shard: optional (V_r,) slice of the head's bias.
        labels, ignore_index: rows whose label is ``ignore_index`` add nothing.
        reduction, num_items_in_batch: "none", "sum" or "mean" (over kept rows, or / the count).
        chunk_size: rows per chunk (None: from a memory budget, as the single-process op).
        student_logit_scale, student_softcap: the student's logit transform.
        backend: the backend of the per-row kernel ("auto", "cpu", "triton", "cuda", "torch").
        vocab_size: the tokenizer's size when the head is padded: only global rows below it take
            part (the padding rows get exactly 0 gradient).
        batch_invariant: every chunk GEMM at one fixed row block (``fk.fused_linear_*``'s
            batch-invariant mode): a row's loss and gradients do not depend on the batch.
        vocab_start: this rank's first global vocabulary id (required with several ranks).
        group: the tensor-parallel process group (None: the default group).
        reduce_hidden_grad: sum the hidden-state gradient over the ranks here (see above).
    """
    no_dtensor("student_weight_shard", student_weight_shard)
    world, _ = _comm.world(group)
    vocab_start = _shards.check_vocab_start(vocab_start)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got "
                        f"{type(reduce_hidden_grad).__name__}")
    if world == 1:
        return fused_linear_sparse_divergence(
            student_hidden, student_weight_shard, teacher_ids, teacher_logprobs, kind, tail=tail,
            beta=beta, alpha=alpha, lam=lam, temperature=temperature,
            teacher_temperature=teacher_temperature, support_mask=support_mask,
            student_bias=student_bias_shard, labels=labels, ignore_index=ignore_index,
            reduction=reduction, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
            student_logit_scale=student_logit_scale, student_softcap=student_softcap,
            backend=backend, vocab_size=vocab_size, batch_invariant=batch_invariant)
    hs, ws, bs = E.check_head("student_hidden", student_hidden, "student_weight_shard",
                              student_weight_shard, "student_bias_shard", student_bias_shard)
    E.check_devices(hs, ws, bs)
    start, width = _shards.resolve_width("student_weight_shard", ws.shape[0], vocab_start,
                                         vocab_size, world)
    ws, bs = ws[:width], (bs[:width] if bs is not None else None)  # views: padding rows get 0
    lead = hs.shape[:-1]
    ids, lp, mask, _, cfg = setup(
        torch.empty(0, dtype=torch.promote_types(hs.dtype, ws.dtype), device=hs.device), lead,
        teacher_ids, teacher_logprobs, support_mask, tail, kind, beta, alpha, lam, temperature,
        teacher_temperature, student_logit_scale, student_softcap, backend, None, ignore_index)
    cfg["vocab_size"] = vocab_size
    acc = torch.promote_types(hs.dtype, torch.float32)
    # Not packed: every rank runs the same chunks (their collectives pair up).
    plan = E.rows(lead, hs.device, acc, labels=labels, ignore_index=ignore_index,
                  reduction=reduction, num_items_in_batch=num_items_in_batch,
                  chunk_size=chunk_size, vocab=max(width, 1), pack=False,
                  chunk_of=lambda m: (cpu_chunk_rows(m, max(width, 1), 2)
                                      if hs.device.type == "cpu"
                                      else E.default_chunk_size(m, width, hs.device)),
                  batch_invariant=batch_invariant)
    plan = _shards.agree_chunk(plan, chunk_size, group, world)
    args = {"cfg": cfg, "ids": ids, "mask": mask, "keep": plan.keep_mask(),
            "support": Support(ids, mask, start, width), "chunk": plan.chunk,
            "fixed": plan.fixed, "group": group, "world": world,
            "reduce_hidden_grad": reduce_hidden_grad, "layout": (start, width)}
    out = VocabParallelFusedLinearSparseDivergenceFunction.apply(
        hs.reshape(plan.n, hs.shape[-1]), ws, bs, lp, args, plan.weights, plan.reduction)
    return plan.scatter(out) if plan.reduction == "none" else out


__all__ = ["VocabParallelFusedLinearSparseDivergenceFunction",
           "vocab_parallel_fused_linear_sparse_divergence"]
