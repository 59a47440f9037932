"""``vocab_parallel_divergence``: fk.divergence over a vocabulary sharded across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels import phases
from fdiv_kernels.divergences._dense import divergence
from fdiv_kernels.kinds._registry import KernelSpec, lookup, resolve
from fdiv_kernels.core._grads import scale_rows_
from fdiv_kernels.core._validation import loss_dtype
from fdiv_kernels.distributed import _comm, _shards

# Kinds whose per-row (sum h, sum k) follow from the loss D alone (element identities of each
# kind's terms, see _kinds._terms), so their forward all-reduces one float per row, not three.
# kl: h = -p, k = term + p; hellinger: sum h = sum k = 1 - sum sqrt(pq) = D / 2;
# chi2: sum h = 1 - sum p^2/q = -D, sum k = 2 D; alpha: sum h = (1-a) D, sum k = a D.
FROM_LOSS = {
    "kl": lambda d, a: (torch.full_like(d, -1.0), d + 1.0),
    "reverse_kl": lambda d, a: (d + 1.0, torch.full_like(d, -1.0)),
    "hellinger": lambda d, a: (0.5 * d, 0.5 * d),
    "chi2": lambda d, a: (-d, 2.0 * d),
    "alpha": lambda d, a: ((1.0 - a) * d, a * d),
}


def partial_columns(kind: str, grad_student: bool, grad_teacher: bool) -> list[int]:
    """Columns of the (N, 3) partial sums a forward must all-reduce: the loss, plus sum h for
    student gradients and sum k for teacher gradients unless they follow from the loss."""
    derived = kind in FROM_LOSS
    return [0] + [1] * (grad_student and not derived) + [2] * (grad_teacher and not derived)


def shard_lse(x: Tensor, inv_t: float, backend: str) -> Tensor:
    """Row LSE of x / T over this shard's columns (-inf for an empty shard)."""
    if x.shape[-1] == 0:
        return x.new_full((x.shape[0],), float("-inf"), dtype=loss_dtype(x.dtype))
    return phases.row_lse(x, 1.0 / inv_t, backend=backend)


def global_lse(shards: list[Tensor], inv_t: float, backend: str, group, world: int,
               layout: tuple[int, int] | None = None) -> Tensor:
    """Row LSE over the whole vocabulary of each (N, V_local) shard in ``shards``: (len, N).

    One all_gather of the stacked local LSEs, then ``combine_lse``: one round trip for all the
    inputs, exact, and safe for shards whose row is all -inf (an empty shard counts as -inf).
    """
    local = [shard_lse(x, inv_t, backend) for x in shards]
    gathered = _shards.gather_rows(torch.stack(local), group, world, layout)  # (world, len, N)
    return phases.combine_lse(gathered)


def shard_sums(s, t, keep, lse_s, lse_t, spec: KernelSpec, kw: dict, inv_t, backend, group,
               grad_s: bool, grad_t: bool) -> Tensor:
    """The all-reduced (N, 3) partial sums (sum term, sum h, sum k), sending only what is needed."""
    n = s.shape[0]
    if s.shape[-1] == 0:
        part = s.new_zeros((n, 3), dtype=loss_dtype(s.dtype))
    else:
        part = phases.partials(s, t, lse_s, lse_t, spec.kind, temperature=1.0 / inv_t,
                               valid=keep, backend=backend, **kw)
    cols = partial_columns(spec.kind, grad_s, grad_t)
    reduced = _comm.all_reduce_sum(part[:, cols], group)
    sums = part.new_zeros((n, 3))
    sums[:, cols] = reduced
    if spec.kind in FROM_LOSS:
        sums[:, 1], sums[:, 2] = FROM_LOSS[spec.kind](reduced[:, 0], spec.param)
    return sums


def kind_kwargs(spec: KernelSpec) -> dict:
    """The resolved parameter as the phase ops take it (beta=/alpha=/lam=), if the kind has one."""
    name = lookup(spec.kind).param  # custom kinds (fk.register_divergence) have none
    return {name: spec.param} if name else {}


