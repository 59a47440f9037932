"""``loss_parallel()``: fk.divergence / fk.token_logprobs / fk.entropy on Shard(-1) DTensors.

The same hook torch's ``torch.distributed.tensor.parallel.loss_parallel()`` uses for
cross-entropy: inside the context, DTensor's dispatcher hands the library's registered ops
(``fdiv::divergence_fwd_*``, ``fdiv::softmax_stats_{fwd,bwd}_*``, ``fdiv::scale_rows_``) to the
handlers below instead of propagating shardings. Each handler unwraps the local vocabulary
shard and runs the vocabulary-parallel algorithm of :mod:`fdiv_kernels.distributed` (the same
collectives); outputs are per-row statistics replicated over the mesh and gradients sharded like
the logits. The public functions are untouched: their argument checks and reductions run on the
DTensors as they would on tensors. Logit scale / softcap are refused here
(NotImplementedError), and the divergence op's student entropy is NaN (see ``_divergence_fwd``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor

from fdiv_kernels import phases
from fdiv_kernels.kinds._custom import custom_name
from fdiv_kernels.kinds._registry import DIVERGENCES, KernelSpec
from fdiv_kernels.core._dispatch import BackendUnavailableError
from fdiv_kernels.core._grads import scale_rows_
from fdiv_kernels.core._ops import overload, records
from fdiv_kernels.distributed import _comm, _shards
from fdiv_kernels.distributed._vocab_divergence import global_lse, kind_kwargs, shard_sums
from fdiv_kernels.distributed._vocab_stats import gather_stats, local_grad

PHASE_OPS = ("divergence_partials", "divergence_grads", "softmax_stats_fwd", "softmax_stats_bwd")


def _local(x):
    """The local tensor of a (replicated or sharded) DTensor; tensors and None pass through."""
    return x.to_local() if _shards.is_dtensor(x) else x


def _replicated(x: Tensor, like) -> object:
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(x, like.device_mesh, [Replicate()] * like.device_mesh.ndim,
                              run_check=False)


def _sharded_like(local: Tensor, like) -> object:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _phase_backend(chosen: str, x: Tensor) -> str:
    """The backend the public function chose when it has the phase ops, else ``auto``'s pick
    among those that do. The handler sees only the chosen op, not whether the caller asked for it
    or ``auto`` picked it; the C++ CPU backend, auto's pick for CPU tensors, has only the fused
    op, so CPU DTensors run the torch phases."""
    try:
        return _shards.pick_backend(chosen, x, PHASE_OPS)
    except BackendUnavailableError:
        return _shards.pick_backend("auto", x, PHASE_OPS)


def _bind(op, args: tuple, kwargs: dict) -> list:
    """The op's arguments in schema order, whether passed by position or by name."""
    names = [a.name for a in op._schema.arguments]
    return list(args) + [kwargs[n] if n in kwargs else a.default_value
                         for n, a in zip(names[len(args):], op._schema.arguments[len(args):])]


def _kind(base: int, swap: bool) -> str:
    return custom_name(base) or next(
        name for name, d in DIVERGENCES.items() if d.base == base and d.swap == swap)


def _no_transform(scale: float, softcap: float) -> None:
    if (scale, softcap) != (1.0, 0.0):
        raise NotImplementedError(
            "loss_parallel: logit scale / softcap are not supported on vocabulary-sharded logits"
        )


def _divergence_fwd(backend, op, args, kwargs):
    (student, teacher, valid, base, swap, param, inv_t, s_scale, s_cap, t_scale, t_cap, grad_s,
     grad_t) = _bind(op, args, kwargs)
    _no_transform(s_scale, s_cap)
    _no_transform(t_scale, t_cap)
    s, info = _shards.unwrap("student_logits", student)
    t, _ = _shards.unwrap("teacher_logits", teacher)
    keep = _local(valid)
    spec = KernelSpec(_kind(base, swap), base, swap, param)
    name = _phase_backend(backend, s)
    world, _ = _comm.world(info.group)
    lse_s, lse_t = global_lse([s, t], inv_t, name, info.group, world)
    sums = shard_sums(s, t, keep, lse_s, lse_t, spec, kind_kwargs(spec), inv_t, name,
                      info.group, grad_s, grad_t)
    gs, gt = s.new_empty(0), t.new_empty(0)
    if (grad_s or grad_t) and s.shape[-1]:
        a, b = phases.grads(s, t, lse_s, lse_t, sums, spec.kind, temperature=1.0 / inv_t,
                            valid=keep, grad_student=grad_s, grad_teacher=grad_t, backend=name,
                            **kind_kwargs(spec))
        gs, gt = (a if grad_s else gs), (b if grad_t else gt)
    elif s.shape[-1] == 0:
        gs, gt = (torch.zeros_like(s) if grad_s else gs), (torch.zeros_like(t) if grad_t else gt)
    # The fused op's fourth output, the student's entropy, would cost one more all_gather on
    # every call (fk.divergence's return_stats is its only reader): NaN instead, so that stats
    # taken under loss_parallel() cannot pass for real ones; fkd.vocab_parallel_entropy has it.
    ent = torch.full_like(sums[:, 0], float("nan"))
    return (_replicated(sums[:, 0].clone(), student),
            _sharded_like(gs, student) if grad_s else _replicated(gs, student),
            _sharded_like(gt, teacher) if grad_t else _replicated(gt, teacher),
            _replicated(ent, student))


