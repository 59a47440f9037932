"""axolotl's knowledge-distillation plugin (``axolotl.integrations.kd``): its top-k forward KL
on ``fk.sparse_divergence``.

``topk_kd_loss`` is ``axolotl.integrations.kd.topk_logprob.forward_kl.loss`` (same signature,
same value and gradients); ``apply_fk_to_axolotl()`` rebinds that function wherever a loaded
module holds it and ``ChunkedTopKKDLoss.forward`` (the chunked wrapper, whose chunks then need
no splitting: the op never holds more than a row of the student's softmax). Checked against
axolotl 0.19 (``tests/test_integrations_axolotl.py``, skipped where axolotl is not installed).
"""

from __future__ import annotations

from torch import Tensor

import fdiv_kernels as fk
from fdiv_kernels.integrations._patching import Patch, require

__all__ = ["apply_fk_to_axolotl", "chunked_topk_kd_forward", "topk_kd_loss"]

_FORWARD_KL = "axolotl.integrations.kd.topk_logprob.forward_kl"


def topk_kd_loss(
    student_logits: Tensor,
    target_token_ids: Tensor,
    target_logprobs: Tensor,
    target_mask: Tensor,
    num_items_in_batch: int = -1,
    kd_temperature: float = 1.0,
) -> Tensor:
    r"""axolotl's top-k forward KL: sum over the real entries of p (log p - log q), divided by
    ``num_items_in_batch`` when it is > 0, else by the number of real (position, k) entries.

    ``student_logits`` (B, T_s, V), of which the first T = ``target_token_ids.shape[1]``
    positions are used; q = softmax(student / ``kd_temperature``) over the full vocabulary;
    the teacher's ``target_token_ids`` / ``target_logprobs`` / ``target_mask`` (B, T, K) (log p
    as given: already at the teacher's temperature, not re-tempered; ``target_mask`` nonzero on
    real entries). ``fk.sparse_divergence(kind="kl", tail="none")``: no (B, T, V) log_softmax
    is formed; float32 result, gradients to the student logits (and to ``target_logprobs`` when
    it requires grad).
    """
    t = target_token_ids.shape[1]
    mask = target_mask.bool()
    denom = num_items_in_batch if num_items_in_batch > 0 else mask.sum()
    return fk.sparse_divergence(
        student_logits[:, :t], target_token_ids, target_logprobs.float(), "kl", tail="none",
        temperature=float(kd_temperature), support_mask=mask, reduction="mean",
        num_items_in_batch=denom)


def chunked_topk_kd_forward(self, student_logits: Tensor, target_token_ids: Tensor,
                            target_logprobs: Tensor, target_mask: Tensor,
                            num_items_in_batch: int = -1) -> Tensor:
    """``ChunkedTopKKDLoss.forward``: the chunk-weighted mean axolotl forms is the whole batch's
    :func:`topk_kd_loss` (at ``self.kd_temperature``), computed in one call."""
    return topk_kd_loss(student_logits, target_token_ids, target_logprobs, target_mask,
                        num_items_in_batch, self.kd_temperature)


def apply_fk_to_axolotl() -> Patch:
    """Point axolotl's top-k KD loss at fdiv_kernels; returns a :class:`Patch` (``undo()``).

    Rebinds ``forward_kl.loss`` wherever a loaded module holds it (the user's ``from ... import
    loss`` included) and ``ChunkedTopKKDLoss.forward``; when ``forward_kl`` is not imported yet
    the swap is made on its first import (axolotl is not imported for it). Idempotent.
    """
    patch = Patch()

    def swap(mod) -> None:
        if mod.loss is not topk_kd_loss:
            _ORIGINALS.setdefault("loss", mod.loss)
        patch.set_everywhere(_ORIGINALS["loss"], topk_kd_loss)
        patch.set(mod.ChunkedTopKKDLoss, "forward", chunked_topk_kd_forward)

    patch.after_import(_FORWARD_KL, swap)
    return patch


def axolotl_topk_kd_loss():
    """axolotl's own ``forward_kl.loss`` (saved before any rebinding)."""
    if "loss" not in _ORIGINALS:
        _ORIGINALS["loss"] = require(_FORWARD_KL, "axolotl").loss
    return _ORIGINALS["loss"]


_ORIGINALS: dict[str, object] = {}
