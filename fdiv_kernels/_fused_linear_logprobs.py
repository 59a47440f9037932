"""``fk.fused_linear_token_logprobs``: per-token log-probs (and entropy) from hidden states.

What DPO, KTO and GRPO need from the lm head is one log-probability per token (and, for logging
or an entropy bonus, the entropy): never the (N, V) logits. Rows go through in chunks; a chunk's
logits are formed in fp32 (z = h W^T + b), transformed (scale, softcap), and handed to the
softmax-statistics op, which reads them once and returns per-row lse, entropy and label log-prob.
Only those per-row statistics are saved.

The backward needs the per-row upstream gradients of both outputs, and the weight gradient
sum_r g_r (d out_r / d z_r) h_r^T does not factor by row, so it recomputes each chunk's logits
(one more GEMM than eager autograd, in exchange for O(chunk V) memory instead of several (N, V)
buffers), asks the statistics op for dz, and accumulates dh, dW, db in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels import _validation as V
from fdiv_kernels._fused_linear import _accumulate_grads, _gemm_f32, _operand, default_chunk_size
from fdiv_kernels._logit_transform import check_logit_transform, select_backend


# CPU rows per chunk come from a budget for the op's two fp32 (chunk, V) buffers (the logits and
# their gradient): 128 MiB, ~512 rows at V = 32000. Smaller chunks starve the CPU GEMMs: at
# N=1024, H=256, V=32000, fp32, forward + backward with entropy (interleaved, 2 shared threads)
# 131-row chunks ran 0.75x eager, 262 rows 1.0x, 512 rows 1.24x. Other devices: the shared budget.
CPU_CHUNK_BYTES = 128 << 20


def _default_chunk(n: int, vocab: int, device: torch.device) -> int:
    if device.type == "cpu":
        return max(1, min(n, CPU_CHUNK_BYTES // (2 * 4 * vocab)))
    return default_chunk_size(n, vocab, device)


def _chunk_logits(a: dict, rows: slice) -> Tensor:
    """The chunk's raw fp32 logits; the ops apply the logit transform and its chain rule."""
    z = _gemm_f32(a["h"][rows], a["w_op"].t())
    if a["b"] is not None:
        z += a["b"].to(z.dtype)
    return z


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, labels, args):
        a = {**args, "h": h, "w": w, "b": b, "w_op": _operand(w)}
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)
        fwd = getattr(torch.ops.fdiv, f"softmax_stats_fwd_{a['backend']}")
        lse, lp = h.new_empty(n, dtype=acc), h.new_empty(n, dtype=acc)
        # Without return_entropy the op skips the entropy; a zero placeholder keeps one signature.
        ent = h.new_empty(n, dtype=acc) if a["entropy"] else h.new_zeros(n, dtype=acc)
        for lo in range(0, n, a["chunk"]):
            rows = slice(lo, min(n, lo + a["chunk"]))
            z = _chunk_logits(a, rows)
            c_lse, c_ent, lp[rows] = fwd(z, labels[rows], a["ignore_index"], a["inv_t"],
                                         a["scale"], a["cap"], a["entropy"])
            lse[rows] = c_lse
            if a["entropy"]:
                ent[rows] = c_ent
            del z
        ctx.save_for_backward(h, w, b, labels, lse, ent)
        ctx.args = args
        if not a["entropy"]:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_token_logprobs does not support higher-order gradients"
            )
        h, w, b, labels, lse, ent = ctx.saved_tensors
        a = {**ctx.args, "h": h, "w": w, "b": b, "w_op": _operand(w)}
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grads = {
            "sh": h.new_empty(h.shape, dtype=acc) if need_h else None,
            "sw": w.new_zeros(w.shape, dtype=acc) if need_w else None,
            "sb": w.new_zeros(w.shape[0], dtype=acc) if (need_b and b is not None) else None,
        }
        bwd = getattr(torch.ops.fdiv, f"softmax_stats_bwd_{a['backend']}")
        g_lp = g_lp.contiguous().to(acc) if g_lp is not None else None
        g_ent = g_ent.contiguous().to(acc) if (g_ent is not None and a["entropy"]) else None
        for lo in range(0, h.shape[0], a["chunk"]):
            rows = slice(lo, min(h.shape[0], lo + a["chunk"]))
            z = _chunk_logits(a, rows)
            gz = bwd(z, labels[rows], lse[rows], ent[rows], None,
                     g_ent[rows] if g_ent is not None else None,
                     g_lp[rows] if g_lp is not None else None, a["ignore_index"], a["inv_t"],
                     a["scale"], a["cap"])
            del z
            # Without an entropy gradient an ignored row gets none: keep it inert (0 * a NaN
            # hidden state would be NaN in dW).
            keep = (labels[rows] != a["ignore_index"]) if g_ent is None else None
            _accumulate_grads(gz, h[rows], a["w_op"], grads, rows, "s", keep)
            del gz
        out = [grads["sh"], grads["sw"], grads["sb"]]
        out = [g.to(t.dtype) if g is not None else None for g, t in zip(out, (h, w, b))]
        return (*out, None, None)


