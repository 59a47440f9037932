"""Liger-Kernel's distillation modules with their signatures, on fdiv_kernels (CPU and GPU).

Each class takes what Liger's takes (log-probabilities for JSD and KL, probabilities for TVD,
hidden states and lm-head weights for the fused-linear JSDs) and reduces as Liger does
(liger-kernel 0.8.5, ``src/liger_kernel/transformers/{jsd,kl_div,tvd,fused_linear_jsd}.py`` and
``chunked_loss/jsd_loss.py``). Two deliberate differences, both documented per class:

- a ``"none"`` reduction returns per-row values (Liger returns the (BT, V) element tensor);
- the gradient w.r.t. a log-probability input is projected onto the simplex (the input is read as
  logits, and log_softmax is idempotent), so it differs from Liger's by a per-row constant that
  the upstream log_softmax removes: gradients w.r.t. the logits the caller started from are equal.

``apply_fk_to_liger()`` rebinds these classes where Liger exports them (and where TRL imported
them), so code written against Liger runs unchanged, on every backend, without Triton.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

import fdiv_kernels as fk
from fdiv_kernels.integrations._patching import Patch, require

__all__ = [
    "LigerFusedLinearJSD", "LigerFusedLinearJSDLoss", "LigerJSD", "LigerKLDIVLoss", "LigerTVDLoss",
    "apply_fk_to_liger",
]


def _log_of_probs(p: Tensor) -> Tensor:
    # Probabilities as logits. The clamp keeps zero-probability entries finite so their gradient is
    # 0 rather than 0 * inf = NaN; e^log(tiny) is below every other term of a row.
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


class LigerJSD(nn.Module):
    r"""``LigerJSD(beta=0.5, ignore_index=-100)(log_q, log_p, shift_labels=None)``.

    Generalized JSD between the teacher's P = exp(log_p) and the student's Q = exp(log_q), both
    (BT, V) log-probabilities: beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q (beta=0
    is KL(P||Q), beta=1 is KL(Q||P)); summed over rows whose label is not ``ignore_index`` and
    divided by their count (by BT without labels). Returned in ``log_q``'s dtype, as Liger's.
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100) -> None:
        super().__init__()
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Tensor | None = None) -> Tensor:
        loss = fk.divergence(log_q, log_p, "js", beta=float(self.beta), labels=shift_labels,
                             ignore_index=self.ignore_index, reduction="mean")
        return loss.to(log_q.dtype)


class LigerKLDIVLoss(nn.KLDivLoss):
    r"""``LigerKLDIVLoss(eps=1e-10, reduction="mean", log_target=False)(y_pred, y_true)``: KL(P||Q).

    ``y_pred`` = log Q (log-probabilities), ``y_true`` = P (or log P with ``log_target=True``),
    (BT, V). Element terms P (log P - log Q), as ``nn.KLDivLoss``; reduction "batchmean" = sum / BT,
    "sum", "mean" = sum / (BT V) (nn.KLDivLoss's default, which Liger inherits), "none" = per-row
    sums (BT,) here (Liger: the (BT, V) elements). ``eps`` is accepted for the signature: the fused
    op takes 0 log 0 = 0 exactly.
    """

    def __init__(self, eps: float = 1e-10, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        log_p = y_true if self.log_target else _log_of_probs(y_true)
        rows = fk.divergence(y_pred, log_p, "kl", reduction="none").reshape(-1)
        if self.reduction == "none":
            return rows
        total = rows.sum()
        if self.reduction == "sum":
            return total
        if self.reduction == "batchmean":
            return total / y_pred.shape[0]
        return total / y_pred.numel()


class LigerTVDLoss(nn.Module):
    r"""``LigerTVDLoss(reduction="batchmean", ignore_index=-100)(p, q, shift_labels=None)``.

    Total variation 1/2 sum |p - q| between two (BT, V) probability tensors, over rows whose label
    is not ``ignore_index``; "batchmean" / "mean" divide by the kept rows (times V for "mean"),
    "sum" sums, "none" gives per-row values (Liger: elements). Gradient to ``p`` (and ``q`` if it
    requires grad).
    """

    def __init__(self, reduction: str = "batchmean", ignore_index: int = -100) -> None:
        super().__init__()
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, p: Tensor, q: Tensor, shift_labels: Tensor | None = None) -> Tensor:
        rows = fk.divergence(_log_of_probs(p), _log_of_probs(q), "tv", labels=shift_labels,
                             ignore_index=self.ignore_index, reduction="none")
        if self.reduction == "none":
            return rows
        total = rows.sum()
        if self.reduction == "sum":
            return total
        kept = (rows.new_tensor(rows.numel()) if shift_labels is None
                else (shift_labels != self.ignore_index).sum())
        return total / (kept * (p.shape[-1] if self.reduction == "mean" else 1))


