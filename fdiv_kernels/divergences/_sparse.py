r"""``fk.sparse_divergence``: a divergence against a top-k (sparse) teacher, from student logits.

Per row, with a = f(z) / T the student's scaled logits (f the logit transform: z -> s z, then
c tanh(z / c) under a softcap), L = LSE(a) over all V, S the support (the teacher's K ids minus
padding), lq_i = a_i - L and lp_i the teacher's log-probs (after the tail convention and
re-tempering of ``fdiv_kernels.divergences._sparse_tails.prepare_teacher``):

* ``"none"``:        D = sum_{i in S} term(lp_i, lq_i)
* ``"renormalize"``: as "none" with lq'_i = a_i - LSE_S(a) and lp'_i = lp_i - LSE_S(lp)
* ``"bucket"``:      D = sum_{i in S} term(lp_i, lq_i) + term(lp_tail, lq_tail),
                     lq_tail = log(1 - Q_S) = log1mexp(LSE_S(lq)), Q_S = sum_S q, same for p

where term, h = d term / d lq and k = d term / d lp are the element terms of the kind
(``fdiv_kernels.kinds._registry``). The student gradient, with H = sum_S h (d/dz = d/da f'(z) / T):

* none:        dD/da_j = h_j [j in S] - q_j H
* renormalize: dD/da_j = (h_j - q'_j H) [j in S]            (zero off S)
* bucket:      dD/da_j = h_j - q_j (H + h_tail)                        for j in S
               dD/da_j = q_j (-H + h_tail Q_S / q_tail)                for j off S

(d lq_tail / d a_j is -q_j on S and q_j Q_S / q_tail off S, where q_j <= q_tail: off S the
gradient is one coefficient per row times exp(a_j - L_off), L_off = L + lq_tail the off-support
log-sum-exp, as (h_tail Q_S - H q_tail) exp(a_j - L_off): the inner loop of a softmax backward,
with no 1 / q_tail formed, so a tail of e^-110 keeps its gradient). Under "bucket" a teacher
tail is 0 where S covers all V ids (no outcome is left for it; its mass deficit must be within
the slack) and, within the slack, where the student's tail is 0. The teacher gradient is k_i
on the entries and k_tail on the tail, carried back through ``prepare_teacher`` by
``teacher_vjp`` (closed form).

Cost per row, all inside one kernel launch per direction (no torch op on the teacher): the
teacher's checks and preparation (O(K)), one online pass over the student row for L (none of this
for "renormalize"), O(K) work on the gathered support, and in the backward one read of the row
and the dense gradient write (a zero fill plus K stores for "renormalize"). Nothing of size
(N, V) besides the gradient. Value checks (ids in range and distinct, the teacher mass under
"bucket") raise ValueError from the forward: inside the CPU kernel (no sync), from one error
code read back after the Triton launch (one host sync), in torch on the torch backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import select_ops
from fdiv_kernels.core._transforms import check_logit_transform
from fdiv_kernels.divergences._sparse_tails import TAILS
from fdiv_kernels.kinds._registry import KernelSpec, resolve

# Teacher mass on S above 1 that "bucket" accepts as rounding of the stored log-probs, by the
# dtype they are stored in (a 16-bit log-prob near 0 is off by ~2^-9 relative).
MASS_SLACK = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


class SparseDivergenceFunction(torch.autograd.Function):
    """Per-row sparse divergence. The forward is one launch: the teacher's checks and
    preparation (O(K) per row), one read of each student row for its normalizer, and the
    teacher gradient when asked; it saves two floats per row. The backward is one launch too:
    it reads the row once more and writes the gradient, already scaled by the incoming per-row
    gradient (the passes of a softmax backward)."""

    @staticmethod
    def forward(ctx, student, teacher, ids, support, valid, spec, inv_t, tail, alpha, slack,
                transform, ops):
        grad_s = ctx.needs_input_grad[0]
        grad_t = ctx.needs_input_grad[1]
        scale, cap = transform
        loss, _, gt, stats = ops.sparse_divergence_fwd(
            student, ids, teacher, support, valid, spec.base, spec.swap, spec.param, inv_t, tail,
            alpha, slack, scale, cap, False, grad_t,
        )
        if grad_s:
            ctx.save_for_backward(student, ids, teacher, support, valid, stats, gt)
        else:
            ctx.save_for_backward(gt)
        ctx.grad_s, ctx.grad_t, ctx.teacher_dtype = grad_s, grad_t, teacher.dtype
        ctx.args = (spec, inv_t, tail, alpha, scale, cap, ops)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("fdiv_kernels.sparse_divergence does not support higher-order "
                               "gradients (backward with create_graph=True)")
        spec, inv_t, tail, alpha, scale, cap, ops = ctx.args
        d_s = d_t = None
        if ctx.grad_s:
            student, ids, teacher, support, valid, stats, gt = ctx.saved_tensors
            d_s = ops.sparse_divergence_bwd(
                student, ids, teacher, support, valid, stats,
                grad_loss.to(stats.dtype).contiguous(), spec.base, spec.swap, spec.param, inv_t,
                tail, alpha, scale, cap,
            )
        else:
            (gt,) = ctx.saved_tensors
        if ctx.grad_t:
            d_t = (gt * grad_loss.to(gt.dtype).unsqueeze(-1)).to(ctx.teacher_dtype)  # (N, K)
        return d_s, d_t, *([None] * 10)


def _check_ids(name: str, ids: object) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of vocabulary ids, got "
                        f"dtype {ids.dtype}")
    return ids


def check_sparse_teacher(
    lead: torch.Size, vocab: int, device: torch.device, teacher_ids: object,
    teacher_logprobs: object, support_mask: object, tail: object,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Shape/type checks of the teacher triple, no tensor op (the value checks run inside the
    kernels); returns (ids, logprobs, mask) as (N, K), the mask empty when not given, and the
    tail id."""
    ids = _check_ids("teacher_ids", teacher_ids)
    if not isinstance(teacher_logprobs, Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got "
                        f"{type(teacher_logprobs).__name__}")
    if teacher_logprobs.dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                      torch.float16):
        raise TypeError(f"teacher_logprobs must be floating point (float32, float64, bfloat16 "
                        f"or float16), got {teacher_logprobs.dtype}")
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead:
        raise ValueError(f"teacher_ids must have shape {tuple(lead)} + (K,) to match the "
                         f"student's leading shape, got {tuple(ids.shape)}")
    k = ids.shape[-1]
    if k < 1:
        raise ValueError("teacher_ids must hold at least one id per row (K >= 1), got K=0")
    if k > vocab:
        raise ValueError(f"teacher_ids has K={k} ids per row, more than the vocabulary V={vocab}")
    if teacher_logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids "
                         f"{tuple(ids.shape)}, got {tuple(teacher_logprobs.shape)}")
    n = lead.numel()
    if support_mask is None:
        mask = torch.empty(0, dtype=torch.bool, device=ids.device)  # every entry real
    else:
        if not isinstance(support_mask, Tensor) or support_mask.dtype != torch.bool:
            raise TypeError(f"support_mask must be a bool tensor (True = a real entry, False = "
                            f"padding) or None, got "
                            f"{getattr(support_mask, 'dtype', type(support_mask).__name__)}")
        if support_mask.shape != ids.shape:
            raise ValueError(f"support_mask must have the shape of teacher_ids "
                             f"{tuple(ids.shape)}, got {tuple(support_mask.shape)}")
        mask = support_mask.reshape(n, k).contiguous()
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", teacher_logprobs),
                    ("support_mask", mask)):
        if t.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got {t.device}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {sorted(TAILS)}, got {tail!r}")
    # int32 / int64 ids and 16-bit log-probs go to the kernels as they are (no (N, K) copy).
    return (ids.reshape(n, k).contiguous(),
            teacher_logprobs.reshape(n, k).contiguous(), mask, TAILS[tail])