class VocabParallelDivergenceFunction(torch.autograd.Function):
    """Per-row divergence of vocabulary-sharded (N, V_local) logits, replicated on every rank.

    Forward: 2 collectives (the LSEs of both inputs, then the needed partial-sum columns).
    Backward: none; each rank writes the gradient of its own columns from the saved per-row
    statistics (2 LSEs and 3 sums per row), never from saved probabilities.
    """

    @staticmethod
    def forward(ctx, student, teacher, keep, spec, inv_t, backend, group, world, layout=None):
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        lse_s, lse_t = global_lse([student, teacher], inv_t, backend, group, world, layout)
        kw = kind_kwargs(spec)
        sums = shard_sums(student, teacher, keep, lse_s, lse_t, spec, kw, inv_t, backend, group,
                          grad_s, grad_t)
        ctx.save_for_backward(student, teacher, keep, lse_s, lse_t, sums)
        ctx.spec, ctx.kw, ctx.inv_t, ctx.backend = spec, kw, inv_t, backend
        return sums[:, 0].clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_divergence does not support higher-order gradients")
        s, t, keep, lse_s, lse_t, sums = ctx.saved_tensors
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if s.shape[-1] == 0:
            return (torch.zeros_like(s) if want_s else None,
                    torch.zeros_like(t) if want_t else None, *([None] * 7))
        gs, gt = phases.grads(s, t, lse_s, lse_t, sums, ctx.spec.kind,
                              temperature=1.0 / ctx.inv_t, valid=keep, grad_student=want_s,
                              grad_teacher=want_t, backend=ctx.backend, **ctx.kw)
        g = grad_loss.contiguous()
        for x in (gs, gt):
            if x is not None:
                scale_rows_(x, g)
        return gs, gt, *([None] * 7)


