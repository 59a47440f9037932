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

from fdiv_kernels import _validation as V
from fdiv_kernels._fused_linear import (
    _check_2d,
    _cross_entropy,
    _gemm_f32,
    _operand,
    default_chunk_size,
)
from fdiv_kernels._kinds import resolve
from fdiv_kernels._logit_transform import transform_logits
from fdiv_kernels._sparse_divergence import (
    check_sparse_teacher,
    check_transform,
    mass_slack,
    teacher_alpha,
)
from fdiv_kernels.dispatch import select


# CPU rows per chunk: two (chunk, V) fp32 buffers of at most this size (the logits, reused, and
# the kernel's gradient). glibc keeps freed blocks under its mmap threshold resident, so larger
# chunks cost more than their size: at N=1024, H=256, V=32000 the peak was 113-142 MiB with
# 16 MiB buffers (131 rows), 72-80 MiB with 8 MiB (64 rows, 1.2x the time), against 376 MiB for
# eager (fused ``bench/results/2026-12-02-cpu-2t-sparse-divergence-v2.md``).
CPU_CHUNK_BYTES = 8 << 20


def _accumulate(gz: Tensor, h: Tensor, w: Tensor, grads: dict, rows, keep: Tensor | None
                ) -> None:
    """Add a chunk's d/dh, d/dW, d/db into the fp32 accumulators, in place: d/dW by addmm_, so
    no (V, H) temporary per chunk (``_fused_linear._accumulate_grads`` adds a product)."""
    if grads["sh"] is not None:
        grads["sh"][rows] = _gemm_f32(gz, w)
    if grads["sw"] is not None:
        if keep is not None:
            # Ignored rows are inert: their gz is 0, but 0 * a NaN hidden state would be NaN.
            h = torch.where(keep[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        if h.dtype == grads["sw"].dtype:
            grads["sw"].addmm_(gz.t(), h)
        else:
            grads["sw"] += _gemm_f32(gz.t(), h)
    if grads["sb"] is not None:
        grads["sb"] += gz.sum(0)


def _run(a: dict, row_weights: Tensor, needs: dict) -> tuple[Tensor, dict, Tensor | None]:
    """Loss per row, the row-weighted student gradients and the (N, K) teacher gradient."""
    hs, ws, bs, lp = a["hs"], a["ws"], a["bs"], a["lp"]
    n, K = hs.shape[0], a["ids"].shape[1]
    acc = torch.promote_types(hs.dtype, torch.float32)
    grads = {
        "sh": hs.new_empty(hs.shape, dtype=acc) if needs["sh"] else None,
        "sw": ws.new_zeros(ws.shape, dtype=acc) if needs["sw"] else None,
        "sb": hs.new_zeros(ws.shape[0], dtype=acc) if needs["sb"] else None,
    }
    grad_s = any(needs[k] for k in ("sh", "sw", "sb"))
    grad_t = needs["t"]
    gt_all = hs.new_zeros(n, K, dtype=acc) if grad_t else None
    fwd = getattr(torch.ops.fdiv, f"sparse_divergence_fwd_{a['backend']}")
    spec, ce_w = a["spec"], a["ce_weight"]
    scale, cap = a["transform"]
    mask, valid = a["mask"], a["valid"]
    loss = hs.new_empty(n, dtype=acc)
    ws_op = _operand(ws)
    # One logits buffer for every chunk, written by the GEMM in place: a fresh (chunk, V) buffer
    # per chunk is freed into glibc's heap (chunks under its 32 MiB mmap threshold) and the
    # heap's fragments stay resident: 142-174 MiB peak instead of 65 MiB at N=1024, V=32000.
    reuse = hs.dtype == ws_op.dtype and ws_op.dtype in (torch.float32, torch.float64)
    zbuf = (hs.new_empty(min(n, a["chunk"]), ws.shape[0], dtype=acc) if reuse and n else None)
    for lo in range(0, n, a["chunk"]):
        rows = slice(lo, min(n, lo + a["chunk"]))
        with torch.no_grad():
            if zbuf is not None:
                z = torch.mm(hs[rows], ws_op.t(), out=zbuf[: rows.stop - lo])
            else:
                z = _gemm_f32(hs[rows], ws_op.t())
            if bs is not None:
                z = z.add_(bs.to(z.dtype))
            div, gz, gt, _ = fwd(z, a["ids"][rows], lp[rows], mask[rows] if mask.numel() else mask,
                                 valid[rows] if valid.numel() else valid, spec.base, spec.swap,
                                 spec.param, a["inv_t"], a["tail"], a["alpha"], a["slack"], scale,
                                 cap, grad_s, grad_t)
            w_rows = row_weights[rows, None]
            loss[rows] = div
            if ce_w:
                zt, dz = (z, 1.0) if (scale == 1.0 and not cap) else transform_logits(z, scale, cap)
                ce, gce = _cross_entropy(zt, a["labels"][rows], a["ignore_index"], a["backend"],
                                         grad_s)
                del zt
                if grad_s and not (isinstance(dz, float) and dz == 1.0):
                    gce = gce.mul_(dz)  # d CE / d z = d CE / d f(z) f'(z)
                loss[rows] = (1.0 - ce_w) * div + ce_w * ce
            del z
            if grad_t:
                gt_all[rows] = gt * (w_rows * (1.0 - ce_w))
            if grad_s:
                g = gz.mul_(w_rows * (1.0 - ce_w))  # in place: no second (chunk, V) buffer
                if ce_w:
                    g.add_(gce.mul_(w_rows * ce_w))
                    del gce
                _accumulate(g, hs[rows], ws_op, grads, rows,
                            valid[rows] if valid.numel() else None)
                del g, gz
    del zbuf
    return loss, grads, gt_all


class FusedLinearSparseDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, lp, args, row_weights, reduction):
        needs = {"sh": ctx.needs_input_grad[0], "sw": ctx.needs_input_grad[1],
                 "sb": ctx.needs_input_grad[2] and bs is not None,
                 "t": ctx.needs_input_grad[3]}
        args = {**args, "hs": hs, "ws": ws, "bs": bs, "lp": lp}
        ctx.reduction, ctx.needs, ctx.args = reduction, needs, args
        if reduction == "none":
            ctx.save_for_backward(hs, ws, bs, lp)
            loss, _, _ = _run(args, row_weights, dict.fromkeys(needs, False))
            return loss
        loss, grads, gt = _run(args, row_weights, needs)
        ctx.grads, ctx.gt = grads, gt
        return (loss * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_sparse_divergence does not support higher-order "
                               "gradients")
        if ctx.reduction == "none":
            hs, ws, bs, lp = ctx.saved_tensors
            args = {**ctx.args, "hs": hs, "ws": ws, "bs": bs, "lp": lp}
            _, grads, gt = _run(args, grad_out.contiguous().to(torch.float32), ctx.needs)
            scale = None
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_sparse_divergence: the gradients computed in "
                                   "the forward were handed out by an earlier backward (a "
                                   "second backward through the same graph is not supported)")
            grads, gt, scale = ctx.grads, ctx.gt, grad_out
            # Scaled in place and handed out: no second (V, H) buffer for d W.
            ctx.grads = ctx.gt = None
        out = []
        for key, name in (("sh", "hs"), ("sw", "ws"), ("sb", "bs")):
            g = grads[key]
            if g is None:
                out.append(None)
                continue
            out.append((g if scale is None else g.mul_(scale)).to(ctx.args[name].dtype))
        d_lp = None
        if gt is not None:
            d_lp = (gt if scale is None else gt.mul_(scale)).to(ctx.args["lp"].dtype)
        return (*out, d_lp, None, None, None)


