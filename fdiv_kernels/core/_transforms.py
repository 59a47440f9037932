"""The per-model logit transforms the kernels fuse in, checked once for every public op.

z <- z * scale; then, with a softcap c, z <- c tanh(z / c); the temperature divides z after both
(TRL's order for Gemma-2/3 and Cohere heads). The gradient follows by the chain rule inside the
kernels: dz/dx = scale (1 - (z / c)^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V


def check_logit_transform(scale_name: str, scale: object, softcap_name: str,
                          softcap: object) -> tuple[float, float]:
    """(scale, softcap) as the ops take them: softcap 0.0 for None.

    The scale must be finite and positive: a negative one would reverse the ranking of the
    logits and turn -inf (masked) entries into +inf. A softcap must be None or finite and
    positive (``softcap=0`` is refused rather than read as "none": pass None).
    """
    s = V.check_real(scale_name, scale, positive=True)
    if softcap is None:
        return s, 0.0
    return s, V.check_real(softcap_name, softcap, positive=True)


def transform_logits(x: Tensor, scale: float, softcap: float) -> tuple[Tensor, Tensor | float]:
    """(z, dz/dx) for z = c tanh(x scale / c) (softcap c > 0) or z = x scale (c = 0).

    The spec of the transform every backend fuses in; the derivative is scale (1 - (z/c)^2),
    0 where the cap saturates (a -inf logit becomes the finite -c there, with zero gradient).
    """
    if softcap == 0.0:
        return (x * scale if scale != 1.0 else x), scale
    th = torch.tanh(x * (scale / softcap))
    return th * softcap, scale * (1.0 - th * th)


def check_pair_transforms(student_scale: object, student_softcap: object, teacher_scale: object,
                          teacher_softcap: object) -> tuple[float, float, float, float]:
    """(student_scale, student_softcap, teacher_scale, teacher_softcap) as the ops take them."""
    return (
        *check_logit_transform("student_logit_scale", student_scale, "student_softcap",
                               student_softcap),
        *check_logit_transform("teacher_logit_scale", teacher_scale, "teacher_softcap",
                               teacher_softcap),
    )


__all__ = ["check_logit_transform", "check_pair_transforms", "transform_logits"]
