"""``vocab_parallel_fused_linear_divergence``: vocab-sharded lm heads + divergence, fused.

Each rank holds rows [vocab_start, vocab_start + V_r) of both lm-head weights (one partition for
both) and the full hidden states. Per chunk of rows it forms its (chunk, V_r) logits in fp32, the
row statistics cross ranks (an all_gather of the chunk's 2 LSEs per row, an all_reduce of its
partial sums), and the chunk's logit gradient updates the local dW / db and this rank's partial
dh = dz_r W_r. The full dh is the sum over ranks of the partials: all-reduced here once at the end
(``reduce_hidden_grad=True``), or returned partial for the caller's region op (Megatron's
``copy_to_tensor_model_parallel_region`` / a DTensor ``Partial`` placement sums it in backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels import phases
from fdiv_kernels.core import _validation as V
from fdiv_kernels.distributed import _comm, _shards
from fdiv_kernels.fused_linear import _engine as E
from fdiv_kernels.fused_linear._dense import fused_linear_divergence
from fdiv_kernels.kinds._registry import resolve
from fdiv_kernels.distributed._vocab_divergence import kind_kwargs, shard_lse, shard_sums
from fdiv_kernels.distributed._vocab_stats import local_grad


def _chunk_stats(zs: Tensor, zt: Tensor, labels: Tensor, keep: Tensor, a: dict) -> Tensor:
    """(4, c) per-row statistics of a chunk: the two models' LSEs at temperature T, and with a
    CE term the student's LSE at T = 1 and its CE. One all_gather of 2 (5 with CE) floats a row:
    the shards' LSEs, and for CE the label logit where this rank owns the label and an owner flag.
    """
    inv_t, backend, ce = a["inv_t"], a["backend"], a["ce_weight"] > 0
    local = [shard_lse(zs, inv_t, backend), shard_lse(zt, inv_t, backend)]
    if ce:
        owned = labels >= 0
        picked = (zs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) if zs.shape[-1]
                  else torch.zeros_like(local[0]))
        local += [shard_lse(zs, 1.0, backend), torch.where(owned, picked, 0.0), owned.to(zs.dtype)]
    g = _shards.gather_rows(torch.stack(local), a["group"], a["world"], a.pop("layout", None))
    out = zs.new_zeros((4, zs.shape[0]))
    out[0], out[1] = phases.combine_lse(g[:, 0]), phases.combine_lse(g[:, 1])
    if ce:
        out[2] = phases.combine_lse(g[:, 2])
        # A label no rank owns (out of range) gives NaN rather than a host sync to raise.
        ce_rows = torch.where(g[:, 4].sum(0) == 1, out[2] - g[:, 3].sum(0), torch.nan)
        out[3] = torch.where(keep, ce_rows, 0.0)
    return out


def _heads(hs, ws, bs, ht, wt, bt, needs) -> dict[str, E.Head]:
    return {"s": E.Head(hs, ws, bs, *needs[:3]), "t": E.Head(ht, wt, bt, *needs[3:])}


def _run(a: dict, heads: dict[str, E.Head], row_weights: Tensor,
         stats: tuple[Tensor, Tensor] | None, sums_for: tuple[bool, bool] | None = None):
    """Per-row loss, per-row (lse_s, lse_t) and sums, and the row-weighted gradients.

    With ``stats`` (the saved LSEs and sums of a forward) no collective is issued but the final
    dh all-reduce; without, each chunk issues its two, all-reducing the partial sums that the
    gradients of ``sums_for`` = (student, teacher) need (default: those computed now).
    """
    hs = heads["s"].hidden
    n, width = hs.shape[0], heads["s"].weight.shape[0]
    acc = torch.promote_types(hs.dtype, torch.float32)
    grad_s, grad_t = heads["s"].needs_grad, heads["t"].needs_grad
    lse = hs.new_empty((4, n), dtype=acc) if stats is None else stats[0]  # see _chunk_stats
    sums = hs.new_empty((n, 3), dtype=acc) if stats is None else stats[1]
    spec, kw, inv_t, backend = a["spec"], kind_kwargs(a["spec"]), a["inv_t"], a["backend"]
    ce_w = a["ce_weight"]

    def step(rows: slice, z: dict) -> dict | None:
        zs, zt = z["s"], z["t"]
        keep = a["valid"][rows]
        if stats is None:
            lse[:, rows] = _chunk_stats(zs, zt, a["labels"][rows], keep, a)
            sums[rows] = shard_sums(zs, zt, keep, lse[0, rows], lse[1, rows], spec, kw, inv_t,
                                    backend, a["group"], *(sums_for or (grad_s, grad_t)))
        if not (grad_s or grad_t) or width == 0:
            return None
        gzs, gzt = phases.grads(zs, zt, lse[0, rows], lse[1, rows], sums[rows], spec.kind,
                                temperature=1.0 / inv_t, valid=keep, grad_student=grad_s,
                                grad_teacher=grad_t, backend=backend, **kw)
        if ce_w and gzs is not None:
            # d CE / d z = softmax(z) - onehot(label): the stats backward with g_lp = -1.
            gce = local_grad(zs, a["labels"][rows], keep, lse[2, rows], None, None, None,
                             torch.full_like(lse[2, rows], -1.0), 1.0, backend)
            gzs = gzs.mul_(1.0 - ce_w).add_(gce.mul_(ce_w))
            del gce
        if gzt is not None and ce_w:
            gzt = gzt.mul_(1.0 - ce_w)
        w_rows = row_weights[rows, None]
        # dh here is this rank's partial dz_r W_r.
        return {"s": None if gzs is None else gzs.mul_(w_rows),
                "t": None if gzt is None else gzt.mul_(w_rows)}

    grads = E.run(heads, n, a["chunk"], step, acc=acc, zero_hidden=True, fixed=a["fixed"])
    if a["reduce_hidden_grad"]:
        for g in grads.values():
            if g.h is not None:
                g.h = _comm.all_reduce_sum(g.h, a["group"])
    loss = sums[:, 0] * (1.0 - ce_w) + lse[3] * ce_w if ce_w else sums[:, 0].clone()
    return loss, (lse, sums), grads


class VocabParallelFusedLinearDivergenceFunction(torch.autograd.Function):
    """The autograd op behind :func:`vocab_parallel_fused_linear_divergence` (call that).

    For a scalar reduction the forward forms the gradients chunk by chunk and the backward only
    scales them; for ``reduction="none"`` it saves the per-row LSEs and partial sums and the
    backward recomputes the chunks from them, with no collective but the dh all_reduce.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, args, row_weights, reduction):
        needs = tuple(ctx.needs_input_grad[:6])
        ctx.reduction, ctx.needs, ctx.args = reduction, needs, args
        if reduction == "none":
            # Gradients need the per-row upstream gradient: the backward recomputes the chunks
            # from the saved row statistics (no LSE / partial-sum collective a second time).
            later = (any(needs[:3]), any(needs[3:]))
            loss, stats, _ = _run(args, _heads(hs, ws, bs, ht, wt, bt, (False,) * 6),
                                  row_weights, None, later)
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, *stats)
            return loss
        heads = _heads(hs, ws, bs, ht, wt, bt, needs)
        loss, _, grads = _run(args, heads, row_weights, None)
        ctx.heads, ctx.grads = heads, grads
        return (loss * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_fused_linear_divergence does not support "
                               "higher-order gradients")
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt, lse, sums = ctx.saved_tensors
            heads = _heads(hs, ws, bs, ht, wt, bt, ctx.needs)
            _, _, grads = _run(ctx.args, heads, grad_out.contiguous().to(lse.dtype), (lse, sums))
            scale = None
        else:
            heads, grads, scale = ctx.heads, ctx.grads, grad_out
        return (*grads["s"].out(heads["s"], scale), *grads["t"].out(heads["t"], scale),
                None, None, None)