class LigerFusedLinearJSD(nn.Module):
    r"""``LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=-100, temperature=1.0)`` called as
    ``(student_input, student_weight, teacher_input, teacher_weight, shift_labels)``.

    JSD(beta) between softmax(teacher_input W_t^T / T) and softmax(student_input W_s^T / T),
    averaged over kept rows (0 when none is kept; Liger divides by zero there), without the
    (BT, V) logits: ``fk.fused_linear_divergence``. ``accum_dtype`` is accepted for the signature;
    logits and gradients always accumulate in fp32 here.
    """

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.jsd_beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature
        self.accum_dtype = accum_dtype

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                teacher_weight: Tensor, shift_labels: Tensor | None = None) -> Tensor:
        return fk.fused_linear_divergence(
            student_input, student_weight, teacher_input, teacher_weight, "js",
            beta=float(self.jsd_beta), temperature=self.temperature, labels=shift_labels,
            ignore_index=self.ignore_index, reduction="mean")


class LigerFusedLinearJSDLoss(nn.Module):
    r"""Liger's chunked ``LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5,
    beta=0.5, ignore_index=-100, temperature=1.0, compiled=True, chunk_size=1024,
    return_soft_hard_loss=False)`` called as ``(student_input, student_weight, teacher_input,
    teacher_weight, true_labels, student_bias=None, teacher_bias=None)``.

    loss = w_hard CE(student logits at T=1, labels) + w_soft JSD(beta) at temperature T, each
    summed over kept rows and divided by their count (at least 1), as Liger. With
    ``return_soft_hard_loss=True`` returns (loss, soft, hard) as Liger does (the parts by a second
    forward-only call, detached). Student and teacher must share the vocabulary size: Liger pads a
    smaller student vocabulary with logit 0, fk with -inf (probability 0).
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                 beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False) -> None:
        super().__init__()
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size = compiled, chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def _loss(self, hs, ws, ht, wt, labels, bs, bt, ce_weight: float) -> Tensor:
        return fk.fused_linear_divergence(
            hs, ws, ht, wt, "js", beta=float(self.beta), temperature=self.temperature,
            student_bias=bs, teacher_bias=bt, labels=labels, ignore_index=self.ignore_index,
            reduction="mean", ce_weight=ce_weight, chunk_size=self.chunk_size)

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                teacher_weight: Tensor, true_labels: Tensor, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None):
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError("student_weight and teacher_weight must share the vocabulary size "
                             f"(Liger pads with logit 0), got {student_weight.shape[0]} and "
                             f"{teacher_weight.shape[0]}")
        args = (student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias, teacher_bias)
        # fk weighs (1 - c) D + c CE; Liger w_s D + w_h CE = (w_s + w_h) times that, c = w_h / sum.
        total_w = float(self.weight_hard_loss) + float(self.weight_soft_loss)
        if total_w == 0.0:
            loss = self._loss(*args, 0.0) * 0.0
        else:
            loss = total_w * self._loss(*args, float(self.weight_hard_loss) / total_w)
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():
            soft = self._loss(*args, 0.0)
            hard = self._loss(*args, 1.0)
        return loss, soft, hard


_CLASSES = {
    "LigerJSD": LigerJSD, "LigerKLDIVLoss": LigerKLDIVLoss, "LigerTVDLoss": LigerTVDLoss,
    "LigerFusedLinearJSD": LigerFusedLinearJSD, "LigerFusedLinearJSDLoss": LigerFusedLinearJSDLoss,
}


def apply_fk_to_liger() -> Patch:
    """Rebind Liger's five distillation classes to these, in every loaded ``liger_kernel`` and
    ``trl`` module that holds Liger's originals (``liger_kernel.transformers``,
    ``liger_kernel.chunked_loss``, their submodules, and TRL modules that imported them).

    Returns a :class:`Patch`; ``undo()`` restores Liger. Idempotent; edits no file.
    """
    require("liger_kernel.transformers", "liger-kernel")
    require("liger_kernel.chunked_loss", "liger-kernel")
    originals = {}
    for mod_name, cls_name in (
        ("liger_kernel.transformers", "LigerJSD"), ("liger_kernel.transformers", "LigerKLDIVLoss"),
        ("liger_kernel.transformers", "LigerTVDLoss"),
        ("liger_kernel.transformers", "LigerFusedLinearJSD"),
        ("liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss"),
    ):
        obj = getattr(sys.modules[mod_name], cls_name, None)
        if obj is not None and obj is not _CLASSES[cls_name]:
            originals[cls_name] = obj
    patch = Patch()
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(("liger_kernel", "trl")):
            continue
        for cls_name, original in originals.items():
            if mod.__dict__.get(cls_name) is original:
                patch.set(mod, cls_name, _CLASSES[cls_name])
    return patch
