"""verl's top-k distillation (``verl.trainer.distillation``): the student's log-probs at the
teacher's top-k ids from ``fk.token_logprobs`` instead of a (B, T, V) ``log_softmax``.

``forward_kl_topk`` is ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk`` (FSDP,
FSDP2 and VeOmni strategies; same arguments, same five per-token outputs); ``apply_fk_to_verl()``
rebinds it. Checked against verl 0.9.1 (``tests/test_integrations_verl.py``, skipped where verl
is not installed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import fdiv_kernels as fk
from fdiv_kernels.integrations._patching import Patch, require

__all__ = ["apply_fk_to_verl", "forward_kl_topk"]

_FSDP_LOSSES = "verl.trainer.distillation.fsdp.losses"


def forward_kl_topk(
    student_logits: Tensor,
    teacher_topk_log_probs: Tensor,
    teacher_topk_ids: Tensor,
    config: Any,
    data_format: str,
) -> dict[str, Tensor]:
    r"""verl's ``compute_forward_kl_topk`` (FSDP): per token, sum_k p_k (log p_k - log q_k) over
    the teacher's top-k ids (no renormalization, no tail), both log-probs clamped below at
    ``config.distillation_loss.log_prob_min_clamp`` when it is set, as verl does.

    ``student_logits`` (1, N, V) (packed sequences; N / sp_size under Ulysses sequence
    parallelism); the teacher's ``teacher_topk_log_probs`` / ``teacher_topk_ids``, nested
    (jagged) tensors of (T_i, K) per sequence, as verl passes them. log q_k comes from
    ``fk.token_logprobs`` (one pass over the logits, fp32, no (N, V) log_softmax for either
    verl path); the rest is verl's own arithmetic on (N, K) tensors. Returns verl's dict:
    ``distillation_losses``, ``student_mass``, ``teacher_mass``, ``overlap_count``,
    ``overlap_token_advantage``, each (1, N). ``data_format`` is accepted, as in verl (unused).
    """
    host = require(_FSDP_LOSSES, "verl")
    t_lp = teacher_topk_log_probs.values().unsqueeze(0)
    t_ids = teacher_topk_ids.values().unsqueeze(0)
    if host.get_ulysses_sequence_parallel_world_size() > 1:
        t_lp = host.slice_input_tensor(t_lp, dim=1)
        t_ids = host.slice_input_tensor(t_ids, dim=1)
    if not t_lp.shape[:2] == t_ids.shape[:2] == student_logits.shape[:2]:
        raise ValueError(f"the teacher's top-k {tuple(t_ids.shape)} and the student's logits "
                         f"{tuple(student_logits.shape)} must have the same leading shape")
    loss_config = config.distillation_loss
    s_lp = fk.token_logprobs(student_logits, t_ids).float()
    with torch.no_grad():
        s_ids = torch.topk(student_logits, k=t_ids.shape[-1], dim=-1).indices
        student_mass = s_lp.exp().sum(dim=-1)
        teacher_mass = t_lp.exp().sum(dim=-1)
    clamp = loss_config.log_prob_min_clamp
    t_lp = t_lp.float()
    if clamp is not None:
        s_lp, t_lp = s_lp.clamp_min(clamp), t_lp.clamp_min(clamp)
    token_kl = t_lp.exp() * (t_lp - s_lp)
    losses = token_kl.sum(dim=-1)
    with torch.no_grad():
        overlap = (t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(dim=-1)
        count = overlap.sum(dim=-1)
        adv = (-token_kl * overlap).sum(dim=-1) / count.clamp_min(1)
        adv = torch.where(count > 0, adv, torch.zeros_like(adv))
    return {"distillation_losses": losses, "student_mass": student_mass,
            "teacher_mass": teacher_mass, "overlap_count": count,
            "overlap_token_advantage": adv}


def apply_fk_to_verl() -> Patch:
    """Point verl's FSDP top-k distillation loss at fdiv_kernels; returns a :class:`Patch`
    (``undo()`` restores it). ``compute_topk_loss`` imports the loss module and reads the
    function from it at each call, so the module attribute (and every other loaded module's
    binding) is rebound; when the module is not imported yet the swap is made on its first
    import (verl is not imported for it). Idempotent."""
    patch = Patch()

    def swap(mod) -> None:
        if mod.compute_forward_kl_topk is not forward_kl_topk:
            _ORIGINALS.setdefault("forward_kl_topk", mod.compute_forward_kl_topk)
        patch.set_everywhere(_ORIGINALS["forward_kl_topk"], forward_kl_topk)

    patch.after_import(_FSDP_LOSSES, swap)
    return patch


_ORIGINALS: dict[str, Any] = {}
