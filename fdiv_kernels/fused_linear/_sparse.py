"""``fk.fused_linear_sparse_divergence``: lm head + divergence against a sparse (top-k) teacher,
the (N, V) student logits never materialized.

Rows go in chunks: the chunk's logits z = h W^T + b are formed in fp32, the sparse divergence op
returns the chunk's per-row loss and d loss / d z in one launch, and the chunk's share of the
hidden / weight / bias gradients is accumulated in fp32 before the next chunk. The teacher side
(checks, re-tempering, tail, its gradient) is done per row inside the kernel, as in
:func:`fk.sparse_divergence`. As in ``fused_linear_divergence``, a scalar reduction computes the
gradients in the forward; ``reduction="none"`` recomputes the chunks in the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import SoftmaxOps, select_ops
from fdiv_kernels.core._transforms import check_logit_transform, transform_logits
from fdiv_kernels.divergences._sparse import check_sparse_teacher, mass_slack, teacher_alpha
from fdiv_kernels.fused_linear import _engine as E
from fdiv_kernels.fused_linear._dense import _cross_entropy
from fdiv_kernels.kinds._registry import resolve

# CPU memory budget of one chunk's (chunk, V) fp32 buffers, all of them together: one when the
# kernel writes the gradient over the chunk's logits (the cpu backend, no ce_weight), else two
# (the logits, reused, and the kernel's gradient). The rows come from the budget, not a fixed
# small chunk: every chunk re-reads W for its logits and dh GEMMs and re-writes the fp32 dW
# accumulator, and a GEMM of a few dozen rows runs far below the GEMM rate. At N=1024, H=256,
# V=32000 (fp32, 2 shared threads, interleaved, speed against eager / peak against eager's):
# 256-row chunks in place 1.28x / 0.17x, 342 rows (this budget: 3 equal chunks) 1.38x / 0.20x,
# 512 rows 1.56x / 0.26x; the earlier 8 MiB budget (65 rows, two buffers) 0.73x / 0.17x
# (bench/results/2026-12-07-cpu-2t-sparse-forms.md). glibc keeps freed blocks under its mmap
# threshold (at most 32 MiB) resident, so two 16 MiB buffers cost more than their size (111 MiB
# peak at 128 rows against 65 MiB for one 32 MiB buffer).
CPU_CHUNK_BYTES = 48 << 20


def _run(a: dict, head: E.Head, lp: Tensor, row_weights: Tensor, grad_t: bool
         ) -> tuple[Tensor, dict, Tensor | None]:
    """Loss per row, the row-weighted student gradients and the (N, K) teacher gradient."""
    hs = head.hidden
    n, K = hs.shape[0], a["ids"].shape[1]
    acc = torch.promote_types(hs.dtype, torch.float32)
    grad_s = head.needs_grad
    gt_all = hs.new_zeros(n, K, dtype=acc) if grad_t else None
    ops: SoftmaxOps = a["ops"]
    spec, ce_w = a["spec"], a["ce_weight"]
    scale, cap = a["transform"]
    mask, valid = a["mask"], a["valid"]
    loss = hs.new_empty(n, dtype=acc)

    in_place = grad_s and in_place_gradient(ops, ce_w)

    def step(rows: slice, z: dict) -> dict:
        z = z["s"]
        teacher = (a["ids"][rows], lp[rows], mask[rows] if mask.numel() else mask,
                   valid[rows] if valid.numel() else valid, spec.base, spec.swap, spec.param,
                   a["inv_t"], a["tail"], a["alpha"], a["slack"], scale, cap)
        if in_place:  # the chunk's logits (the engine's buffer) become its gradient
            div, gt, _ = ops.sparse_divergence_fwd_inplace(z, *teacher, grad_t)
            gz = z
        else:
            div, gz, gt, _ = ops.sparse_divergence_fwd(z, *teacher, grad_s, grad_t)
        w_rows = row_weights[rows, None]
        loss[rows] = div
        gce = None
        if ce_w:
            zt, dz = (z, 1.0) if (scale == 1.0 and not cap) else transform_logits(z, scale, cap)
            ce, gce = _cross_entropy(zt, a["labels"][rows], a["ignore_index"], ops, grad_s)
            del zt
            if grad_s and not (isinstance(dz, float) and dz == 1.0):
                gce = gce.mul_(dz)  # d CE / d z = d CE / d f(z) f'(z)
            loss[rows] = (1.0 - ce_w) * div + ce_w * ce
        if grad_t:
            gt_all[rows] = gt * (w_rows * (1.0 - ce_w))
        if not grad_s:
            return {}
        g = gz.mul_(w_rows * (1.0 - ce_w))  # in place: no second (chunk, V) buffer
        if ce_w:
            g.add_(gce.mul_(w_rows * ce_w))
        return {"s": g}

    # One logits buffer for every chunk, written by the GEMM in place: a fresh (chunk, V) buffer
    # per chunk is freed into glibc's heap (chunks under its 32 MiB mmap threshold) and the
    # heap's fragments stay resident: 142-174 MiB peak instead of 65 MiB at N=1024, V=32000.
    grads = E.run({"s": head}, n, a["chunk"], step, keep=valid if valid.numel() else None,
                  acc=acc, reuse_logits=("s",), fixed=a["fixed"])
    return loss, grads, gt_all


def in_place_gradient(ops: SoftmaxOps, ce_weight: float) -> bool:
    """Whether the kernel can write the student gradient over the chunk's logits: the backend
    has the in-place op and nothing reads the logits after it (the cross-entropy part does)."""
    return (ops.sparse_divergence_fwd_inplace is not None and not ce_weight
            and not torch.compiler.is_compiling())


def cpu_chunk_rows(m: int, vocab: int, buffers: int, budget: int = CPU_CHUNK_BYTES) -> int:
    """Rows per chunk on the CPU: ``buffers`` fp32 (chunk, vocab) buffers within ``budget``
    bytes, the m rows then split into equal chunks (1024 rows at a 393-row budget: 3 x 342, not
    2 x 393 + 238)."""
    cap = max(1, budget // (buffers * 4 * max(vocab, 1)))
    if m <= cap:
        return max(1, m)
    return -(-m // -(-m // cap))


class FusedLinearSparseDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, lp, args, row_weights, reduction):
        needs = ctx.needs_input_grad[:3]
        ctx.reduction, ctx.needs, ctx.args = reduction, needs, args
        ctx.grad_t, ctx.lp_dtype = ctx.needs_input_grad[3], lp.dtype
        if reduction == "none":
            ctx.save_for_backward(hs, ws, bs, lp)
            loss, _, _ = _run(args, E.Head(hs, ws, bs), lp, row_weights, False)
            return loss
        head = E.Head(hs, ws, bs, *needs)
        loss, grads, gt = _run(args, head, lp, row_weights, ctx.grad_t)
        ctx.head, ctx.grads, ctx.gt = head, grads, gt
        return (loss * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_sparse_divergence does not support higher-order "
                               "gradients")
        if ctx.reduction == "none":
            hs, ws, bs, lp = ctx.saved_tensors
            head = E.Head(hs, ws, bs, *ctx.needs)
            _, grads, gt = _run(ctx.args, head, lp, grad_out.contiguous().to(torch.float32),
                                ctx.grad_t)
            out = grads["s"].out(head)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_sparse_divergence: the gradients computed in "
                                   "the forward were handed out by an earlier backward (a "
                                   "second backward through the same graph is not supported)")
            head, grads, gt = ctx.head, ctx.grads["s"], ctx.gt
            # Scaled in place and handed out: no second (V, H) buffer for d W.
            ctx.grads = ctx.gt = None
            out = tuple(None if g is None else g.mul_(grad_out).to(like.dtype)
                        for g, like in ((grads.h, head.hidden), (grads.w, head.weight),
                                        (grads.b, head.bias)))
            if gt is not None:
                gt = gt.mul_(grad_out)
        d_lp = gt.to(ctx.lp_dtype) if gt is not None else None
        return (*out, d_lp, None, None, None)


def fused_linear_sparse_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    kind: str = "kl",
    *,
    tail: str = "bucket",
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0, teacher_temperature: float | None = None,
    support_mask: Tensor | None = None,
    student_bias: Tensor | None = None,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    student_logit_scale: float = 1.0, student_softcap: float | None = None,
    backend: str = "auto",
    vocab_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    r""":func:`fk.sparse_divergence` of the student logits z = student_hidden W^T + b, without the
    (N, V) logits.

    ``student_hidden`` (..., H), ``student_weight`` (V, H), ``student_bias`` (V,) or None; the
    teacher triple and every other argument mean what they mean in :func:`fk.sparse_divergence`.
    With ``ce_weight = w`` the per-row loss is (1 - w) D + w CE(z, labels) (labels required).
    ``student_logit_scale`` / ``student_softcap`` transform z as in :func:`fk.sparse_divergence`
    (the cross-entropy part, with ``ce_weight``, sees the transformed logits too).
    Logits are formed in fp32; gradients (hidden, weight, bias, and ``teacher_logprobs`` when it
    requires grad) accumulate in fp32 and return in each input's dtype. ``chunk_size`` rows are
    processed at a time (default: from a memory budget, 48 MiB of (chunk, V) fp32 buffers on the
    CPU, one buffer when the kernel writes the gradient over the logits and two with
    ``ce_weight``, then equal chunks). With a scalar reduction the gradients are computed in the
    forward and handed out by the backward, once (a second backward through the same graph
    raises).
    ``vocab_size``: the tokenizer's size when ``student_weight`` is padded to more rows (only
    the first ``vocab_size`` rows take part, their padding rows get exactly zero gradient).
    ``batch_invariant=True``: every chunk GEMM runs at one fixed row block (the last chunk
    zero-padded, the block independent of the row count), so a row's loss terms and hidden-state
    gradient are bit-identical whatever the batch, the row's position, packing or chunking (the
    padding is the cost; docs/numerics.md).

    Args:
        teacher_ids, teacher_logprobs, support_mask: the teacher's top-k ids (..., K), their
            log-probs (..., K) and the mask of real entries (None: all real), as in
            :func:`fk.sparse_divergence`.
        kind, tail, beta, alpha, lam: the divergence, the handling of the mass off the support
            ("bucket", "renormalize", "none") and the kind's parameter.
        temperature, teacher_temperature: T of the student's softmax; the temperature the
            teacher's log-probs were produced at (re-tempered when it differs; None: T).
        labels, ignore_index: rows whose label is ``ignore_index`` add nothing.
        reduction, num_items_in_batch: "none", "sum" or "mean" (over kept rows, or / the count).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    """
    hs, ws, bs = E.check_head("student_hidden", student_hidden, "student_weight",
                              student_weight, "student_bias", student_bias)
    E.check_devices(hs, ws, bs)
    vocab_size = V.check_vocab_size(vocab_size, {"student_weight": ws.shape[0]})
    if vocab_size is not None:  # views: the padding rows' gradient is exactly 0
        ws, bs = ws[:vocab_size], (bs[:vocab_size] if bs is not None else None)
    lead, vocab = hs.shape[:-1], ws.shape[0]
    ids, lp, mask, tail_id = check_sparse_teacher(
        lead, vocab, hs.device, teacher_ids, teacher_logprobs, support_mask, tail)
    spec = resolve(kind, beta, alpha, lam)
    inv_t = V.check_temperature(temperature, torch.promote_types(hs.dtype, ws.dtype))
    a = teacher_alpha(float(temperature), teacher_temperature)
    transform = check_logit_transform("student_logit_scale", student_logit_scale,
                                      "student_softcap", student_softcap)
    ce_w = E.check_ce_weight(ce_weight, labels)
    acc = torch.promote_types(hs.dtype, torch.float32)
    probe = torch.empty(0, dtype=torch.float32, device=hs.device)
    ops = select_ops(backend, probe, "sparse_divergence_fwd", spec.base, transform)
    buffers = 1 if in_place_gradient(ops, ce_w) else 2
    plan = E.rows(lead, hs.device, acc, labels=labels, ignore_index=ignore_index,
                  reduction=reduction, num_items_in_batch=num_items_in_batch,
                  chunk_size=chunk_size, vocab=vocab,
                  chunk_of=lambda m: (cpu_chunk_rows(m, vocab, buffers)
                                      if hs.device.type == "cpu"
                                      else E.default_chunk_size(m, vocab, hs.device)),
                  batch_invariant=batch_invariant)
    if ce_w:
        E.check_label_range(plan.labels, vocab, ignore_index)
    if ce_w and not ops.provides("softmax_stats_fwd"):
        raise ValueError(f"ce_weight > 0 needs the softmax statistics op, which the {ops.name} "
                         "backend lacks")
    n = plan.n
    keep = (plan.valid if plan.valid is not None
            else torch.empty(0, dtype=torch.bool, device=hs.device))
    args = {"spec": spec, "inv_t": inv_t, "tail": tail_id, "ids": plan.take(ids),
            "mask": plan.take(mask) if mask.numel() else mask, "valid": keep,
            "labels": plan.labels, "ignore_index": int(ignore_index), "ce_weight": ce_w,
            "chunk": plan.chunk, "fixed": plan.fixed, "ops": ops, "alpha": a,
            "slack": mass_slack(lp.dtype),
            "transform": transform}
    # The teacher log-probs go through the packing gather too, so their gradient (an (N, K)
    # input of the graph) comes back scattered, exactly 0 on dropped rows.
    out = FusedLinearSparseDivergenceFunction.apply(
        plan.take(hs.reshape(n, hs.shape[-1])), ws, bs, plan.take(lp), args, plan.weights,
        plan.reduction,
    )
    return plan.scatter(out) if plan.reduction == "none" else out


__all__ = ["FusedLinearSparseDivergenceFunction", "fused_linear_sparse_divergence"]