def teacher_alpha(temperature: float, teacher_temperature: object) -> float:
    """The re-tempering power T_teacher / T as the kernels take it (0: not re-tempered)."""
    if teacher_temperature is None:
        return 0.0
    tt = V.check_real("teacher_temperature", teacher_temperature, positive=True)
    return 0.0 if tt == temperature else tt / temperature


def mass_slack(dtype: torch.dtype) -> float:
    return MASS_SLACK.get(dtype, 1e-4)


def sparse_divergence(
    student_logits: Tensor,
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
    backend: str = "auto", inplace_backward: bool = True,
    vocab_size: int | None = None,
) -> Tensor:
    r"""Divergence between a sparse teacher (top-k ids and log-probs) and the full student softmax.

    q = softmax(student_logits / T) over all V; the teacher gives log p on its K ids per row
    (``teacher_ids`` (..., K) int64, no repeats; ``teacher_logprobs`` (..., K)), e.g. the top-k
    an inference server returns, or the student's own top-k (self-distillation): where the
    support comes from does not matter.

    ``support_mask`` (..., K) bool: **True marks a real entry, False a padding entry** (servers
    return fewer than K for some positions; padding ids and log-probs may hold anything). This
    is TRL's ``valid = topk_logprobs > -inf`` and axolotl's ``target_mask``; a mask of padding
    positions must be inverted (``~pad``) first. None: every entry is real.

    ``kind`` and beta / alpha / lam are as in
    :func:`fk.divergence`, with the element terms summed over these outcomes per ``tail``:

    ``"bucket"``       K + 1 outcomes: the support and one tail holding the rest,
                       p_tail = 1 - sum_S p, q_tail = 1 - sum_S q (log1mexp of the support's LSE).
                       A divergence between two distributions; the student gradient is dense.
    ``"renormalize"``  both restricted to S and renormalized: the divergence of two K-point
                       distributions; the student gradient is zero off S.
    ``"none"``         sum_{i in S} term(p_i, q_i), the teacher's log-probs as given (axolotl's
                       top-k forward KL). Not a divergence for every kind (e.g. it can be
                       negative); for ``alpha`` the element term is Amari's form for measures,
                       (a p + (1-a) q - p^a q^(1-a)) / (a (1-a)).

    ``teacher_temperature``: the temperature the log-probs were produced at. When given and not
    ``temperature``, the teacher is re-tempered, log p'_i = (T_teacher / T) log p_i renormalized
    over S (over S and the tail under "bucket"), as DistillKit and axolotl do. No T^2 factor is
    applied (multiply the loss by T^2 for hosts that do).

    Args:
        labels / ignore_index: rows whose label is ``ignore_index`` add nothing (zero gradient).
        reduction: "none", "sum" or "mean" (over kept rows, or / ``num_items_in_batch``). For a
            per-(position, k) normalization (axolotl) pass reduction="mean" with
            ``num_items_in_batch`` = the number of kept support entries.
        student_logit_scale / student_softcap: the student's logits as the model emits them
            (Gemma, Cohere): z <- s z, then z <- c tanh(z / c) when ``student_softcap`` = c is
            given, then z / T; applied and differentiated inside the kernels (no (N, V) pass).
        backend: as in :func:`fk.divergence`.
        inplace_backward: accepted for symmetry with :func:`fk.divergence`; the backward here
            recomputes the gradient from per-row statistics, so it can run repeatedly.
        vocab_size: the tokenizer's size when the student's logits are padded to more columns:
            only the first ``vocab_size`` take part (teacher ids must be below it), the padding
            columns get exactly zero gradient. None: every column takes part.

    Returns:
        The loss in float32 (float64 for float64 logits). Gradients flow to the student logits
        and, when it requires grad, to ``teacher_logprobs``.
    """
    V.check_logits("student_logits", student_logits)
    vocab_size = V.check_vocab_size(vocab_size, {"student_logits": student_logits.shape[-1]})
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    ids, lp, mask, tail_id = check_sparse_teacher(
        lead, vocab, student_logits.device, teacher_ids, teacher_logprobs, support_mask, tail)
    spec: KernelSpec = resolve(kind, beta, alpha, lam)
    inv_t = V.check_temperature(temperature, student_logits.dtype)
    a = teacher_alpha(float(temperature), teacher_temperature)
    transform = check_logit_transform("student_logit_scale", student_logit_scale,
                                      "student_softcap", student_softcap)
    reduction = V.check_reduction(reduction)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    valid = V.row_mask(labels, ignore_index, lead, student_logits.device)
    s = student_logits.reshape(-1, vocab).contiguous()
    ops = select_ops(backend, s, "sparse_divergence_fwd", spec.base, transform)
    # No torch op on the teacher here: the kernels check the ids / mass, prepare the teacher
    # (tail, re-tempering) and return its gradient, per row.
    keep = valid if valid is not None else torch.empty(0, dtype=torch.bool, device=s.device)
    loss = SparseDivergenceFunction.apply(
        s, lp, ids, mask, keep, spec, inv_t, tail_id, a, mass_slack(lp.dtype), transform, ops,
    )
    return V.reduce_rows(loss, valid, reduction, lead, num_items_in_batch)


__all__ = ["sparse_divergence", "SparseDivergenceFunction"]
