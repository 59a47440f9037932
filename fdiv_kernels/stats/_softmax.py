"""Softmax statistics from logits in one pass: log-sum-exp, entropy, token log-probabilities.

All four public functions are views of one op, ``fdiv::softmax_stats_{fwd,bwd}_<backend>``:
the forward reads each row once and saves only per-row statistics (never the softmax); the
backward reads the row once more and writes the gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import select_ops
from fdiv_kernels.core._transforms import check_logit_transform, transform_logits


class SoftmaxStats(NamedTuple):
    lse: Tensor                   # log sum exp(z / T), z the (transformed) logits
    entropy: Tensor               # -sum q log q, q = softmax(z / T)
    label_logprob: Tensor | None  # log q[label] (0 for ignored rows); None without labels


class SoftmaxStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, ignore_index, inv_t, want_entropy, ops, scale=1.0,
                softcap=0.0):
        lse, ent, lp = ops.softmax_stats_fwd(x, labels, ignore_index, inv_t, scale, softcap,
                                             want_entropy)
        ctx.save_for_backward(x, labels, lse, ent)
        ctx.ignore_index, ctx.inv_t, ctx.ops = ignore_index, inv_t, ops
        ctx.scale, ctx.softcap = scale, softcap
        ctx.mark_non_differentiable(*([] if want_entropy else [ent]),
                                    *([] if labels is not None else [lp]))
        # Outputs nobody used get None, not zeros: a zero g_lse times a NaN softmax would make
        # an ignored row's gradient NaN (token_logprobs uses only the label log-probability).
        ctx.set_materialize_grads(False)
        return lse, ent, lp

    @staticmethod
    def backward(ctx, g_lse, g_ent, g_lp):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fdiv_kernels softmax statistics do not support higher-order gradients "
                "(backward with create_graph=True)"
            )
        x, labels, lse, ent = ctx.saved_tensors
        if g_lse is None and g_ent is None and g_lp is None:
            return (None,) * 8
        # Incoming row gradients are often expanded views (stride 0): kernels want them dense.
        g_lse = g_lse.contiguous() if g_lse is not None else None
        g_ent = g_ent.contiguous() if g_ent is not None and ent.numel() else None
        g_lp = g_lp.contiguous() if g_lp is not None and labels is not None else None
        dx = ctx.ops.softmax_stats_bwd(x, labels, lse, ent, g_lse, g_ent, g_lp, ctx.ignore_index,
                                       ctx.inv_t, ctx.scale, ctx.softcap)
        return dx, *([None] * 7)


def _rows(name: str, x: object) -> tuple[Tensor, torch.Size]:
    x = V.check_logits(name, x)
    return x.reshape(-1, x.shape[-1]).contiguous(), x.shape[:-1]


def _labels(labels: object, ignore_index: object, lead: torch.Size, x: Tensor) -> Tensor:
    if labels is None:
        raise TypeError("labels must be an integer tensor, got None")
    # int32 / int64 as given; narrower integer dtypes widened (or rejected if they cannot hold
    # ignore_index), so the kernels never compare in a wrapping type.
    flat = V.check_labels(labels, ignore_index, lead, x.device).reshape(-1)
    vocab = x.shape[-1]
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if not torch.compiler.is_compiling() and bool(bad.any()):
        # One host sync buys a clear error; the kernels also never read outside a row.
        example = flat[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, got {example}"
        )
    return flat.contiguous()


def softmax_stats(
    logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> SoftmaxStats:
    r"""Per-row statistics of q = softmax(z / T) in one pass over the logits.

    lse = log sum_j exp(z_j / T);  entropy = -sum_j q_j log q_j;  label_logprob = z_label / T - lse
    (0 for rows whose label is ``ignore_index``). All are float32 (float64 for float64 logits)
    with the logits' leading shape, and differentiable w.r.t. ``logits``.

    z is the logits after the model's transforms, fused into the kernels: z = x * logit_scale,
    then with a ``softcap`` c: z = c tanh(z / c) (a -inf logit becomes the finite -c); the
    gradient is chained through them. ``logit_scale`` must be finite and positive, ``softcap``
    None or finite and positive.

    Args:
        logits: (..., V) floating-point logits.
        labels: optional integer tensor of the leading shape (...); gives ``label_logprob``.
        temperature: T > 0 (1/T must be finite in the compute dtype).
        ignore_index: label value of rows whose ``label_logprob`` is 0 with no gradient.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
    """
    x, lead = _rows("logits", logits)
    inv_t = V.check_temperature(temperature, x.dtype)
    xf = check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
    lab = _labels(labels, ignore_index, lead, logits) if labels is not None else None
    if labels is None:
        V.row_mask(None, ignore_index, lead, x.device)
    ops = select_ops(backend, x, "softmax_stats_fwd", transforms=xf)
    lse, ent, lp = SoftmaxStatsFunction.apply(x, lab, int(ignore_index), inv_t, True, ops, *xf)
    return SoftmaxStats(lse.reshape(lead), ent.reshape(lead),
                        lp.reshape(lead) if lab is not None else None)


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    r"""log softmax(z / T)[label] per row, without materializing log_softmax.

    The "selective log-softmax" of RL and preference trainers. Ignored rows give 0 and zero
    gradient; the backward writes (onehot - softmax) g / T in one pass from the saved per-row lse.

    ``labels`` is (...) (one label per row) or (..., K) (K labels per row, e.g. top-K ids):
    then the result is (..., K), z[label_k] / T - lse with one lse per row; ignored entries
    give 0 and no gradient. z = logits, or the transformed logits with ``logit_scale`` /
    ``softcap`` (see :func:`softmax_stats`), fused in with their gradient.

    Args:
        logits: (..., V) floating-point logits.
        labels: integer tensor (...) or (..., K) of vocabulary ids.
        temperature: T > 0 (1/T must be finite in the compute dtype).
        ignore_index: label value whose entries give 0 and zero gradient.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
    """
    x, lead = _rows("logits", logits)
    inv_t = V.check_temperature(temperature, x.dtype)
    xf = check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
    if isinstance(labels, Tensor) and labels.dim() == logits.dim():
        return _token_logprobs_k(x, lead, labels, inv_t, ignore_index, backend, xf)
    lab = _labels(labels, ignore_index, lead, logits)
    ops = select_ops(backend, x, "softmax_stats_fwd", transforms=xf)
    _, _, lp = SoftmaxStatsFunction.apply(x, lab, int(ignore_index), inv_t, False, ops, *xf)
    return lp.reshape(lead)


def _token_logprobs_k(x: Tensor, lead: torch.Size, labels: Tensor, inv_t: float,
                      ignore_index: int, backend: str, xf: tuple[float, float]) -> Tensor:
    """K labels per row: one lse per row from the op (no entropy), then a gather of K logits
    (transformed there, (N, K) elements)."""
    if labels.shape[:-1] != lead:
        raise ValueError(f"labels must have shape {tuple(lead)} or {tuple(lead)} + (K,), got "
                         f"{tuple(labels.shape)}")
    k = labels.shape[-1]
    flat = _labels(labels, ignore_index, labels.shape, x).reshape(-1, k)  # dtype and range
    ops = select_ops(backend, x, "softmax_stats_fwd", transforms=xf)
    lse, _, _ = SoftmaxStatsFunction.apply(x, None, int(ignore_index), inv_t, False, ops, *xf)
    ignored = flat == ignore_index
    picked = x.gather(-1, flat.masked_fill(ignored, 0).to(torch.int64)).to(lse.dtype)
    picked = transform_logits(picked, *xf)[0] * inv_t
    # torch.where, not a product with the mask: an ignored entry sends no gradient to its row.
    out = torch.where(ignored, torch.zeros((), dtype=lse.dtype, device=x.device),
                      picked - lse[:, None])
    return out.reshape(*lead, k)


def entropy(
    logits: Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    r"""Per-row entropy H = lse - sum_j q_j z_j / T of q = softmax(z / T), with autograd.

    z = logits, or the transformed logits with ``logit_scale`` / ``softcap`` (see
    :func:`softmax_stats`).

    Args:
        logits: (..., V) floating-point logits; the result has the leading shape (...).
        temperature: T > 0 (1/T must be finite in the compute dtype).
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
    """
    x, lead = _rows("logits", logits)
    inv_t = V.check_temperature(temperature, x.dtype)
    xf = check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
    ops = select_ops(backend, x, "softmax_stats_fwd", transforms=xf)
    _, ent, _ = SoftmaxStatsFunction.apply(x, None, -100, inv_t, True, ops, *xf)
    return ent.reshape(lead)


def logsumexp(
    x: Tensor,
    dim: int | Sequence[int] = -1,
    keepdim: bool = False,
    *,
    backend: str = "auto",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    r"""Drop-in for ``torch.logsumexp``: log sum exp(x) over ``dim`` in one online pass.

    Any dim (or tuple of dims) and ``keepdim`` as torch's; the result has x's dtype. Reducing a
    dim other than the last costs one transposed copy. All -inf gives -inf, any +inf gives +inf.
    The gradient, softmax(x) * g, is recomputed from the saved lse, never stored. With
    ``logit_scale`` / ``softcap``, log sum exp(z) of the transformed z (see
    :func:`softmax_stats`), with its gradient.

    Args:
        x: floating-point tensor.
        dim: the dim or dims reduced.
        keepdim: keep the reduced dims with size 1.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (``FDIV_BACKEND`` overrides "auto").
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim must be a bool, got {type(keepdim).__name__}")
    xf = check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
    dims = (dim,) if isinstance(dim, int) and not isinstance(dim, bool) else dim
    if (not isinstance(dims, (tuple, list)) or not dims
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
        raise TypeError(f"dim must be an int or a non-empty sequence of ints, got {dim!r}")
    nd = max(x.dim(), 1)
    if any(not -nd <= d < nd for d in dims):
        raise ValueError(f"dim {dim} is out of range for a tensor with {x.dim()} dims")
    dims = sorted({d % nd for d in dims})
    if x.dim() == 0:
        if xf != (1.0, 0.0):
            return logsumexp(x.reshape(1), 0, backend=backend, logit_scale=logit_scale,
                             softcap=softcap)
        return x.clone()
    moved = x.movedim(dims, list(range(x.dim() - len(dims), x.dim())))
    lead = moved.shape[: x.dim() - len(dims)]
    out_shape = [1 if i in dims else s for i, s in enumerate(x.shape)] if keepdim else lead
    width = 1
    for d in dims:
        width *= x.shape[d]
    if x.numel() == 0:
        # torch's conventions: an empty reduction is -inf; an empty batch is empty.
        return torch.full(out_shape, float("-inf"), dtype=x.dtype, device=x.device) + x.sum() * 0
    rows = moved.reshape(-1, width).contiguous()
    ops = select_ops(backend, rows, "softmax_stats_fwd", transforms=xf)
    lse, _, _ = SoftmaxStatsFunction.apply(rows, None, -100, 1.0, False, ops, *xf)
    return lse.to(x.dtype).reshape(out_shape)
