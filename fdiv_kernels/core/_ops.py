"""What each backend offers the softmax family, declared in one record it fills.

A backend's ops module (``fdiv_kernels.backends.cpu_ops``, ``cuda_ops``, ``triton_ops``,
``torch_ref``) registers its kernels as ``fdiv::<op>_<backend>`` ops and hands them to
:func:`register` in a :class:`SoftmaxOps`; the public functions get the record from
:func:`select_ops` and call its fields. Nothing probes ``torch.ops.fdiv`` by name: what a backend
lacks is a field left None or a capability it does not declare, and the dispatch explains a
refusal from them. The fakes of every op are registered here, in one loop.

Signatures (every backend's op of a field takes the same arguments; the fakes in ``_fakes``):

    divergence_fwd(student[N,V], teacher[N,V], valid[N], base, swap, param, inv_temperature,
                   student_scale, student_softcap, teacher_scale, teacher_softcap,
                   grad_student, grad_teacher) -> (loss[N], grad_student, grad_teacher, entropy[N])
    divergence_partials / divergence_grads: the phases of a vocabulary-sharded divergence
    lse_combination_fwd: the row kinds' weighted log-sum-exps (``divergences._row_kinds``)
    sparse_divergence_fwd / _bwd: the top-k teacher (``divergences._sparse``)
    sparse_divergence_fwd_inplace: the forward with the student gradient written over the
        student logits (the fused form's chunk buffer; optional, cpu only)
    softmax_stats_fwd / _bwd: lse, entropy, label log-prob (``stats._softmax``)
    topk_logprobs_fwd: a row's top-k transformed logits and (max, log-sum) (``stats._topk``)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torch import Tensor

from fdiv_kernels.core import _dispatch
from fdiv_kernels.core._fakes import FAKES
from fdiv_kernels.kinds._registry import BY_BASE

# The schema of each op, the same for every backend (csrc/ops.cpp declares the C++ ones with this
# text; tests/test_opcheck.py checks that they agree).
SCHEMAS = {
    "divergence_fwd":
        "(Tensor student, Tensor teacher, Tensor valid, int kind, bool swap, float param, "
        "float inv_temperature, float student_scale, float student_softcap, float teacher_scale, "
        "float teacher_softcap, bool grad_student, bool grad_teacher) "
        "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor entropy)",
    "divergence_partials":
        "(Tensor student, Tensor teacher, Tensor valid, Tensor lse_student, Tensor lse_teacher, "
        "int kind, bool swap, float param, float inv_temperature) -> Tensor",
    "divergence_grads":
        "(Tensor student, Tensor teacher, Tensor valid, Tensor lse_student, Tensor lse_teacher, "
        "Tensor sums, int kind, bool swap, float param, float inv_temperature, "
        "bool grad_student, bool grad_teacher) -> (Tensor grad_student, Tensor grad_teacher)",
    "lse_combination_fwd":
        "(Tensor student, Tensor teacher, Tensor valid, float[] coeffs, float inv_temperature, "
        "float student_scale, float student_softcap, float teacher_scale, float teacher_softcap, "
        "bool grad_student, bool grad_teacher) "
        "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)",
    "sparse_divergence_fwd":
        "(Tensor student, Tensor ids, Tensor teacher, Tensor support, Tensor valid, int kind, "
        "bool swap, float param, float inv_temperature, int tail, float teacher_alpha, "
        "float mass_slack, float logit_scale, float softcap, bool grad_student, "
        "bool grad_teacher) -> (Tensor loss, Tensor grad_student, Tensor grad_teacher, "
        "Tensor stats)",
    "sparse_divergence_fwd_inplace":
        "(Tensor(a!) student, Tensor ids, Tensor teacher, Tensor support, Tensor valid, "
        "int kind, bool swap, float param, float inv_temperature, int tail, "
        "float teacher_alpha, float mass_slack, float logit_scale, float softcap, "
        "bool grad_teacher) -> (Tensor loss, Tensor grad_teacher, Tensor stats)",
    "sparse_divergence_bwd":
        "(Tensor student, Tensor ids, Tensor teacher, Tensor support, Tensor valid, "
        "Tensor stats, Tensor grad_loss, int kind, bool swap, float param, "
        "float inv_temperature, int tail, float teacher_alpha, float logit_scale, "
        "float softcap) -> Tensor",
    "softmax_stats_fwd":
        "(Tensor x, Tensor? labels, int ignore_index, float inv_temperature, float scale, "
        "float softcap, bool entropy) -> (Tensor lse, Tensor entropy, Tensor label_logprob)",
    "softmax_stats_bwd":
        "(Tensor x, Tensor? labels, Tensor lse, Tensor entropy, Tensor? g_lse, "
        "Tensor? g_entropy, Tensor? g_logprob, int ignore_index, float inv_temperature, "
        "float scale, float softcap) -> Tensor",
    "topk_logprobs_fwd":
        "(Tensor x, int k, float inv_temperature, float scale, float softcap) "
        "-> (Tensor ids, Tensor values, Tensor stats)",
}
# The ops a record may fill, in the order of the fields below.
OPS = tuple(SCHEMAS)


def define(op: str, backend: str, fn: Callable) -> Callable:
    """Register the Python function ``fn`` as ``fdiv::<op>_<backend>`` with the op's schema."""
    return torch.library.custom_op(f"fdiv::{op}_{backend}", fn, mutates_args=(),
                                   schema=SCHEMAS[op])