def fused_linear_sparse_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    kind: str = "kl",
    *,
    tail: str = "bucket",
    beta: float | None = None,
    alpha: float | None = None,
    lam: float | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    support_mask: Tensor | None = None,
    student_bias: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    backend: str = "auto",
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
    processed at a time (default: from a memory budget, two (chunk, V) fp32 buffers of 8 MiB on
    the CPU). With a scalar reduction the gradients are computed in the forward and handed out
    by the backward, once (a second backward through the same graph raises).
    """
    hs = V.check_logits("student_hidden", student_hidden)
    ws = _check_2d("student_weight", student_weight)
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be (V, {hs.shape[-1]}) to match student_hidden, "
                         f"got {tuple(ws.shape)}")
    vocab = ws.shape[0]
    if student_bias is not None and (not isinstance(student_bias, Tensor)
                                     or student_bias.shape != (vocab,)):
        raise ValueError(f"student_bias must be a tensor of shape ({vocab},), got "
                         f"{getattr(student_bias, 'shape', type(student_bias).__name__)}")
    devices = {t.device for t in (hs, ws, student_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    lead = hs.shape[:-1]
    ids, lp, mask, tail_id = check_sparse_teacher(
        lead, vocab, hs.device, teacher_ids, teacher_logprobs, support_mask, tail)
    spec = resolve(kind, beta, alpha, lam)
    t = V.check_real("temperature", temperature, positive=True)
    a = teacher_alpha(t, teacher_temperature)
    transform = check_transform(student_logit_scale, student_softcap)
    reduction = V.check_reduction(reduction)
    ce_w = V.check_real("ce_weight", ce_weight)
    if not 0.0 <= ce_w <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_w}")
    n = lead.numel()
    valid = V.row_mask(labels, ignore_index, lead, hs.device)
    if ce_w and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if chunk_size is None:
        chunk = (max(1, min(n, CPU_CHUNK_BYTES // (4 * vocab))) if hs.device.type == "cpu"
                 else default_chunk_size(n, vocab, hs.device))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    else:
        chunk = chunk_size
    flat_labels = labels.reshape(-1).contiguous() if labels is not None else None
    if ce_w:
        bad = ((flat_labels < 0) | (flat_labels >= vocab)) & (flat_labels != ignore_index)
        if not torch.compiler.is_compiling() and bool(bad.any()):
            raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index")
    probe = torch.empty(0, dtype=torch.float32, device=hs.device)
    name = select(backend, probe, "sparse_divergence_fwd", spec.base)
    if ce_w:
        select(name, probe, "softmax_stats_fwd")
    acc = torch.promote_types(hs.dtype, torch.float32)
    keep = valid if valid is not None else torch.empty(0, dtype=torch.bool, device=hs.device)
    # Row weights fold the reduction into the gradients: kept rows / denominator.
    weights = (valid.to(acc) if valid is not None
               else torch.ones(n, dtype=acc, device=hs.device))
    if reduction == "mean":
        if num_items_in_batch is not None:
            denom = (num_items_in_batch if isinstance(num_items_in_batch, Tensor) else
                     V.check_real("num_items_in_batch", num_items_in_batch, positive=True))
        else:
            denom = weights.sum().clamp(min=1)
        weights = weights / denom
    args = {"spec": spec, "inv_t": 1.0 / t, "tail": tail_id, "ids": ids, "mask": mask,
            "valid": keep, "labels": flat_labels, "ignore_index": int(ignore_index),
            "ce_weight": ce_w, "chunk": chunk, "backend": name, "alpha": a,
            "slack": mass_slack(lp.dtype), "transform": transform}
    out = FusedLinearSparseDivergenceFunction.apply(
        hs.reshape(n, -1), ws, student_bias, lp, args, weights, reduction,
    )
    return out.reshape(lead) if reduction == "none" else out


__all__ = ["fused_linear_sparse_divergence", "FusedLinearSparseDivergenceFunction"]
