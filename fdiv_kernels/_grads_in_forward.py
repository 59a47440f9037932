"""The autograd contract of the ops that compute their logit gradients in the forward.

The forward's kernel returns d loss_i / d logits per row; the backward only scales row i by the
incoming d L / d loss_i. In place by default (no second (N, V) buffer; the graph can then be
backpropagated once, and a second backward raises instead of returning scaled-twice gradients);
into fresh tensors when ``inplace`` is False (retain_graph, gradcheck, jacobians).
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_grads(ctx, gs: Tensor, gt: Tensor, grad_s: bool, grad_t: bool, inplace: bool) -> None:
    """Store the forward's per-row gradients (placeholders where not wanted) on ``ctx``."""
    ctx.save_for_backward(gs, gt)
    ctx.grad_s, ctx.grad_t = grad_s, grad_t
    ctx.inplace, ctx.used = inplace, False


def scaled_grads(ctx, grad_loss: Tensor, what: str) -> tuple[Tensor | None, Tensor | None]:
    """(d L / d student, d L / d teacher): the stored gradients scaled per row by ``grad_loss``."""
    if torch.is_grad_enabled():
        # create_graph=True: the stored gradient is not a differentiable function of the inputs.
        raise RuntimeError(
            f"{what} does not support higher-order gradients (backward with create_graph=True)"
        )
    if ctx.used:
        # The first backward scaled the stored gradients in place.
        raise RuntimeError(
            f"{what}: backward ran twice through the same graph (retain_graph=True, gradcheck, "
            "jacobians); pass inplace_backward=False for that"
        )
    ctx.used = ctx.inplace
    gs, gt = ctx.saved_tensors
    if not ctx.inplace:
        gs, gt = gs.clone(), gt.clone()
    if ctx.grad_s:
        torch.ops.fdiv.scale_rows_(gs, grad_loss)
    if ctx.grad_t:
        torch.ops.fdiv.scale_rows_(gt, grad_loss)
    return (gs if ctx.grad_s else None), (gt if ctx.grad_t else None)


__all__ = ["keep_grads", "scaled_grads"]