@dataclass(frozen=True)
class SoftmaxOps:
    """One backend's softmax-family kernels and what they can take.

    fuses_transforms: the kernels apply the logit scale / softcap themselves (else a call with a
        transform is refused with a reason).
    custom_kind_ops: the ops whose kernels run kinds registered with ``fk.register_divergence``.
    custom_kinds_need_jit: those kernels need the kind's ``@triton.jit`` generator pair.
    """

    name: str
    divergence_fwd: Optional[Callable] = None
    divergence_partials: Optional[Callable] = None
    divergence_grads: Optional[Callable] = None
    lse_combination_fwd: Optional[Callable] = None
    sparse_divergence_fwd: Optional[Callable] = None
    sparse_divergence_fwd_inplace: Optional[Callable] = None
    sparse_divergence_bwd: Optional[Callable] = None
    softmax_stats_fwd: Optional[Callable] = None
    softmax_stats_bwd: Optional[Callable] = None
    topk_logprobs_fwd: Optional[Callable] = None
    fuses_transforms: bool = True
    custom_kind_ops: tuple[str, ...] = ()
    custom_kinds_need_jit: bool = False

    def provides(self, op: str) -> bool:
        return op in OPS and getattr(self, op) is not None

    def reasons(self, op: str, base: int, plain: bool) -> list[str]:
        """Why this backend cannot run ``op`` for divergence base ``base`` (-1: none) with the
        logit transforms on (``plain`` False) or off; empty: it can."""
        out = []
        if not plain and not self.fuses_transforms:
            out.append(f"the {self.name} kernels do not fuse the logit transforms (logit scale, "
                       "softcap)")
        custom = BY_BASE.get(base)
        if custom is not None:
            if op not in self.custom_kind_ops:
                which = ("the C++ kernels compile their kinds in and cannot run it"
                         if not self.custom_kind_ops else
                         f"the {self.name} kernels of {op} do not take custom kinds (only "
                         f"{', '.join(self.custom_kind_ops)} do)")
                out.append(f"kind {custom.name!r} is a custom kind (fk.register_divergence): "
                           + which)
            elif self.custom_kinds_need_jit and custom.triton_f is None:
                out.append(f"kind {custom.name!r} is a custom kind (fk.register_divergence) "
                           "registered without triton_f / triton_f_prime: the Triton kernels "
                           "need them")
        return out


_RECORDS: dict[str, SoftmaxOps] = {}


def qualname(op: Callable) -> str:
    """``namespace::name`` of a registered op (a C++ op packet or a Python custom op)."""
    name = getattr(op, "_qualified_op_name", None) or getattr(op, "_qualname", None)
    if name is None:
        raise TypeError(f"{op!r} is not a registered torch op")
    return name


def register(ops: SoftmaxOps) -> None:
    """Make ``ops`` the record of its backend, tell the dispatch, and register every op's fake."""
    for f in fields(ops):
        op = getattr(ops, f.name)
        if f.name in FAKES and op is not None:
            torch.library.register_fake(qualname(op))(FAKES[f.name])
    _RECORDS[ops.name] = ops
    _dispatch.register(ops)


def ops_for(backend: str) -> SoftmaxOps:
    """The record of ``backend`` (a name the dispatch selected)."""
    return _RECORDS[backend]


def records() -> list[SoftmaxOps]:
    """Every record registered so far (the backends whose ops modules were imported)."""
    return list(_RECORDS.values())


def overload(op: Callable) -> torch._ops.OpOverload:
    """The default overload of a record's op, as ``__torch_dispatch__`` handlers see it."""
    return op.default if isinstance(op, torch._ops.OpOverloadPacket) else op._opoverload


def select_ops(requested: str, x: Tensor, op: str, base: int | None = None,
               transforms: tuple[float, ...] | None = None) -> SoftmaxOps:
    """The record of the backend :func:`fdiv_kernels.core._dispatch.select` picks for ``op``."""
    return ops_for(_dispatch.select(requested, x, op, base, transforms))


__all__ = ["OPS", "SCHEMAS", "SoftmaxOps", "define", "ops_for", "overload", "qualname", "records",
           "register", "select_ops"]
