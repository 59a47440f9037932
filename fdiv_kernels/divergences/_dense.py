"""``fk.divergence``: fused softmax-then-divergence from raw logits, with autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._grads import keep_grads, scaled_grads
from fdiv_kernels.core._ops import select_ops
from fdiv_kernels.core._transforms import check_pair_transforms
from fdiv_kernels.divergences import _row_kinds
from fdiv_kernels.divergences._results import DivergenceStats
from fdiv_kernels.kinds._registry import KernelSpec, resolve
from fdiv_kernels.stats._softmax import entropy


def _is_dtensor(x: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


class DivergenceFunction(torch.autograd.Function):
    """Per-row divergence of (N, V) logits and the student's per-row entropy (not
    differentiable); the gradient is computed in the forward.

    ``transforms`` is (student_scale, student_softcap, teacher_scale, teacher_softcap).

    The backward scales the stored per-row gradients (fdiv_kernels.core._grads).
    """

    @staticmethod
    def forward(ctx, student, teacher, valid, base, swap, param, inv_t, transforms, ops,
                inplace, grad_enabled=True):
        grad_s = grad_enabled and ctx.needs_input_grad[0]
        grad_t = grad_enabled and ctx.needs_input_grad[1]
        loss, gs, gt, ent = ops.divergence_fwd(
            student, teacher, valid, base, swap, param, inv_t, *transforms, grad_s, grad_t
        )
        keep_grads(ctx, gs, gt, grad_s, grad_t, inplace)
        ctx.mark_non_differentiable(ent)
        return loss, ent

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        return *scaled_grads(ctx, grad_loss, "fdiv_kernels.divergence"), *([None] * 9)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "kl",
    *,
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean", num_items_in_batch: int | float | Tensor | None = None,
    backend: str = "auto", inplace_backward: bool = True,
    student_logit_scale: float = 1.0, student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None,
    return_stats: bool = False,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, DivergenceStats]:
    r"""Divergence between p = softmax(teacher_logits / T) and q = softmax(student_logits / T).

    Both inputs are raw logits of shape (..., V); the softmax is fused into the kernel. Per row:

    ====================  =================================================================
    ``kl``                KL(p||q) = sum p (log p - log q)
    ``reverse_kl``        KL(q||p)
    ``js``                beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
                          (beta=0 is KL(p||q), beta=1 is KL(q||p); default 0.5)
    ``tv``                0.5 sum |p - q|
    ``hellinger``         0.5 sum (sqrt p - sqrt q)^2
    ``chi2``              sum (p - q)^2 / q
    ``alpha``             (1 - sum p^alpha q^(1-alpha)) / (alpha (1-alpha)); alpha=1 is KL(p||q),
                          alpha=0 is KL(q||p) (default 0.5)
    ``skew_kl``           KL(p || lam p + (1-lam) q), lam in [0, 1) (default 0.1)
    ``skew_reverse_kl``   KL(q || lam q + (1-lam) p)
    ``jeffreys``          KL(p||q) + KL(q||p)
    ``soft_ce``           -sum p log q = KL(p||q) + H(p) (cross-entropy: H(p), not 0, at p = q)
    ``renyi``             log(sum p^alpha q^(1-alpha)) / (alpha - 1), alpha > 0 (default 0.5;
                          alpha=1 is KL(p||q))
    ``cauchy_schwarz``    -log sum p q + 1/2 log sum p^2 + 1/2 log sum q^2
    ====================  =================================================================

    Kinds added with ``fk.register_divergence`` are accepted too (torch backend).

    Zero-probability terms follow their limits (0 log 0 = 0); a -inf logit in both inputs adds
    nothing; an infinite divergence is +inf; NaN in the input gives NaN.

    Per-model logit transforms are applied inside the kernels before the temperature, as the
    model's head does (Gemma-2/3 final-logit softcapping, Cohere's logit scale):
    z <- z * scale, then with a softcap c: z <- c tanh(z / c), then z / T; the gradient is
    chained through them (dz/dx = scale (1 - (z/c)^2)). Under a softcap every logit is finite:
    a -inf logit becomes -c (so it gets probability ~e^(-2c/T) relative to a logit at +c, not 0).

    Args:
        kind: one of the names in the table (or a registered kind); ``beta`` / ``alpha`` /
            ``lam`` are its parameter, and a parameter the kind does not take raises ValueError.
        temperature: T > 0 with 1/T finite in the compute dtype: T >= 2.94e-39 (float32, also
            for 16-bit inputs) or 5.6e-309 (float64); smaller raises ValueError. Logits / T must
            also be finite (else NaN, never a wrong finite number).
        labels: int64 or int32 tensor of the leading shape (int8/int16/uint8 are widened; a dtype
            that cannot hold ``ignore_index``, e.g. uint8 with -100, raises TypeError); rows with
            ``labels == ignore_index`` add nothing and get zero gradient, whatever they hold.
        reduction: "none" (shape = leading dims), "sum", or "mean" (over kept rows, or divided by
            ``num_items_in_batch`` when given; 0 when every row is ignored or there are no rows).
        num_items_in_batch: a positive number or a one-element tensor.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        inplace_backward: the gradient is computed in the forward and the backward scales it in
            place, so the graph holds one (N, V) buffer per input and can be backpropagated once
            (a second backward raises). Pass False to backpropagate repeatedly (retain_graph,
            gradcheck, jacobians) at the cost of a second buffer during the backward.
        student_logit_scale, teacher_logit_scale: finite positive factors (default 1).
        student_softcap, teacher_softcap: None (no cap) or a finite positive c.
        vocab_size: the tokenizer's size when the two models' logits are padded to different
            widths (e.g. 151936 and 152064): only the first ``vocab_size`` columns take part,
            the padding columns of either input get exactly zero gradient. None: the widths
            must be equal (else a ValueError naming both).
        return_stats: also return a :class:`DivergenceStats` (detached): the summed student
            entropy at temperature T over kept rows and their count, from the same kernel pass;
            ``soft_loss`` is the loss detached, ``hard_loss`` None.

    Returns:
        The loss in float32 (float64 for float64 inputs). Gradients flow to the student logits,
        and to the teacher logits when they require grad; higher-order gradients raise. Under
        ``torch.no_grad()`` / ``inference_mode()`` no gradient is computed. Zero rows give an
        empty result (0 for "sum"/"mean"); V = 0 raises. With ``return_stats``, (loss, stats).
    """
    V.check_logits("student_logits", student_logits)
    V.check_logits("teacher_logits", teacher_logits)
    vocab_size = V.check_vocab_size(vocab_size, {"student_logits": student_logits.shape[-1],
                                                 "teacher_logits": teacher_logits.shape[-1]})
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    V.check_pair(student_logits, teacher_logits)
    spec: KernelSpec = resolve(kind, beta, alpha, lam, row_kinds=True)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    inv_t = V.check_temperature(temperature, dtype)
    reduction = V.check_reduction(reduction)
    V.check_num_items(num_items_in_batch)
    transforms = check_pair_transforms(student_logit_scale, student_softcap, teacher_logit_scale,
                                       teacher_softcap)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if return_stats and _is_dtensor(student_logits):
        # The entropy of vocabulary-sharded rows needs one more all-reduce per call, which
        # loss_parallel() does not make: refuse rather than return a per-shard number.
        raise NotImplementedError(
            "return_stats=True on DTensor (loss_parallel) logits is not supported; use "
            "fdiv_kernels.distributed.vocab_parallel_entropy for the student entropy"
        )
    lead = student_logits.shape[:-1]
    valid = V.row_mask(labels, ignore_index, lead, student_logits.device)

    vocab = student_logits.shape[-1]
    s = student_logits.to(dtype).reshape(-1, vocab).contiguous()
    t = teacher_logits.to(dtype).reshape(-1, vocab).contiguous()
    row_kind = spec.kind in (_row_kinds.RENYI, _row_kinds.CAUCHY_SCHWARZ)
    # The row kinds run their row op: fdiv_kernels.divergences._row_kinds.
    ops = select_ops(backend, s, "lse_combination_fwd" if row_kind else "divergence_fwd",
                     spec.base, transforms)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if s.shape[0] == 0:
        # An empty micro-batch: no rows, no loss; zero-size gradients through the graph.
        rows = (s.sum(-1) + t.sum(-1)).to(V.loss_dtype(dtype)) * 0
        ent = rows.detach()
    else:
        keep = valid if valid is not None else torch.ones(s.shape[0], dtype=torch.bool,
                                                          device=s.device)
        # Inside forward() grad mode is always off: ask here whether any gradient can be wanted,
        # so that no_grad / inference_mode calls never compute or allocate the (N, V) gradients.
        rows = ent = None
        if not row_kind:
            rows, ent = DivergenceFunction.apply(
                s, t, keep, spec.base, spec.swap, spec.param, inv_t, transforms, ops,
                inplace_backward, torch.is_grad_enabled(),
            )
        if row_kind:
            rows = _row_kinds.row_kind_rows(spec.kind, spec.param, s, t, keep, inv_t, ops,
                                            inplace_backward, transforms=transforms)
        if ent is None and return_stats:
            # The row op has no entropy output: one more read of the student rows.
            ent = entropy(s.detach(), temperature, logit_scale=transforms[0],
                          softcap=transforms[1] or None, backend=ops.name)
            ent = torch.where(keep, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))
    loss = V.reduce_rows(rows, valid, reduction, lead, num_items_in_batch)
    if not return_stats:
        return loss
    # The op zeroes ignored rows' entropy, so a plain sum is the sum over kept rows.
    n_rows = (torch.tensor(s.shape[0], device=s.device) if valid is None
              else valid.sum()).to(torch.int64)
    return loss, DivergenceStats(ent.sum().detach(), n_rows, loss.detach(), None)


__all__ = ["divergence", "DivergenceFunction", "DivergenceStats"]
