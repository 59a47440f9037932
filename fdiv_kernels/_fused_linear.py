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

from fdiv_kernels import _validation as V
from fdiv_kernels.dispatch import select
from fdiv_kernels._kinds import KernelSpec, resolve
from fdiv_kernels._logit_transform import check_pair_transforms, transform_logits
from fdiv_kernels._stats import DivergenceStats

# Bytes of fp32 (chunk, V) buffers per chunk (about four live at once: two logits, padding or a
# CE gradient, the divergence gradient). GPUs get more so the chunk GEMMs stay efficient.
CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


def default_chunk_size(n: int, vocab: int, device: torch.device) -> int:
    budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    return max(1, min(n, budget // (4 * 4 * vocab)))


def _gemm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (fp64 for fp64) result: rounding logits to bf16 costs gradient accuracy."""
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:  # 16-bit operands, fp32 accumulation and output
        low = b.dtype if b.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU has no fp32-output 16-bit GEMM


def _operand(w: Tensor) -> Tensor:
    """The weight as the GEMMs use it: CPU 16-bit weights are widened once per call, not per chunk."""
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) and not w.is_cuda else w


def _accumulate_grads(gz: Tensor, h: Tensor, w: Tensor, out: dict, rows, prefix: str,
                      keep: Tensor | None) -> None:
    """Add a chunk's d/dh, d/dW, d/db (from fp32 d loss / d z) into the fp32 accumulators."""
    if out[prefix + "h"] is not None:
        out[prefix + "h"][rows] = _gemm_f32(gz, w)
    if out[prefix + "w"] is not None:
        if keep is not None:
            # Ignored rows are inert: their gz is 0, but 0 * a NaN hidden state would be NaN.
            h = torch.where(keep[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        acc = out[prefix + "w"]
        if gz.dtype == h.dtype == acc.dtype:
            acc.addmm_(gz.t(), h)  # accumulated inside the GEMM: no (V, H) temporary per chunk
        else:
            acc += _gemm_f32(gz.t(), h)
    if out[prefix + "b"] is not None:
        out[prefix + "b"] += gz.sum(0)


def _run(ctx_args: dict, row_weights: Tensor, needs: dict) -> tuple[Tensor, dict]:
    """Loss per row and the row-weighted gradients, chunk by chunk."""
    a = ctx_args
    hs, ws, bs, ht, wt, bt = a["hs"], a["ws"], a["bs"], a["ht"], a["wt"], a["bt"]
    spec: KernelSpec = a["spec"]
    n, vs, vt = hs.shape[0], ws.shape[0], wt.shape[0]
    acc = torch.promote_types(hs.dtype, torch.float32)
    grads = {
        "sh": hs.new_empty(hs.shape, dtype=acc) if needs["sh"] else None,
        "sw": ws.new_zeros(ws.shape, dtype=acc) if needs["sw"] else None,
        "sb": hs.new_zeros(ws.shape[0], dtype=acc) if needs["sb"] else None,
        "th": ht.new_empty(ht.shape, dtype=acc) if needs["th"] else None,
        "tw": wt.new_zeros(wt.shape, dtype=acc) if needs["tw"] else None,
        "tb": ht.new_zeros(wt.shape[0], dtype=acc) if needs["tb"] else None,
    }
    grad_s = any(needs[k] for k in ("sh", "sw", "sb"))
    grad_t = any(needs[k] for k in ("th", "tw", "tb"))
    fwd = getattr(torch.ops.fdiv, f"divergence_fwd_{a['backend']}")
    loss = hs.new_empty(n, dtype=acc)
    ws_op, wt_op = _operand(ws), _operand(wt)
    ce_w = a["ce_weight"]
    for lo in range(0, n, a["chunk"]):
        rows = slice(lo, min(n, lo + a["chunk"]))
        # Autocast off: it would run these GEMMs in bf16/fp16 and round the logits, breaking the
        # fp32-logits contract (the gradients' accuracy); _gemm_f32 picks the precision itself.
        with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
            zs = _gemm_f32(hs[rows], ws_op.t())
            zt = _gemm_f32(ht[rows], wt_op.t())
            if bs is not None:
                zs = zs + bs.to(zs.dtype)
            if bt is not None:
                zt = zt + bt.to(zt.dtype)
            if vt > vs:  # entries the student head lacks have probability 0, not logit 0
                zs_full = torch.nn.functional.pad(zs, (0, vt - vs), value=float("-inf"))
            else:
                zs_full = zs
            valid = a["valid"][rows]
            xs, dzs = a["xform"][:2], None
            if vt > vs and xs != (1.0, 0.0):
                # A transform would turn the -inf padding finite (-c under a cap): transform the
                # chunk's logits here, in place, and chain the gradient below.
                zs_t, dzs = transform_logits(zs, *xs)
                zs = zs.copy_(zs_t)
                del zs_t
                zs_full = torch.nn.functional.pad(zs, (0, vt - vs), value=float("-inf"))
                xs = (1.0, 0.0)
            div, gzs, gzt, ent = fwd(zs_full, zt, valid, spec.base, spec.swap, spec.param,
                                     a["inv_t"], *xs, *a["xform"][2:], grad_s, grad_t)
            del zt, zs_full
            w_rows = row_weights[rows, None]
            loss[rows] = div
            side = a.get("side")
            if side is not None:  # return_stats: the per-row parts, from the same kernel calls
                side["ent"][rows] = ent
                side["div"][rows] = div
            if ce_w:
                # The cross-entropy of the model's logits: the student's transforms, T = 1.
                ce, gce = _cross_entropy(zs, a["labels"][rows], a["ignore_index"], a["backend"],
                                         grad_s, xs)
                loss[rows] = (1.0 - ce_w) * div + ce_w * ce
                if side is not None:
                    side["ce"][rows] = ce
            del zs
            # The chunk's buffers are scaled in place: no extra (chunk, V) temporaries.
            if grad_s:
                gz = gzs[:, :vs].mul_(w_rows * (1.0 - ce_w))
                if ce_w:
                    gz.add_(gce.mul_(w_rows * ce_w))
                    del gce
                if dzs is not None:
                    gz.mul_(dzs)
                    del dzs
                _accumulate_grads(gz, hs[rows], ws_op, grads, rows, "s",
                                  valid if a["mask"] else None)
                del gz, gzs
            if grad_t:
                gz = gzt.mul_(w_rows * (1.0 - ce_w))
                _accumulate_grads(gz, ht[rows], wt_op, grads, rows, "t",
                                  valid if a["mask"] else None)
                del gz, gzt
    return loss, grads


def _kept_rows(valid: Tensor | None) -> Tensor | None:
    """Indices of the kept rows in order, or None when packing would gain nothing.

    The one host sync of the op: the count of kept rows sets how many chunks run (TRL's trainer
    syncs the same way, through a boolean index). Under ``torch.compile`` rows are not packed
    (a data-dependent shape would break the graph): ignored rows then cost their GEMMs.
    """
    if valid is None or torch.compiler.is_compiling():
        return None
    kept = valid.nonzero().squeeze(1)
    return None if kept.numel() == valid.numel() else kept


def _cross_entropy(z: Tensor, labels: Tensor, ignore_index: int, backend: str, grad: bool,
                   xform: tuple[float, float] = (1.0, 0.0)):
    """-log softmax(z')[label] per row, z' = z under the (scale, softcap) ``xform``, and its
    gradient w.r.t. z, fp32."""
    fwd = getattr(torch.ops.fdiv, f"softmax_stats_fwd_{backend}")
    lse, ent, lp = fwd(z, labels, ignore_index, 1.0, *xform, False)
    if not grad:
        return -lp, None
    bwd = getattr(torch.ops.fdiv, f"softmax_stats_bwd_{backend}")
    g = torch.full_like(lp, -1.0)
    return -lp, bwd(z, labels, lse, ent, None, None, g, ignore_index, 1.0, *xform)


class FusedLinearDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, args, row_weights, reduction, grad_enabled=True):
        # grad_enabled: grad mode at the call (always off inside forward); under no_grad nothing
        # is computed for a backward, whatever requires_grad the parameters carry.
        needs = dict(zip(("sh", "sw", "sb", "th", "tw", "tb"),
                         (grad_enabled and g for g in ctx.needs_input_grad[:6])))
        needs["sb"] = needs["sb"] and bs is not None
        needs["tb"] = needs["tb"] and bt is not None
        args = {**args, "hs": hs, "ws": ws, "bs": bs, "ht": ht, "wt": wt, "bt": bt}
        ctx.reduction, ctx.needs, ctx.args = reduction, needs, args
        if reduction == "none":
            # Gradients need the per-row upstream gradient: recompute in the backward.
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
            loss, _ = _run(args, row_weights, dict.fromkeys(needs, False))
            return loss
        loss, grads = _run(args, row_weights, needs)
        ctx.grads = grads
        return (loss * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_divergence does not support higher-order gradients")
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt = ctx.saved_tensors
            args = {**ctx.args, "hs": hs, "ws": ws, "bs": bs, "ht": ht, "wt": wt, "bt": bt}
            _, grads = _run(args, grad_out.contiguous().to(torch.float32), ctx.needs)
            scale = None
        else:
            grads, scale = ctx.grads, grad_out
        inputs = {"sh": "hs", "sw": "ws", "sb": "bs", "th": "ht", "tw": "wt", "tb": "bt"}
        out = []
        for key, name in inputs.items():
            g = grads[key]
            if g is None:
                out.append(None)
                continue
            if scale is not None:
                g = g * scale
            out.append(g.to(ctx.args[name].dtype))
        return (*out, None, None, None, None)


def _check_2d(name: str, x: object, cols: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (V, H), got shape {tuple(x.shape)}")
    return x


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    kind: str = "kl",
    *,
    beta: float | None = None,
    alpha: float | None = None,
    lam: float | None = None,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    backend: str = "auto",
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, DivergenceStats]:
    r"""D(softmax(teacher_hidden W_t^T + b_t) || softmax(student_hidden W_s^T + b_s)) per row,
    without the (N, V) logits.

    ``kind`` and its parameters, ``temperature``, ``labels`` / ``ignore_index``, ``reduction`` and
    ``num_items_in_batch`` mean what they mean in :func:`fk.divergence`. Hidden states are
    (..., H) with one leading shape for both; weights are (V, H) with ``Vt >= Vs`` (the student's
    missing vocabulary entries have probability 0, i.e. logit -inf). With ``ce_weight = w`` the
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
    """
    hs = V.check_logits("student_hidden", student_hidden)
    ht = V.check_logits("teacher_hidden", teacher_hidden)
    ws = _check_2d("student_weight", student_weight)
    wt = _check_2d("teacher_weight", teacher_weight)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must share the leading shape (N), got "
            f"{tuple(hs.shape[:-1])} and {tuple(ht.shape[:-1])}"
        )
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be (Vs, {hs.shape[-1]}) to match student_hidden, "
                         f"got {tuple(ws.shape)}")
    if wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"teacher_weight must be (Vt, {ht.shape[-1]}) to match teacher_hidden, "
                         f"got {tuple(wt.shape)}")
    if wt.shape[0] < ws.shape[0]:
        raise ValueError(f"teacher vocabulary must be at least the student's: Vt={wt.shape[0]} "
                         f"< Vs={ws.shape[0]}")
    for name, b, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if b is not None and (not isinstance(b, Tensor) or b.shape != (w.shape[0],)):
            raise ValueError(f"{name} must be a tensor of shape ({w.shape[0]},), got "
                             f"{getattr(b, 'shape', type(b).__name__)}")
    devices = {t.device for t in (hs, ht, ws, wt, student_bias, teacher_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    spec = resolve(kind, beta, alpha, lam)
    inv_t = V.check_temperature(temperature, torch.promote_types(hs.dtype, ws.dtype))
    reduction = V.check_reduction(reduction)
    V.check_num_items(num_items_in_batch)
    xform = check_pair_transforms(student_logit_scale, student_softcap, teacher_logit_scale,
                                  teacher_softcap)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    ce_w = V.check_real("ce_weight", ce_weight)
    if not 0.0 <= ce_w <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_w}")
    lead = hs.shape[:-1]
    n = hs[..., 0].numel()
    valid = V.row_mask(labels, ignore_index, lead, hs.device)
    if ce_w and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if chunk_size is None:
        chunk = default_chunk_size(n, wt.shape[0], hs.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    else:
        chunk = chunk_size
    keep = valid if valid is not None else torch.ones(n, dtype=torch.bool, device=hs.device)
    flat_labels = (V.check_labels(labels, ignore_index, lead, hs.device).reshape(-1).contiguous()
                   if labels is not None else None)
    if ce_w:
        bad = ((flat_labels < 0) | (flat_labels >= ws.shape[0])) & (flat_labels != ignore_index)
        if not torch.compiler.is_compiling() and bool(bad.any()):
            raise ValueError(f"labels must be in [0, {ws.shape[0]}) or equal ignore_index")
    probe = torch.empty(0, dtype=torch.float32, device=hs.device)
    name = select(backend, probe, "divergence_fwd", spec.base)
    if ce_w:
        select(name, probe, "softmax_stats_fwd")
    # Row weights fold the reduction into the gradients: kept rows / denominator.
    acc = torch.promote_types(hs.dtype, torch.float32)
    weights = keep.to(acc)
    if reduction == "mean":
        if num_items_in_batch is not None:
            denom = V.check_num_items(num_items_in_batch)
            if isinstance(denom, Tensor):
                denom = denom.to(device=weights.device, dtype=weights.dtype)
        else:
            denom = weights.sum().clamp(min=1)
        weights = weights / denom
    hs2, ht2 = hs.reshape(n, hs.shape[-1]), ht.reshape(n, ht.shape[-1])
    kept = _kept_rows(valid)
    if kept is not None:
        # Ignored rows never reach the GEMMs: the kept rows are gathered (in order) and the
        # gathers' backward scatters the hidden gradients back, exactly 0 on ignored rows.
        hs2, ht2 = hs2.index_select(0, kept), ht2.index_select(0, kept)
        weights = weights.index_select(0, kept)
        keep = torch.ones(kept.numel(), dtype=torch.bool, device=hs.device)
        if flat_labels is not None:
            flat_labels = flat_labels.index_select(0, kept)
        if chunk_size is None:
            chunk = default_chunk_size(kept.numel(), wt.shape[0], hs.device)
    args = {"spec": spec, "inv_t": inv_t, "valid": keep,
            "mask": valid is not None and kept is None, "labels": flat_labels,
            "ignore_index": int(ignore_index), "ce_weight": ce_w, "chunk": chunk,
            "backend": name, "xform": xform}
    if return_stats:
        side = {k: hs.new_zeros(hs2.shape[0], dtype=acc) for k in ("ent", "div", "ce")}
        args["side"] = side
    out = FusedLinearDivergenceFunction.apply(
        hs2, ws, student_bias, ht2, wt, teacher_bias, args, weights, reduction,
        torch.is_grad_enabled(),
    )
    if return_stats:
        stats = _stats(side, weights, keep, kept, n, lead, reduction, ce_w)
    if reduction == "none":
        if kept is not None:
            out = out.new_zeros(n).index_copy(0, kept, out)
        out = out.reshape(lead)
    return (out, stats) if return_stats else out


def _stats(side: dict, weights: Tensor, keep: Tensor, kept: Tensor | None, n: int,
           lead: torch.Size, reduction: str, ce_w: float) -> DivergenceStats:
    """The detached side outputs, reduced like the loss (the row weights are the kept rows over
    the mean's denominator); per row under ``reduction="none"``, 0 on ignored rows."""
    if reduction == "none":
        soft, hard = side["div"], side["ce"]
        if kept is not None:
            soft, hard = (soft.new_zeros(n).index_copy(0, kept, soft),
                          hard.new_zeros(n).index_copy(0, kept, hard))
        soft, hard = soft.reshape(lead), hard.reshape(lead)
    else:
        soft, hard = (side["div"] * weights).sum(), (side["ce"] * weights).sum()
    return DivergenceStats(side["ent"].sum(), keep.sum().to(torch.int64), soft.detach(),
                           hard.detach() if ce_w else None)
