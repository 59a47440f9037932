"""Sequence-level preference losses built from token log-probabilities (``fk.token_logprobs``).

``fdpo_loss`` is DPO under an f-divergence constraint ("Beyond Reverse KL: Generalizing Direct
Preference Optimization with Diverse Divergence Constraints", Wang et al., ICLR 2024) with TRL's
conventions (``trl/trainer/dpo_trainer.py``, ``DPOConfig.f_divergence_type``, TRL 1.16).

Its ``alpha`` is TRL's coefficient (``DPOConfig.f_alpha_divergence_coef``), with score
f'(t) = (t^(alpha-1) - 1) / (alpha - 1) and alpha = 1 giving DPO. The f-DPO paper writes the same
family as f'(u) = (1 - u^(-a)) / a with a = 0 giving DPO: the two agree for
``alpha = 1 - a`` (so only at 0.5 does the number mean the same in both). It is an
alpha-divergence between sequence distributions, not ``fk.divergence(kind="alpha")`` over the
vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fdpo_loss"]

# TRL's names accepted too, so a DPOConfig's f_divergence_type can be passed through.
_DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js",
                "js_divergence": "js", "alpha": "alpha", "alpha_divergence": "alpha"}
# TRL clamps the alpha exponent so exp() stays finite once cast back: fp16 overflows past e^11.
_ALPHA_CLAMP = {torch.float16: 11.0}


def _scores(logratios: Tensor, divergence: str, alpha: float) -> Tensor:
    """f'(pi/pi_ref) as a function of the log-ratio, as TRL writes it (constants cancel)."""
    if divergence == "reverse_kl" or (divergence == "alpha" and abs(alpha - 1.0) < 1e-6):
        return logratios                                   # f'(t) = log t (+1)
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratios)                   # f'(t) = 1 - 1/t
    if divergence == "js":
        return math.log(2) + F.logsigmoid(logratios)       # f'(t) = log(2t / (1 + t))
    # alpha: f'(t) = (t^(alpha-1) - 1) / (alpha - 1), exponent clamped as TRL does.
    x = (alpha - 1.0) * logratios
    clamp = _ALPHA_CLAMP.get(x.dtype, 80.0)
    return (torch.exp(torch.clamp(x.float(), max=clamp)) - 1.0).to(x.dtype) / (alpha - 1.0)


def fdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.1,
    alpha: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    r"""f-DPO: -log sigmoid(beta (f'(r_c) - f'(r_r))) with r = pi(y|x) / pi_ref(y|x) per sequence.

    Inputs are summed token log-probabilities per sequence, shape (B,). With Delta = log r:

    ==============  ==================================  ====================================
    ``divergence``  score f'(r)                         note
    ==============  ==================================  ====================================
    ``reverse_kl``  Delta                               standard DPO
    ``forward_kl``  1 - exp(-Delta)
    ``js``          log 2 + log sigmoid(Delta)
    ``alpha``       (exp((alpha-1) Delta) - 1)/(alpha-1)  exponent clamped at 80 (11 in fp16);
                                                          |alpha - 1| < 1e-6 is reverse_kl
    ==============  ==================================  ====================================

    ``alpha`` is TRL's coefficient; the paper's a is ``1 - alpha`` (module docstring).

    TRL's names ``js_divergence`` / ``alpha_divergence`` are accepted. ``reduction``: "mean" (TRL),
    "sum" or "none" (per pair, (B,)).

    Args:
        policy_chosen_logps, policy_rejected_logps: log pi(y|x) of the chosen and rejected
            completions under the policy, (B,) floating point (gradients flow to them).
        ref_chosen_logps, ref_rejected_logps: the same under the frozen reference model.
        divergence: "reverse_kl" (DPO), "forward_kl", "js" or "alpha" (or TRL's names).
        beta: the DPO temperature beta > 0.
        alpha: TRL's alpha-divergence coefficient (used by "alpha" only); 1 minus the alpha of
            the paper's f'(u) = (1 - u^-alpha) / alpha.
        reduction: "mean", "sum" or "none".
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, x in (("policy_chosen_logps", policy_chosen_logps),
                    ("policy_rejected_logps", policy_rejected_logps),
                    ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor")
    div = _DIVERGENCES[divergence]
    alpha = float(alpha)
    delta = (_scores(policy_chosen_logps - ref_chosen_logps, div, alpha)
             - _scores(policy_rejected_logps - ref_rejected_logps, div, alpha))
    losses = -F.logsigmoid(beta * delta)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