def vocab_parallel_divergence(
    student_shard: Tensor,
    teacher_shard: Tensor,
    kind: str = "kl",
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    beta: float | None = None, alpha: float | None = None, lam: float | None = None,
    temperature: float = 1.0,
    labels: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean", num_items_in_batch: int | float | Tensor | None = None,
    backend: str = "auto", inplace_backward: bool = True,
    vocab_size: int | None = None,
) -> Tensor:
    r"""``fk.divergence`` of logits whose vocabulary is split across the ranks of ``group``.

    Each rank passes its columns of both models, (..., V_r), with one partition for both (shards
    may be uneven or empty; vocabulary padding must be -inf in both models). The result is
    ``fk.divergence`` of the concatenated logits, the same on every rank; the gradients are those
    of the local shards. ``labels`` (global ids, the full leading shape on every rank) only mask
    rows, so ``vocab_start`` is not needed here; it is accepted so one shard description fits
    every op (when given, the ranks' layouts ride in the LSE all_gather and must tile [0, V)
    exactly once, else a ValueError on every rank). Other arguments as
    :func:`fdiv_kernels.divergence`; ``inplace_backward`` has no effect with more than one rank
    (the backward always writes a fresh gradient).

    Per row, with q = softmax(a / T) and p = softmax(b / T) over the whole vocabulary:

        L = combine_lse(all_gather(row_lse(shard)))               # both models, 1 collective
        (D, sum h, sum k) = all_reduce_sum(partials(shard, L))    # 1 collective
        dD/da_j = (h_j - q_j sum h) / T,  dD/db_j = (k_j - p_j sum k) / T   # local, no collective

    Collectives per forward, N rows, W ranks: an all_gather of 2N floats per rank (W 2N received),
    then an all_reduce of c N floats: c = 1 for ``kl``, ``reverse_kl``, ``hellinger``, ``chi2``,
    ``alpha`` (sum h and sum k follow from D) and when no input needs a gradient; for ``js``,
    ``tv``, ``skew_kl``, ``skew_reverse_kl``, ``jeffreys`` c = 2 with student gradients only,
    3 with teacher gradients too. The backward sends nothing. With one rank (or ``group=None``
    and torch.distributed not initialized) this is exactly ``fk.divergence``.

    DTensor inputs placed ``Shard(-1)`` are accepted: the group and offset come from the DTensor
    and the result is a replicated DTensor.

    Args:
        student_shard, teacher_shard: this rank's (..., V_r) columns of the student and teacher
            logits (or DTensors placed ``Shard(-1)``).
        kind: the divergence, as :func:`fdiv_kernels.divergence`.
        group: the process group the vocabulary is split over (None: the default group).
        vocab_start: this rank's first vocabulary id (optional, see above).
        beta, alpha, lam: the kind's parameter, as :func:`fdiv_kernels.divergence`.
        temperature: T > 0, applied to both models' logits.
        labels: optional ids of the leading shape; rows equal to ``ignore_index`` add nothing.
        ignore_index: label value of ignored rows.
        reduction: "none", "sum" or "mean", as :func:`fdiv_kernels.divergence`.
        num_items_in_batch: the divisor of ``"mean"`` when given.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
        inplace_backward: as :func:`fdiv_kernels.divergence` (one rank only).
        vocab_size: the tokenizer's size when the vocabulary is padded: only global columns
            below it take part (each rank cuts its shard there; the padding columns, on the
            last ranks, get exactly zero gradient). Needs ``vocab_start`` with several ranks;
            the shards' layouts are then checked to tile [0, vocab_size) exactly.
    """
    student_shard, teacher_shard, info = _shards.unwrap_pair(student_shard, teacher_shard)
    group, vocab_start = _shards.resolve_group(group, info, vocab_start)
    world, _ = _comm.world(group)
    common = dict(beta=beta, alpha=alpha, lam=lam, temperature=temperature, labels=labels,
                  ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, backend=backend,
                  inplace_backward=inplace_backward)
    if world == 1:
        return _shards.rewrap(divergence(student_shard, teacher_shard, kind,
                                         vocab_size=vocab_size, **common), info)
    if vocab_size is not None:
        # Views: the columns at or past vocab_size get exactly zero gradient through the slice.
        vocab_start, width = _shards.resolve_width("student_shard", student_shard.shape[-1],
                                           vocab_start, vocab_size, world)
        student_shard, teacher_shard = student_shard[..., :width], teacher_shard[..., :width]

    _shards.check_shard("student_shard", student_shard)
    _shards.check_shard("teacher_shard", teacher_shard)
    V.check_pair(student_shard, teacher_shard)
    spec = resolve(kind, beta, alpha, lam)
    inv_t = 1.0 / V.check_real("temperature", temperature, positive=True)
    reduction = V.check_reduction(reduction)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    lead = student_shard.shape[:-1]
    valid = V.row_mask(labels, ignore_index, lead, student_shard.device)
    dtype = torch.promote_types(student_shard.dtype, teacher_shard.dtype)
    s, t = (_shards.rows(x.to(dtype)) for x in (student_shard, teacher_shard))
    name = _shards.pick_backend(backend, s, ("divergence_partials", "divergence_grads",
                                             "softmax_stats_fwd"))
    keep = valid if valid is not None else torch.ones(s.shape[0], dtype=torch.bool,
                                                      device=s.device)
    # With a vocab_start the ranks' layouts ride in the LSE all_gather and are checked there.
    layout = None if vocab_start is None or info is not None else (vocab_start, s.shape[-1])
    if vocab_size is not None:  # also the total of the cut shards, checked against vocab_size
        layout = (vocab_start, s.shape[-1], vocab_size)
    loss = VocabParallelDivergenceFunction.apply(s, t, keep, spec, inv_t, name, group, world,
                                                 layout)
    return _shards.rewrap(V.reduce_rows(loss, valid, reduction, lead, num_items_in_batch), info)