def vocab_parallel_fused_linear_divergence(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_weight_shard: Tensor,
    kind: str = "kl",
    *,
    group: dist.ProcessGroup | None = None,
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0,
    student_bias_shard: Tensor | None = None,
    teacher_bias_shard: Tensor | None = None,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    vocab_start: int | None = None,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    backend: str = "auto",
    reduce_hidden_grad: bool = True,
    vocab_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    r"""``fk.fused_linear_divergence`` with both lm heads column-parallel over ``group``.

    Weights are this rank's (V_r, H) rows of each head, one vocabulary partition for both (pad
    with bias -inf in both); hidden states are the full (..., H) on every rank. The loss equals
    ``fk.fused_linear_divergence`` on the concatenated heads, the same on every rank, and no
    (N, V) logits exist anywhere. dW and db are this rank's shard. dh: with
    ``reduce_hidden_grad=True`` the full gradient (summed over ranks here); with False this
    rank's partial z_r-gradient times W_r, for a caller whose region op sums it in backward.

    Collectives per forward: without ``chunk_size``, one all_gather of one number first (the
    ranks take the smallest of their budget chunks, which follow each shard's width); per chunk
    of c rows, an all_gather of 2c floats and an all_reduce of
    1-3 c floats (as :func:`vocab_parallel_divergence`), then, for a scalar ``reduction`` with
    ``reduce_hidden_grad``, one all_reduce of the (N, H) hidden gradient of each model that needs
    one. Backward: none for scalar reductions (the gradients are formed in the forward); with
    ``reduction="none"`` the chunks are recomputed from the saved per-row statistics and only the
    dh all_reduce (if ``reduce_hidden_grad``) runs there. With ``ce_weight = w`` the per-row loss
    is (1 - w) D + w CE(student, labels) as in the plain op: ``labels`` are global ids and
    ``vocab_start`` (this rank's first id) is required; the chunk's all_gather then carries 5
    floats a row (adding the student's T = 1 LSE, the owned label logit, an owner flag), and a
    label no rank owns gives NaN. One rank: exactly ``fk.fused_linear_divergence``.

    Args:
        student_hidden, teacher_hidden: (..., H_s) and (..., H_t) hidden states, the full rows
            on every rank, with the same leading shape.
        student_weight_shard, teacher_weight_shard: this rank's (V_r, H_s) and (V_r, H_t) rows
            of each lm head (the same V_r for both).
        kind: the divergence, as :func:`fdiv_kernels.divergence`.
        group: the tensor-parallel process group (None: the default group).
        beta, alpha, lam: the kind's parameter, as :func:`fdiv_kernels.divergence`.
        temperature: T > 0, applied to both models' logits.
        student_bias_shard, teacher_bias_shard: optional (V_r,) slices of the heads' biases.
        labels: optional global ids of the leading shape: rows equal to ``ignore_index`` add
            nothing; with ``ce_weight`` also the cross-entropy targets.
        ignore_index: label value of ignored rows.
        reduction: "none", "sum" or "mean", as :func:`fdiv_kernels.divergence`.
        ce_weight: w in [0, 1], the weight of the student's cross-entropy (see above).
        vocab_start: this rank's first vocabulary id (required with ``ce_weight``).
        chunk_size: rows per chunk (None: from a memory budget, as the plain op).
        num_items_in_batch: the divisor of ``"mean"`` when given.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        reduce_hidden_grad: sum the hidden-state gradient over the ranks here (see above).
        vocab_size: the tokenizer's size when the heads are padded: only global rows below it
            take part (each rank cuts its shards there; the padding rows get exactly zero
            gradient); needs ``vocab_start`` with several ranks. Both shards still share one
            partition.
        batch_invariant: every chunk GEMM runs at one fixed row block (the engine's
            batch-invariant mode, as ``fk.fused_linear_divergence``): a row's loss and gradients
            are bit-identical whatever the batch, its position or the chunking.
    """
    world, _ = _comm.world(group)
    common = dict(beta=beta, alpha=alpha, lam=lam, temperature=temperature, labels=labels,
                  ignore_index=ignore_index, reduction=reduction, ce_weight=ce_weight,
                  chunk_size=chunk_size,
                  num_items_in_batch=num_items_in_batch, backend=backend,
                  batch_invariant=batch_invariant)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got "
                        f"{type(reduce_hidden_grad).__name__}")
    vocab_start = _shards.check_vocab_start(vocab_start)
    if world == 1:
        return fused_linear_divergence(student_hidden, student_weight_shard, teacher_hidden,
                                       teacher_weight_shard, kind, student_bias=student_bias_shard,
                                       teacher_bias=teacher_bias_shard, vocab_size=vocab_size,
                                       **common)
    hs, ws, bs = E.check_head("student_hidden", student_hidden, "student_weight_shard",
                              student_weight_shard, "student_bias_shard", student_bias_shard)
    ht, wt, bt = E.check_head("teacher_hidden", teacher_hidden, "teacher_weight_shard",
                              teacher_weight_shard, "teacher_bias_shard", teacher_bias_shard)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student_hidden and teacher_hidden must share the leading shape, got "
                         f"{tuple(hs.shape[:-1])} and {tuple(ht.shape[:-1])}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"student and teacher weight shards must cover the same vocabulary "
                         f"columns, got V_r={ws.shape[0]} and V_r={wt.shape[0]}")
    E.check_devices(hs, ht, ws, wt, bs, bt)
    layout = None if vocab_start is None else (vocab_start, ws.shape[0])
    if vocab_size is not None:
        # Views: the rows at or past vocab_size get exactly zero gradient through the slice.
        vocab_start, width = _shards.resolve_width("student_weight_shard", ws.shape[0],
                                                   vocab_start, vocab_size, world)
        ws, wt = ws[:width], wt[:width]
        bs = bs[:width] if bs is not None else None
        bt = bt[:width] if bt is not None else None
        layout = (vocab_start, width, vocab_size)
    spec = resolve(kind, beta, alpha, lam)
    inv_t = V.check_temperature(temperature, torch.promote_types(hs.dtype, ws.dtype))
    ce_w = E.check_ce_weight(ce_weight, labels)
    if ce_w and vocab_start is None:
        raise ValueError("ce_weight > 0 with more than one rank needs vocab_start (the first "
                         "global vocabulary id of this rank's shard)")
    acc = torch.promote_types(hs.dtype, torch.float32)
    # Not packed: every rank must run the same chunks (their collectives pair up), whatever
    # labels a rank was given.
    plan = E.rows(hs.shape[:-1], hs.device, acc, labels=labels, ignore_index=ignore_index,
                  reduction=reduction, num_items_in_batch=num_items_in_batch,
                  chunk_size=chunk_size, vocab=max(ws.shape[0], 1), pack=False,
                  batch_invariant=batch_invariant)
    plan = _shards.agree_chunk(plan, chunk_size, group, world)
    n = plan.n
    keep = plan.keep_mask()
    local_labels = torch.full((n,), -1, dtype=torch.long, device=hs.device)
    if ce_w:  # the label's column in this shard, or -1 (another rank's label, or ignored)
        flat = plan.labels - vocab_start
        local_labels = torch.where(keep & (flat >= 0) & (flat < ws.shape[0]), flat, -1)
    name = _shards.pick_backend(backend, torch.empty(0, device=hs.device),
                                ("divergence_partials", "divergence_grads", "softmax_stats_fwd",
                                 "softmax_stats_bwd"))
    args = {"spec": spec, "inv_t": inv_t, "valid": keep, "labels": local_labels,
            "ce_weight": ce_w, "chunk": plan.chunk, "backend": name,
            "group": group, "world": world, "reduce_hidden_grad": reduce_hidden_grad,
            "fixed": plan.fixed,
            # Checked in the first chunk's all_gather (popped there: once per call).
            "layout": layout}
    out = VocabParallelFusedLinearDivergenceFunction.apply(
        hs.reshape(n, hs.shape[-1]), ws, bs, ht.reshape(n, ht.shape[-1]), wt, bt, args,
        plan.weights, plan.reduction,
    )
    return plan.scatter(out) if plan.reduction == "none" else out