def fused_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""log softmax(z / T)[label] per row, z = softcap(logit_scale (hidden W^T + b)), without the
    (N, V) logits.

    The logit transforms apply in the order models use them (Gemma, Cohere):
    z <- z * logit_scale, then z <- c tanh(z / c) with c = ``softcap`` (skipped when None), then the
    temperature. With q = softmax(z / T):

        logprob = z_label / T - log sum_j exp(z_j / T)     (0 where label == ignore_index)
        entropy = -sum_j q_j log q_j                        (every row; it needs no label)

    Args:
        hidden: (..., H) hidden states; weight: (V, H); bias: (V,) or None.
        labels: integer tensor of the leading shape (int32/int64 ids in [0, V) or ignore_index).
        return_entropy: also return the per-row entropy (differentiable as well: its gradient,
            -q (log q + H) / T, flows into hidden, weight and bias).
        chunk_size: rows per chunk (default from a memory budget); memory is O(chunk V).

    Returns:
        logprob (float32, float64 for float64 inputs) of the leading shape, or
        ``(logprob, entropy)`` with ``return_entropy=True``. Gradients reach hidden, weight and
        bias; an ignored row contributes no gradient through its log-prob.
    """
    h = V.check_logits("hidden", hidden)
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be a floating point (V, H) tensor, got "
                        f"{getattr(weight, 'shape', type(weight).__name__)}")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be (V, {h.shape[-1]}) to match hidden, got "
                         f"{tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (vocab,)):
        raise ValueError(f"bias must be a tensor of shape ({vocab},), got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")
    devices = {t.device for t in (h, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight and bias must be on one device, got "
                         f"{sorted(map(str, devices))}")
    inv_t = 1.0 / V.check_real("temperature", temperature, positive=True)
    scale, cap = check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    lead = h.shape[:-1]
    V.row_mask(labels, ignore_index, lead, h.device)  # type, shape and device of labels
    flat = labels.reshape(-1)
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                         f"got {flat[bad][0].item()}")
    n = math.prod(lead)
    if chunk_size is None:
        chunk = _default_chunk(n, vocab, h.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    else:
        chunk = chunk_size
    probe = torch.empty(0, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    name = select_backend(backend, probe, "softmax_stats_fwd", (scale, cap))
    args = {"inv_t": inv_t, "scale": scale, "cap": cap, "ignore_index": int(ignore_index),
            "entropy": return_entropy, "chunk": max(1, chunk), "backend": name}
    lp, ent = FusedLinearTokenLogprobsFunction.apply(
        h.reshape(n, -1), weight, bias, flat.to(torch.int64).contiguous(), args
    )
    if return_entropy:
        return lp.reshape(lead), ent.reshape(lead)
    return lp.reshape(lead)


__all__ = ["fused_linear_token_logprobs", "FusedLinearTokenLogprobsFunction"]