def _local_labels(labels: Tensor, ignore_index: int, start: int, width: int):
    flat = labels.long()
    keep = flat != ignore_index
    owned = keep & (flat >= start) & (flat < start + width)
    return torch.where(owned, flat - start, torch.full_like(flat, -1)), keep


def _softmax_stats_fwd(backend, op, args, kwargs):
    x, labels, ignore_index, inv_t, scale, softcap, want_entropy = _bind(op, args, kwargs)
    _no_transform(scale, softcap)
    xl, info = _shards.unwrap("logits", x)
    name = _phase_backend(backend, xl)
    world, _ = _comm.world(info.group)
    local, keep = (None, None)
    if labels is not None:
        local, keep = _local_labels(_local(labels), ignore_index, info.vocab_start, xl.shape[-1])
    L, H, lp = gather_stats(xl, local, keep, inv_t, name, info.group, world, want_entropy)
    empty = L.new_empty(0)
    return tuple(_replicated(v if v is not None else empty, x) for v in (L, H, lp))


def _softmax_stats_bwd(backend, op, args, kwargs):
    x, labels, lse, ent, g_lse, g_ent, g_lp, ignore_index, inv_t, scale, softcap = _bind(
        op, args, kwargs)
    _no_transform(scale, softcap)
    xl, info = _shards.unwrap("logits", x)
    name = _phase_backend(backend, xl)
    local = keep = None
    if labels is not None:
        local, keep = _local_labels(_local(labels), ignore_index, info.vocab_start, xl.shape[-1])
    H = _local(ent)
    dx = local_grad(xl, local, keep, _local(lse), H if H.numel() else None, _local(g_lse),
                    _local(g_ent), _local(g_lp), inv_t, name)
    return _sharded_like(dx, x)


def _scale_rows(op, args, kwargs):
    grad, row_scale = _bind(op, args, kwargs)
    _local(grad).mul_(_local(row_scale).unsqueeze(-1))
    return None


def _handlers() -> dict:
    ops = {}
    for record in records():  # the backends loaded so far: the ones a call can have selected
        for op, fn in ((record.divergence_fwd, _divergence_fwd),
                       (record.softmax_stats_fwd, _softmax_stats_fwd),
                       (record.softmax_stats_bwd, _softmax_stats_bwd)):
            if op is not None:
                ops[overload(op)] = functools.partial(fn, record.name)
    ops[overload(scale_rows_)] = _scale_rows
    return ops


@contextlib.contextmanager
def loss_parallel() -> Iterator[None]:
    """Run fk.divergence, fk.token_logprobs, fk.entropy, fk.softmax_stats on logits that are
    DTensors placed ``Shard(-1)`` (a torchtitan-style ``ColwiseParallel`` lm head with
    ``use_local_output=False``), without gathering the vocabulary.

    Like torch's ``loss_parallel()`` for cross-entropy, run the backward inside the context too.
    Labels are plain tensors (or replicated DTensors) of global ids. Per-row results are
    replicated DTensors; gradients are sharded like the logits. The collectives are those of
    :func:`vocab_parallel_divergence` and the vocab-parallel statistics.

        with fkd.loss_parallel():
            loss = fk.divergence(student_dt, teacher_dt, "js", labels=labels)
            loss.backward()
    """
    from torch.distributed.tensor import DTensor

    handlers = _handlers()
    table = DTensor._op_dispatcher._custom_op_handlers
    saved = {op: table[op] for op in handlers if op in table}
    table.update(handlers)
    try:
        yield
    finally:
        for op in handlers:
            table.pop(op, None)
        table.update(saved)
