"""The autograd contract of the ops that compute their logit gradients in the forward.

The forward's kernel returns d loss_i / d logits per row; the backward only scales row i by the
incoming d L / d loss_i. In place by default (no second (N, V) buffer; the graph can then be
backpropagated once, and a second backward raises instead of returning scaled-twice gradients);
into fresh tensors when ``inplace`` is False (retain_graph, gradcheck, jacobians).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core._rows import row_chunks


# Elements per chunk of the CPU mixed-dtype row scale. torch's CPU mul_ of a 16-bit tensor by a
# float32 one materializes float32 copies of its operands (two (N, V) fp32 temporaries: 19 MiB
# peak for a 3.9 MiB bf16 gradient); row chunks bound them to 2 x 1 MiB.
SCALE_CHUNK_ELEMENTS = 1 << 18


@torch.library.custom_op("fdiv::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, row_scale: Tensor) -> None:
    """grad[i, :] *= row_scale[i], in place: the backward of every fused forward.

    In place so the backward holds one (N, V) gradient, not two. The product is formed in the
    wider of the two dtypes and rounded once.
    """
    scale = row_scale.unsqueeze(-1)
    if grad.device.type != "cpu" or grad.dtype == row_scale.dtype or grad.dim() != 2:
        grad.mul_(scale)
        return
    for r in row_chunks(*grad.shape, SCALE_CHUNK_ELEMENTS):
        grad[r].mul_(scale[r])


@scale_rows_.register_fake
def _(grad: Tensor, row_scale: Tensor) -> None:
    return None


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
        scale_rows_(gs, grad_loss)
    if ctx.grad_t:
        scale_rows_(gt, grad_loss)
    return (gs if ctx.grad_s else None), (gt if ctx.grad_t else None)


__all__ = ["keep_grads", "scale_rows_", "scaled_grads"]
