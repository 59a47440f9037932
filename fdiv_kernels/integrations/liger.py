"""Liger-Kernel's distillation modules with their signatures, on fdiv_kernels (CPU and GPU).

Each class takes what Liger's takes (log-probabilities for JSD and KL, any tensors for TVD,
hidden states and lm-head weights for the fused-linear JSDs, logits for the per-row CE + TVD)
and keeps Liger's contract (liger-kernel 0.8.5,
``src/liger_kernel/transformers/{jsd,kl_div,tvd,fused_linear_jsd,fused_ce_tvd}.py`` and
``chunked_loss/jsd_loss.py``): the log-prob modules use their inputs as they are (the gradient is
the element terms' own, not projected onto the simplex), give the target no gradient, and return
the (BT, V) elements for ``reduction="none"``. No fk kernel reads log-probabilities without
renormalizing them, so those three are small exact torch functions here (fp32, chunked rows, the
gradient formed in the forward as Liger's kernels do, on every device, no Triton needed); the
fused-linear JSDs run on ``fk.fused_linear_divergence``.

``apply_fk_to_liger()`` rebinds these classes where Liger exports them (and where TRL imported
them), so code written against Liger runs unchanged, on every backend, without Triton.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn

import fdiv_kernels as fk
from fdiv_kernels.integrations._patching import Patch, loaded_modules, require

__all__ = [
    "LigerFusedCETVDLoss", "LigerFusedLinearJSD", "LigerFusedLinearJSDLoss",
    "LigerFusedLinearKLDivLoss", "LigerJSD", "LigerKLDIVLoss", "LigerTVDLoss", "apply_fk_to_liger",
]


_REDUCTIONS = ("none", "sum", "mean", "batchmean")
# fp32 elements per chunk of rows in the log-prob losses (16 MiB per temporary).
_CHUNK_ELEMENTS = 1 << 22


class _TermsAndGrad(torch.autograd.Function):
    """An elementwise loss over (N, V) and its gradient w.r.t. the first input, formed together
    in fp32, a chunk of rows at a time, as Liger's kernels do: the gradient is the element
    terms' own derivative (inputs used as they are, nothing renormalized), the second input gets
    none (Liger's backward returns None for it), and what is saved is the (N, V) gradient in the
    input's dtype (Liger keeps the same).

    ``terms(x, y) -> (elements, d elements / d x)`` on fp32 chunks; ``kept`` (N,) bool or None;
    ``divisor`` a tensor or number the reduced loss and gradient are divided by; ``reduction``
    "none" returns the (N, V) fp32 elements (ignored rows 0), else their sum / divisor.
    """

    @staticmethod
    def forward(ctx, x, y, kept, terms, divisor, reduction):
        n, v = x.shape
        dt = torch.promote_types(x.dtype, torch.float32)
        grad = torch.empty_like(x)
        out = x.new_zeros((n, v) if reduction == "none" else (), dtype=dt)
        step = max(1, _CHUNK_ELEMENTS // max(v, 1))
        for lo in range(0, n, step):
            rows = slice(lo, min(n, lo + step))
            el, g = terms(x[rows].to(dt), y[rows].to(dt))
            if kept is not None:
                keep = kept[rows, None]
                el, g = torch.where(keep, el, 0.0), torch.where(keep, g, 0.0)
            if reduction == "none":
                out[rows] = el
            else:
                out += el.sum()
            grad[rows] = g if reduction == "none" else g / divisor
        if reduction != "none":
            out = out / divisor
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None


def _where_positive(weight: Tensor, value: Tensor) -> Tensor:
    # weight * value with 0 where weight is 0 (0 * -inf = 0, as the math has it).
    return torch.where(weight > 0, weight * value, 0.0)


def _jsd_terms(beta: float):
    def terms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # x = log Q (student), y = log P (teacher); Liger's _jsd_kernel element terms and dX.
        if beta == 0.0:
            p = y.exp()
            return _where_positive(p, y - x), -p
        if beta == 1.0:
            q = x.exp()
            el = _where_positive(q, x - y)
            return el, el + q
        p, q = y.exp(), x.exp()
        log_m = torch.log(beta * p + (1 - beta) * q)
        qx = _where_positive((1 - beta) * q, x - log_m)
        return _where_positive(beta * p, y - log_m) + qx, qx
    return terms


def _check_pair(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _pair_rows(a_name: str, a: Tensor, b_name: str, b: Tensor, labels: Tensor | None,
               ignore_index: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The pair as (BT, V) rows and the mask of rows whose ``shift_labels`` are kept (None:
    every row)."""
    _check_pair(a_name, a, b_name, b)
    v = a.shape[-1]
    x, y = a.reshape(-1, v), b.reshape(-1, v)
    return x, y, _kept_rows(labels, x.shape[0], ignore_index, "shift_labels")


def _kept_rows(labels: Tensor | None, n: int, ignore_index: int, name: str) -> Tensor | None:
    if labels is None:
        return None
    if labels.numel() != n:
        raise ValueError(f"{name} must hold one label per row ({n}), got {tuple(labels.shape)}")
    return labels.reshape(-1) != ignore_index


class LigerJSD(nn.Module):
    r"""``LigerJSD(beta=0.5, ignore_index=-100)(log_q, log_p, shift_labels=None)``.

    Generalized JSD between the teacher's P = exp(log_p) and the student's Q = exp(log_q), both
    (BT, V) log-probabilities used as they are (as Liger: nothing renormalized): beta KL(P||M) +
    (1-beta) KL(Q||M), M = beta P + (1-beta) Q (beta=0 is KL(P||Q), beta=1 is KL(Q||P)); summed
    over rows whose label is not ``ignore_index`` and divided by their count (by BT without
    labels; 0 when no row is kept). Returned in ``log_q``'s dtype; the gradient w.r.t. ``log_q``
    is the terms' own derivative (not projected onto the simplex) and ``log_p`` gets none, as in
    Liger. Exact torch in fp32 chunks of rows (no fk kernel reads log-probabilities without
    renormalizing them).
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100) -> None:
        super().__init__()
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Tensor | None = None) -> Tensor:
        x, y, kept = _pair_rows("log_q", log_q, "log_p", log_p, shift_labels, self.ignore_index)
        # No kept row gives 0 (Liger's suite expects it), not 0 / 0.
        count = x.shape[0] if kept is None else kept.sum().clamp_min(1)
        loss = _TermsAndGrad.apply(x, y, kept, _jsd_terms(float(self.beta)), count, "mean")
        return loss.to(log_q.dtype)


class LigerKLDIVLoss(nn.KLDivLoss):
    r"""``LigerKLDIVLoss(eps=1e-10, reduction="mean", log_target=False)(y_pred, y_true)``: KL(P||Q).

    ``y_pred`` = log Q, ``y_true`` = P (or log P with ``log_target=True``), used as they are (as
    ``nn.KLDivLoss`` and Liger: nothing renormalized). Element terms P (log max(P, eps) - log Q),
    or exp(y_true) (y_true - y_pred) with ``log_target``; reduction "batchmean" = sum / rows,
    "sum", "mean" = sum / (rows V) (nn.KLDivLoss's default, which Liger inherits), "none" = the
    fp32 elements in ``y_pred``'s shape. The gradient w.r.t. ``y_pred`` is -P; ``y_true`` gets
    none, as in Liger. Exact torch in fp32 chunks of rows.
    """

    def __init__(self, eps: float = 1e-10, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        _check_pair("y_pred", y_pred, "y_true", y_true)
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        v = y_pred.shape[-1]
        x, y = y_pred.reshape(-1, v), y_true.reshape(-1, v)
        eps, log_target = self.eps, self.log_target

        def terms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            if log_target:
                p = y.exp()
                return p * (y - x), -p
            return y * (torch.log(y.clamp_min(eps)) - x), -y

        divisor = {"batchmean": x.shape[0], "mean": x.numel()}.get(self.reduction, 1)
        out = _TermsAndGrad.apply(x, y, None, terms, divisor, self.reduction)
        return out.reshape(y_pred.shape) if self.reduction == "none" else out


class LigerTVDLoss(nn.Module):
    r"""``LigerTVDLoss(reduction="batchmean", ignore_index=-100)(p, q, shift_labels=None)``.

    Total variation, elementwise 1/2 |p - q| on any two (BT, V) tensors (as Liger: they need not
    be distributions), over rows whose label is not ``ignore_index``; "batchmean" / "mean"
    divide the sum by the kept rows (times V for "mean"; a loss of 0 when no row is kept),
    "sum" sums, "none" returns the fp32 elements (ignored rows 0). The gradient w.r.t. ``p``
    is +-1/2 (-1/2 where p == q, as Liger's kernel); ``q`` gets none, as in Liger. Exact torch.
    """

    def __init__(self, reduction: str = "batchmean", ignore_index: int = -100) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, p: Tensor, q: Tensor, shift_labels: Tensor | None = None) -> Tensor:
        x, y, kept = _pair_rows("p", p, "q", q, shift_labels, self.ignore_index)
        v = x.shape[-1]
        rows = x.shape[0] if kept is None else kept.sum().clamp_min(1)
        divisor = {"batchmean": rows, "mean": rows * v}.get(self.reduction, 1)

        def terms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return 0.5 * (x - y).abs(), torch.where(x > y, 0.5, -0.5)

        out = _TermsAndGrad.apply(x, y, kept, terms, divisor, self.reduction)
        return out.reshape(p.shape) if self.reduction == "none" else out


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


class LigerFusedCETVDLoss(nn.Module):
    r"""Liger's ``LigerFusedCETVDLoss`` (``liger_kernel.transformers``): per row the cross-entropy
    of the student's logits at ``target`` and the total variation distance to the teacher's
    softmax, both (BT,) float32 and unreduced (the caller masks, weights and normalizes).

    ``forward(student_logits (BT, V), teacher_logits (BT, V), target (BT,))`` returns
    ``(ce, tvd)`` with ce = lse(z_s) - z_s[target] and tvd = 1/2 sum_v |p_v - q_v|; rows whose
    target is ``ignore_index`` give 0 in both and no gradient. Gradients reach the student's
    logits only (the teacher's are read, as in Liger). ``fk.token_logprobs`` and
    ``fk.divergence(kind="tv")``: no softmax of either model is formed.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                target: Tensor) -> tuple[Tensor, Tensor]:
        keep = target != self.ignore_index
        tvd = fk.divergence(student_logits, teacher_logits.detach(), "tv", labels=target,
                            ignore_index=self.ignore_index, reduction="none")
        ce = -fk.token_logprobs(student_logits, target.masked_fill(~keep, 0))
        return ce.float().masked_fill(~keep, 0.0), tvd.float()


class LigerFusedLinearKLDivLoss(nn.Module):
    r"""Liger's ``LigerFusedLinearKLDivLoss`` (``liger_kernel.transformers``): KL(target ||
    softmax(student_input W^T / T)) against a dense teacher distribution given as data, the
    student's (BT, V) logits never formed.

    ``forward(student_input (BT, H), student_weight (V, H), target (BT, V) probabilities,
    shift_labels (BT,) or None)``; per row sum_v Q_v (log max(Q_v, eps) - log q_v) (Q used as
    given, not renormalized; entries Q_v = 0 add 0); rows whose label is ``ignore_index`` add
    nothing; ``reduction`` "batchmean" (/ kept rows), "mean" (/ kept rows x V) or "sum"
    ("none" raises ValueError, as in Liger); 0 when no row is kept. The target gets no
    gradient. ``fk.fused_linear_sparse_divergence`` with the whole vocabulary as the support
    (tail "none"); ``temperature`` T as Liger's (nonzero); ``accum_dtype`` is accepted (fk
    accumulates the weight gradient in fp32).
    """

    def __init__(self, reduction: str | None = "batchmean", ignore_index: int = -100,
                 temperature: float = 1.0, eps: float = 1e-10,
                 accum_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature cannot be 0")
        self.reduction, self.ignore_index, self.temperature = reduction, ignore_index, temperature
        self.eps, self.accum_dtype = eps, accum_dtype

    def forward(self, student_input: Tensor, student_weight: Tensor, target: Tensor,
                shift_labels: Tensor | None = None) -> Tensor:
        if self.reduction not in ("batchmean", "mean", "sum"):
            raise ValueError(f"reduction must be one of ('batchmean', 'mean', 'sum'), got "
                             f"{self.reduction!r}")
        q = target.detach()
        rows, vocab = q.shape
        # The whole vocabulary as the support: an expanded view, no (BT, V) index copy here.
        ids = torch.arange(vocab, device=q.device).expand(rows, vocab)
        loss = fk.fused_linear_sparse_divergence(
            student_input, student_weight, ids, q.float().clamp_min(self.eps).log(), "kl",
            tail="none", temperature=float(self.temperature), support_mask=q > 0,
            labels=shift_labels, ignore_index=self.ignore_index,
            reduction="mean" if self.reduction == "batchmean" else "sum")
        if self.reduction == "mean":
            kept = rows if shift_labels is None else (shift_labels != self.ignore_index).sum()
            loss = loss / (kept * vocab) if rows else loss
            if isinstance(kept, Tensor):
                loss = torch.where(kept > 0, loss, torch.zeros_like(loss))
        return loss


_EXPORTS = (
    ("liger_kernel.transformers", "LigerJSD"), ("liger_kernel.transformers", "LigerKLDIVLoss"),
    ("liger_kernel.transformers", "LigerTVDLoss"),
    ("liger_kernel.transformers", "LigerFusedLinearJSD"),
    ("liger_kernel.transformers", "LigerFusedCETVDLoss"),
    ("liger_kernel.transformers", "LigerFusedLinearKLDivLoss"),
    ("liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss"),
)
_CLASSES = {
    "LigerJSD": LigerJSD, "LigerKLDIVLoss": LigerKLDIVLoss, "LigerTVDLoss": LigerTVDLoss,
    "LigerFusedLinearJSD": LigerFusedLinearJSD, "LigerFusedLinearJSDLoss": LigerFusedLinearJSDLoss,
    "LigerFusedCETVDLoss": LigerFusedCETVDLoss,
    "LigerFusedLinearKLDivLoss": LigerFusedLinearKLDivLoss,
}


def apply_fk_to_liger() -> Patch:
    """Rebind Liger's distillation classes to these wherever a loaded module holds them, under
    any name: ``liger_kernel.transformers``, ``liger_kernel.chunked_loss``, their submodules, TRL
    modules that imported them, and the user's own ``from liger_kernel.chunked_loss import
    LigerFusedLinearJSDLoss`` made before the call.

    What a rebinding cannot reach is refused loudly: a subclass of a Liger class defined before
    the call (it keeps Liger's base) raises ``RuntimeError`` naming it; apply the patch before
    defining it. (Instances made before the call stay Liger's.) Returns a :class:`Patch`;
    ``undo()`` restores Liger, modules imported meanwhile included. Idempotent; edits no file.
    """
    require("liger_kernel.transformers", "liger-kernel")
    require("liger_kernel.chunked_loss", "liger-kernel")
    originals = {}
    for mod_name, cls_name in _EXPORTS:
        obj = getattr(sys.modules[mod_name], cls_name, None)
        if obj is not None and obj is not _CLASSES[cls_name]:
            originals[cls_name] = obj
    hosts = tuple(originals.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # a module's deprecated objects warn when touched
        stuck = sorted({f"{v.__module__}.{v.__qualname__}" for mod in loaded_modules()
                        for v in list(mod.__dict__.values())
                        if isinstance(v, type) and v not in hosts and issubclass(v, hosts)
                        and not v.__module__.startswith("liger_kernel")})
    if hosts and stuck:
        raise RuntimeError(
            f"apply_fk_to_liger() cannot reach {', '.join(stuck)}: subclassed from Liger's class "
            "before the patch, it keeps Liger's base; call apply_fk_to_liger() before defining it")
    patch = Patch()
    for cls_name, original in originals.items():
        patch.set_everywhere(original, _CLASSES[cls_name])
    return patch
