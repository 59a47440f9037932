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

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import SoftmaxOps, select_ops
from fdiv_kernels.core._transforms import check_logit_transform
from fdiv_kernels.fused_linear import _engine as E

# CPU rows per chunk come from a budget for the op's two fp32 (chunk, V) buffers (the logits and
# their gradient): 128 MiB, ~512 rows at V = 32000. Smaller chunks starve the CPU GEMMs: at
# N=1024, H=256, V=32000, fp32, forward + backward with entropy (interleaved, 2 shared threads)
# 131-row chunks ran 0.75x eager, 262 rows 1.0x, 512 rows 1.24x. Other devices: the shared budget.
CPU_CHUNK_BYTES = 128 << 20


def _default_chunk(n: int, vocab: int, device: torch.device) -> int:
    if device.type == "cpu":
        return E.default_chunk_size(n, vocab, device, CPU_CHUNK_BYTES, buffers=2)
    return E.default_chunk_size(n, vocab, device)


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, labels, args):
        ops: SoftmaxOps = args["ops"]
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)
        lse, lp = h.new_empty(n, dtype=acc), h.new_empty(n, dtype=acc)
        # Without return_entropy the op skips the entropy; a zero placeholder keeps one signature.
        ent = h.new_empty(n, dtype=acc) if args["entropy"] else h.new_zeros(n, dtype=acc)

        def step(rows: slice, z: dict) -> None:
            c_lse, c_ent, lp[rows] = ops.softmax_stats_fwd(
                z["s"], labels[rows], args["ignore_index"], args["inv_t"], args["scale"],
                args["cap"], args["entropy"])
            lse[rows] = c_lse
            if args["entropy"]:
                ent[rows] = c_ent

        E.run({"s": E.Head(h, w, b)}, n, args["chunk"], step, acc=acc, fixed=args["fixed"])
        ctx.save_for_backward(h, w, b, labels, lse, ent)
        ctx.args = args
        if not args["entropy"]:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_token_logprobs does not support higher-order gradients"
            )
        h, w, b, labels, lse, ent = ctx.saved_tensors
        a = ctx.args
        ops: SoftmaxOps = a["ops"]
        acc = lse.dtype
        g_lp = g_lp.contiguous().to(acc) if g_lp is not None else None
        g_ent = g_ent.contiguous().to(acc) if (g_ent is not None and a["entropy"]) else None

        def step(rows: slice, z: dict) -> dict:
            gz = ops.softmax_stats_bwd(
                z["s"], labels[rows], lse[rows], ent[rows], None,
                g_ent[rows] if g_ent is not None else None,
                g_lp[rows] if g_lp is not None else None, a["ignore_index"], a["inv_t"],
                a["scale"], a["cap"])
            return {"s": gz}

        # Without an entropy gradient an ignored row gets none: keep it inert (0 * a NaN hidden
        # state would be NaN in dW).
        keep = (labels != a["ignore_index"]) if g_ent is None else None
        head = E.Head(h, w, b, *ctx.needs_input_grad[:3])
        grads = E.run({"s": head}, h.shape[0], a["chunk"], step, keep=keep, acc=acc,
                       fixed=a["fixed"])
        return (*grads["s"].out(head), None, None)


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
    vocab_size: int | None = None,
    batch_invariant: bool = False,
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
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        vocab_size: the tokenizer's size when ``weight`` is padded to more rows: only the first
            ``vocab_size`` rows take part (labels must be below it); the padding rows get
            exactly zero gradient. None: every row takes part.
        batch_invariant: every chunk GEMM runs at one fixed row block (the last chunk
            zero-padded, the block independent of the row count), so a row's results are
            bit-identical whatever the batch it comes in, its position, packing or chunking
            (for RL log-probs that must match the rollout's). Costs the padding; see
            docs/numerics.md.

    Returns:
        logprob (float32, float64 for float64 inputs) of the leading shape, or
        ``(logprob, entropy)`` with ``return_entropy=True``. Gradients reach hidden, weight and
        bias; an ignored row contributes no gradient through its log-prob.
    """
    h, weight, bias = E.check_head("hidden", hidden, "weight", weight, "bias", bias)
    vocab_size = V.check_vocab_size(vocab_size, {"weight": weight.shape[0]})
    if vocab_size is not None:  # views: the padding rows' gradient is exactly 0
        weight, bias = weight[:vocab_size], (bias[:vocab_size] if bias is not None else None)
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    E.check_devices(h, weight, bias)
    inv_t = V.check_temperature(temperature, torch.promote_types(h.dtype, weight.dtype))
    scale, cap = check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if labels is None:
        raise TypeError("labels must be an integer tensor, got None")
    acc = torch.promote_types(h.dtype, torch.float32)
    # Every row's entropy is an output: rows are packed only when no entropy is asked for.
    plan = E.rows(h.shape[:-1], h.device, acc, labels=labels, ignore_index=ignore_index,
                  reduction="none", num_items_in_batch=None, chunk_size=chunk_size, vocab=vocab,
                  pack=not return_entropy, chunk_of=lambda m: _default_chunk(m, vocab, h.device),
                  batch_invariant=batch_invariant)
    E.check_label_range(plan.labels, vocab, ignore_index)
    probe = torch.empty(0, dtype=acc, device=h.device)
    ops = select_ops(backend, probe, "softmax_stats_fwd", transforms=(scale, cap))
    args = {"inv_t": inv_t, "scale": scale, "cap": cap, "ignore_index": int(ignore_index),
            "entropy": return_entropy, "chunk": plan.chunk, "ops": ops, "fixed": plan.fixed}
    lp, ent = FusedLinearTokenLogprobsFunction.apply(
        plan.take(h.reshape(plan.n, h.shape[-1])), weight, bias, plan.labels, args
    )
    if return_entropy:
        return plan.scatter(lp), plan.scatter(ent)
    return plan.scatter(lp)


__all__ = ["FusedLinearTokenLogprobsFunction", "fused_linear_token_logprobs"]
