"""``nn.Module`` forms of the functional API."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fdiv_kernels.core import _validation as V

from fdiv_kernels.core._dispatch import select
from fdiv_kernels.divergences import divergence, sparse_divergence
from fdiv_kernels.divergences._sparse_tails import TAILS
from fdiv_kernels.fused_linear import fused_linear_divergence
from fdiv_kernels.kinds._registry import resolve
from fdiv_kernels.transport import _costs, _problem, _registry, _unrolled
from fdiv_kernels.transport._sinkhorn import sinkhorn


class _KindLoss(nn.Module):
    """A loss module over one divergence kind: its options are checked at construction (so a bad
    ``kind`` fails where it is written), kept in ``self.kwargs`` and passed to the functional op."""

    def __init__(self, kind: str, beta: float | None, alpha: float | None, lam: float | None,
                 row_kinds: bool = False, **options) -> None:
        super().__init__()
        resolve(kind, beta, alpha, lam, row_kinds=row_kinds)
        self.kwargs = dict(kind=kind, beta=beta, alpha=alpha, lam=lam, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if v is not None)


class FDivergenceLoss(_KindLoss):
    """``fk.divergence`` as a module: ``FDivergenceLoss(kind="js", beta=0.5)(student, teacher)``.

    Options are checked when the module is built (a bad ``kind`` fails where it is written).

    Args:
        kind: a kind of :func:`fk.divergence` (built-in or registered).
        beta, alpha, lam: the kind's parameter (``js``: beta; ``alpha``, ``renyi``: alpha;
            ``skew_kl``, ``skew_reverse_kl``: lam); None takes the kind's default.
        temperature: T > 0; both distributions are softmax(logits / T).
        ignore_index: rows whose label equals it add nothing and get zero gradient.
        reduction: "none", "sum" or "mean" (over kept rows, or / ``num_items_in_batch``).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
        vocab_size: the tokenizer's size for vocabularies padded to different widths (only the
            first ``vocab_size`` columns take part); None: the widths must agree.

    Called as ``crit(student_logits, teacher_logits, labels=None, num_items_in_batch=None)``:
    logits (..., V) and optional labels (...), as in :func:`fk.divergence`; returns the loss.
    """

    def __init__(
        self,
        kind: str = "kl",
        *,
        beta: float | None = None, alpha: float | None = None, lam: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100, reduction: str = "mean",
        backend: str = "auto",
        vocab_size: int | None = None,
    ) -> None:
        # fk.divergence takes every kind, the row kinds (renyi, cauchy_schwarz) included.
        super().__init__(kind, beta, alpha, lam, row_kinds=True, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction, backend=backend,
                         vocab_size=vocab_size)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return divergence(student_logits, teacher_logits, labels=labels,
                          num_items_in_batch=num_items_in_batch, **self.kwargs)


class FusedLinearDivergenceLoss(_KindLoss):
    """``fk.fused_linear_divergence`` as a module, called with hidden states and lm-head weights:

    ``crit(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, num_items_in_batch=None)``; the arguments mean what
    they mean in :func:`fk.fused_linear_divergence`.

    Args:
        kind: a kind of :func:`fk.divergence` (built-in or registered).
        beta, alpha, lam: the kind's parameter (``js``: beta; ``alpha``, ``renyi``: alpha;
            ``skew_kl``, ``skew_reverse_kl``: lam); None takes the kind's default.
        temperature: T > 0; both distributions are softmax(logits / T).
        ignore_index: rows whose label equals it add nothing and get zero gradient.
        reduction: "none", "sum" or "mean" (over kept rows, or / ``num_items_in_batch``).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
        vocab_size: the tokenizer's size for vocabularies padded to different widths (only the
            first ``vocab_size`` columns take part); None: the widths must agree.
        ce_weight: w in (1 - w) D + w CE(student, labels) (labels required when w > 0).
        chunk_size: rows per chunk (default: from a memory budget).
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: each model's
            logit transforms (z -> s z, then c tanh(z / c)), fused in.
        batch_invariant: every chunk GEMM runs at one fixed row block, so a row's loss does not
            depend on the batch it came in (see :func:`fk.fused_linear_divergence`).
    """

    def __init__(
        self,
        kind: str = "kl",
        *,
        beta: float | None = None, alpha: float | None = None, lam: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100, reduction: str = "mean",
        ce_weight: float = 0.0,
        chunk_size: int | None = None,
        backend: str = "auto",
        vocab_size: int | None = None,
        student_logit_scale: float = 1.0, student_softcap: float | None = None,
        teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None,
        batch_invariant: bool = False,
    ) -> None:
        super().__init__(kind, beta, alpha, lam, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction, ce_weight=ce_weight,
                         chunk_size=chunk_size, backend=backend, vocab_size=vocab_size,
                         student_logit_scale=student_logit_scale,
                         student_softcap=student_softcap,
                         teacher_logit_scale=teacher_logit_scale,
                         teacher_softcap=teacher_softcap, batch_invariant=batch_invariant)

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return fused_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels=labels,
            student_bias=student_bias, teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch, **self.kwargs,
        )


class SinkhornDistillationLoss(nn.Module):
    """Batch-wise Sinkhorn knowledge distillation (SinKD): the OT cost between the batch of
    softened student distributions and the batch of softened teacher distributions.

    For logits (N, C): p_s = softmax(student / T), p_t = softmax(teacher / T) (teacher detached),
    cost C_ij = |p_s,i - p_t,j|_1 (N x N), uniform marginals, ``n_iter`` log-domain Sinkhorn
    iterations at ``epsilon``, loss = <C, P>, differentiated through the iterations.
    Logits with more dims are flattened to rows. On a backend with a fused unrolled pair (the
    cpu backend) the iterations and their backward are one call each.

    Args:
        temperature: T > 0 of the softened distributions.
        epsilon: the entropic regularization, > 0.
        n_iter: the number of Sinkhorn iterations (>= 1), all differentiated through.
        backend: "auto", "triton", "cpu" or "torch".

    Called as ``crit(student_logits, teacher_logits)`` with logits (..., C) of one shape;
    returns the 0-dim loss. The marginals are 1/N each (a plan of mass 1).
    """

    def __init__(self, temperature: float = 2.0, epsilon: float = 0.1, n_iter: int = 20,
                 backend: str = "auto") -> None:
        super().__init__()
        self.temperature = V.check_real("temperature", temperature, positive=True)
        self.epsilon = V.check_real("epsilon", epsilon, positive=True)
        self.n_iter = _problem.integer("n_iter", n_iter, 1)
        self.backend = backend

    @V.full_precision
    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        V.check_logits("student_logits", student_logits)
        V.check_logits("teacher_logits", teacher_logits)
        V.check_pair(student_logits, teacher_logits)
        s = student_logits.reshape(-1, student_logits.shape[-1])
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
        ctype = _costs.compute_dtype(s.dtype)
        ps = torch.softmax(s.to(ctype) / self.temperature, -1)
        pt = torch.softmax(t.to(ctype) / self.temperature, -1)
        name = select(self.backend, ps, "sinkhorn_fwd")
        if _registry.ops_for(name).unrolled_fwd is not None:
            # SinKD is tiny: per-call overhead is the cost, so straight to the fused pair (one
            # problem, uniform weights passed as None), skipping sinkhorn()'s checks and tensors.
            lin = _unrolled.fused(name, ps[None], pt[None], None, None, None, None, None,
                                  self.epsilon, _costs.COST_KINDS["l1"], 0.0, 0.0, self.n_iter,
                                  False)[1]
            return lin[0]
        r = sinkhorn(x=ps, y=pt, cost_fn="l1", epsilon=self.epsilon, max_iter=self.n_iter,
                     tol=0.0, grad="unrolled", backend=name)
        return r.cost

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}, n_iter={self.n_iter}"


class SparseDivergenceLoss(_KindLoss):
    """``fk.sparse_divergence`` as a module (a top-k teacher):
    ``SparseDivergenceLoss("kl", tail="bucket")(student_logits, teacher_ids, teacher_logprobs,
    support_mask=None, labels=None, num_items_in_batch=None)``.

    Args:
        kind: a kind of :func:`fk.divergence` (built-in or registered).
        beta, alpha, lam: the kind's parameter (``js``: beta; ``alpha``, ``renyi``: alpha;
            ``skew_kl``, ``skew_reverse_kl``: lam); None takes the kind's default.
        temperature: T > 0; both distributions are softmax(logits / T).
        ignore_index: rows whose label equals it add nothing and get zero gradient.
        reduction: "none", "sum" or "mean" (over kept rows, or / ``num_items_in_batch``).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
        vocab_size: the tokenizer's size for vocabularies padded to different widths (only the
            first ``vocab_size`` columns take part); None: the widths must agree.
        tail: "bucket", "renormalize" or "none": the mass outside the teacher's support.
        teacher_temperature: the temperature the teacher's log-probs were produced at (None:
            ``temperature``).
        student_logit_scale, student_softcap: the student's logit transforms, fused in.
    """

    def __init__(self, kind: str = "kl", *, tail: str = "bucket", beta: float | None = None,
                 alpha: float | None = None, lam: float | None = None, temperature: float = 1.0,
                 teacher_temperature: float | None = None, student_logit_scale: float = 1.0,
                 student_softcap: float | None = None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto",
                 vocab_size: int | None = None) -> None:
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {sorted(TAILS)}, got {tail!r}")
        super().__init__(kind, beta, alpha, lam, tail=tail, temperature=temperature,
                         teacher_temperature=teacher_temperature,
                         student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                         ignore_index=ignore_index,
                         reduction=reduction, backend=backend, vocab_size=vocab_size)

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                support_mask: Tensor | None = None, labels: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None) -> Tensor:
        return sparse_divergence(student_logits, teacher_ids, teacher_logprobs,
                                 support_mask=support_mask, labels=labels,
                                 num_items_in_batch=num_items_in_batch, **self.kwargs)
