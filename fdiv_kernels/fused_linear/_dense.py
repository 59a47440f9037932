"""``fk.fused_linear_divergence``: lm heads + divergence, the (N, V) logits never materialized.

Rows are processed in chunks: a chunk's logits are produced in fp32 (z = h W^T + b), the fused
divergence op returns the chunk's per-row loss and d loss / d z in one launch, and the chunk's
contribution to the hidden and weight gradients is accumulated in fp32 before the next chunk.
Memory beyond the gradients is one chunk of logits, so it is set by ``chunk_size`` (or a budget).
Rows whose label is ``ignore_index`` (prompt tokens) are packed out before the chunks, so they
cost no GEMM: a 70%-masked batch does 30% of the matrix work.

For a scalar reduction the gradients are computed in the forward and the backward scales them
by the incoming scalar; with ``reduction="none"`` the backward recomputes the chunks with the
incoming per-row gradient as row weights (a weight gradient does not factor by row afterwards).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import SoftmaxOps, select_ops
from fdiv_kernels.core._transforms import check_pair_transforms
from fdiv_kernels.divergences._results import DivergenceStats
from fdiv_kernels.fused_linear import _engine as E
from fdiv_kernels.kinds._registry import KernelSpec, resolve

HEADS = ("s", "t")


def _cross_entropy(z: Tensor, labels: Tensor, ignore_index: int, ops: SoftmaxOps, grad: bool,
                   xform: tuple[float, float] = (1.0, 0.0)):
    """-log softmax(z')[label] per row, z' = z under the (scale, softcap) ``xform``, and its
    gradient w.r.t. z, fp32."""
    lse, ent, lp = ops.softmax_stats_fwd(z, labels, ignore_index, 1.0, *xform, False)
    if not grad:
        return -lp, None
    g = torch.full_like(lp, -1.0)
    return -lp, ops.softmax_stats_bwd(z, labels, lse, ent, None, None, g, ignore_index, 1.0,
                                      *xform)


def _run(a: dict, heads: dict[str, E.Head], row_weights: Tensor) -> tuple[Tensor, dict]:
    """Loss per row and the row-weighted gradients, chunk by chunk (the engine's loop)."""
    spec: KernelSpec = a["spec"]
    ops: SoftmaxOps = a["ops"]
    hs = heads["s"].hidden
    n = hs.shape[0]
    acc = torch.promote_types(hs.dtype, torch.float32)
    grad_s, grad_t = heads["s"].needs_grad, heads["t"].needs_grad
    loss = hs.new_empty(n, dtype=acc)
    ce_w, side, valid = a["ce_weight"], a.get("side"), a["valid"]

    def step(rows: slice, z: dict) -> dict:
        zs, zt = z["s"], z["t"]
        xs = a["xform"][:2]
        div, gzs, gzt, ent = ops.divergence_fwd(zs, zt, valid[rows], spec.base, spec.swap,
                                                spec.param, a["inv_t"], *xs, *a["xform"][2:],
                                                grad_s, grad_t)
        del zt
        w_rows = row_weights[rows, None]
        loss[rows] = div
        if side is not None:  # return_stats: the per-row parts, from the same kernel calls
            side["ent"][rows] = ent
            side["div"][rows] = div
        gce = None
        if ce_w:
            # The cross-entropy of the model's logits: the student's transforms, T = 1.
            ce, gce = _cross_entropy(zs, a["labels"][rows], a["ignore_index"], ops, grad_s, xs)
            loss[rows] = (1.0 - ce_w) * div + ce_w * ce
            if side is not None:
                side["ce"][rows] = ce
        del zs
        # The chunk's buffers are scaled in place: no extra (chunk, V) temporaries.
        out = {}
        if grad_s:
            gz = gzs.mul_(w_rows * (1.0 - ce_w))
            if ce_w:
                gz.add_(gce.mul_(w_rows * ce_w))
            out["s"] = gz
        if grad_t:
            out["t"] = gzt.mul_(w_rows * (1.0 - ce_w))
        return out

    grads = E.run(heads, n, a["chunk"], step, keep=valid if a["mask"] else None, acc=acc,
                  fixed=a["fixed"])
    return loss, grads


def _heads(hs, ws, bs, ht, wt, bt, needs) -> dict[str, E.Head]:
    return {"s": E.Head(hs, ws, bs, *needs[:3]), "t": E.Head(ht, wt, bt, *needs[3:])}


class FusedLinearDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, args, row_weights, reduction, grad_enabled=True):
        # grad_enabled: grad mode at the call (always off inside forward); under no_grad nothing
        # is computed for a backward, whatever requires_grad the parameters carry.
        needs = tuple(grad_enabled and g for g in ctx.needs_input_grad[:6])
        ctx.reduction, ctx.needs, ctx.args = reduction, needs, args
        if reduction == "none":
            # Gradients need the per-row upstream gradient: recompute in the backward.
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
            loss, _ = _run(args, _heads(hs, ws, bs, ht, wt, bt, (False,) * 6), row_weights)
            return loss
        heads = _heads(hs, ws, bs, ht, wt, bt, needs)
        loss, grads = _run(args, heads, row_weights)
        ctx.heads, ctx.grads = heads, grads
        return (loss * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_divergence does not support higher-order gradients")
        if ctx.reduction == "none":
            heads = _heads(*ctx.saved_tensors, ctx.needs)
            _, grads = _run(ctx.args, heads, grad_out.contiguous().to(torch.float32))
            scale = None
        else:
            heads, grads, scale = ctx.heads, ctx.grads, grad_out
        return (*grads["s"].out(heads["s"], scale), *grads["t"].out(heads["t"], scale),
                None, None, None, None)


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    kind: str = "kl",
    *,
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    backend: str = "auto",
    student_logit_scale: float = 1.0, student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None,
    return_stats: bool = False,
    vocab_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor | tuple[Tensor, DivergenceStats]:
    r"""D(softmax(teacher_hidden W_t^T + b_t) || softmax(student_hidden W_s^T + b_s)) per row,
    without the (N, V) logits.

    ``kind`` and its parameters, ``temperature``, ``labels`` / ``ignore_index``, ``reduction`` and
    ``num_items_in_batch`` mean what they mean in :func:`fk.divergence`. Hidden states are
    (..., H) with one leading shape for both; weights are (V, H) with one V for both, or heads
    padded to different numbers of rows with ``vocab_size`` (the tokenizer's size: only the
    first ``vocab_size`` rows take part, the padding rows get exactly zero gradient; different
    widths without it raise, naming both). With ``ce_weight = w`` the
    per-row loss is (1 - w) D + w CE(student, labels) (labels required). Logits are formed in fp32
    whatever the operand dtype; gradients (to the student's hidden, weight and bias, and the
    teacher's when they require grad) accumulate in fp32 and return in each parameter's dtype.
    ``chunk_size`` rows are processed at a time (default: from a memory budget). Ignored rows
    are dropped before the GEMMs (one host sync for their count; not under ``torch.compile``)
    and get exactly zero gradient; a fully ignored batch gives a zero loss that is still part
    of the graph (zero, not None, gradients), so data-parallel ranks stay in step.

    The logit transforms (``student_logit_scale``, ``student_softcap``, ``teacher_*``) and
    ``return_stats`` mean what they mean in :func:`fk.divergence` and are fused into the
    per-chunk kernel call (z <- z scale, z <- c tanh(z / c), then z / T); the cross-entropy part
    uses the student's transformed logits at T = 1 (the model's logits). With ``return_stats``
    the result is (loss, :class:`DivergenceStats`), the entropy from the same per-chunk call, and
    loss = (1 - ce_weight) soft_loss + ce_weight hard_loss.
    ``batch_invariant=True``: every chunk GEMM runs at one fixed row block (the last chunk
    zero-padded, the block independent of the row count), so a row's loss terms and hidden-state
    gradient are bit-identical whatever the batch, the row's position, packing or chunking (the
    padding is the cost; docs/numerics.md).

    Args:
        student_hidden, teacher_hidden: (..., H_s) and (..., H_t) hidden states, one leading shape.
        student_weight, teacher_weight: the lm heads, (V, H_s) and (V, H_t).
        student_bias, teacher_bias: (V,) or None.
        kind, beta, alpha, lam: the divergence and its parameter, as in :func:`fk.divergence`.
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: each model's
            logit transform (scale, then softcap c: z <- c tanh(z / c); None: no cap).
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
    """
    hs, ws, _ = E.check_head("student_hidden", student_hidden, "student_weight", student_weight,
                             "student_bias", None)
    ht, wt, _ = E.check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight,
                             "teacher_bias", None)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must share the leading shape (N), got "
            f"{tuple(hs.shape[:-1])} and {tuple(ht.shape[:-1])}"
        )
    bs = E.check_bias("student_bias", student_bias, ws.shape[0])
    bt = E.check_bias("teacher_bias", teacher_bias, wt.shape[0])
    vocab_size = V.check_vocab_size(vocab_size, {"student_weight": ws.shape[0],
                                                 "teacher_weight": wt.shape[0]})
    if vocab_size is not None:  # views: the padding rows' gradient is exactly 0
        ws, wt = ws[:vocab_size], wt[:vocab_size]
        bs = bs[:vocab_size] if bs is not None else None
        bt = bt[:vocab_size] if bt is not None else None
    E.check_devices(hs, ht, ws, wt, bs, bt)
    spec = resolve(kind, beta, alpha, lam)
    inv_t = V.check_temperature(temperature, torch.promote_types(hs.dtype, ws.dtype))
    xform = check_pair_transforms(student_logit_scale, student_softcap, teacher_logit_scale,
                                  teacher_softcap)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    ce_w = E.check_ce_weight(ce_weight, labels)
    acc = torch.promote_types(hs.dtype, torch.float32)
    plan = E.rows(hs.shape[:-1], hs.device, acc, labels=labels, ignore_index=ignore_index,
                  reduction=reduction, num_items_in_batch=num_items_in_batch,
                  chunk_size=chunk_size, vocab=wt.shape[0], batch_invariant=batch_invariant)
    if ce_w:
        E.check_label_range(plan.labels, ws.shape[0], ignore_index)
    probe = torch.empty(0, dtype=torch.float32, device=hs.device)
    ops = select_ops(backend, probe, "divergence_fwd", spec.base, xform)
    if ce_w and not ops.provides("softmax_stats_fwd"):
        raise ValueError(f"ce_weight > 0 needs the softmax statistics op, which the {ops.name} "
                         "backend lacks")
    n = plan.n
    hs2 = plan.take(hs.reshape(n, hs.shape[-1]))
    ht2 = plan.take(ht.reshape(n, ht.shape[-1]))
    keep = plan.keep_mask()
    args = {"spec": spec, "inv_t": inv_t, "valid": keep, "mask": plan.valid is not None,
            "labels": plan.labels, "ignore_index": int(ignore_index), "ce_weight": ce_w,
            "chunk": plan.chunk, "ops": ops, "xform": xform, "fixed": plan.fixed}
    if return_stats:
        side = {k: hs.new_zeros(plan.count, dtype=acc) for k in ("ent", "div", "ce")}
        args["side"] = side
    out = FusedLinearDivergenceFunction.apply(
        hs2, ws, bs, ht2, wt, bt, args, plan.weights, plan.reduction, torch.is_grad_enabled(),
    )
    if plan.reduction == "none":
        out = plan.scatter(out)
    if not return_stats:
        return out
    return out, _stats(side, plan, keep, ce_w)


def _stats(side: dict, plan: E.Rows, keep: Tensor, ce_w: float) -> DivergenceStats:
    """The detached side outputs, reduced like the loss (the row weights are the kept rows over
    the mean's denominator); per row under ``reduction="none"``, 0 on ignored rows."""
    if plan.reduction == "none":
        soft, hard = plan.scatter(side["div"]), plan.scatter(side["ce"])
    else:
        soft, hard = (side["div"] * plan.weights).sum(), (side["ce"] * plan.weights).sum()
    return DivergenceStats(side["ent"].sum(), keep.sum().to(torch.int64), soft.detach(),
                           hard.detach() if ce_w else None)


__all__ = ["FusedLinearDivergenceFunction", "fused_linear_divergence"]
