"""A Sinkhorn problem from the public arguments: validation with errors naming the argument, the
weights in the compute dtype, and the frozen configuration the solve and its autograd read."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V


@dataclass(frozen=True)
class Config:
    eps: float
    kind: int
    rho_a: float
    rho_b: float
    max_iter: int
    tol: float
    check_every: int
    scaling: float
    symmetric: bool
    grad: str
    backend: str


def points(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (B, n, d) or (n, d), got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def mass_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a balanced marginal of ``dtype`` may sum: 1e-4 for fp32 / fp64 inputs; for
    bf16 / fp16 the dtype's own rounding (each entry is off by up to half an ulp relative, so a sum
    of entries summing to 1 is off by up to eps / 2; one eps allows for the softmax's own
    rounding). A larger gap is a real mismatch and is rejected."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4
    return max(1e-4, torch.finfo(dtype).eps)


def weights(name: str, w: object, B: int, n: int, unbatched: bool, ctype, device,
            balanced: bool) -> Tensor:
    """Weights (B, n) (uniform for None), checked: finite, non-negative, a positive mass, and
    summing to 1 when ``balanced`` (within ``mass_tolerance``; bf16 / fp16 renormalized)."""
    if w is None:
        return torch.full((B, n), 1.0 / n, dtype=ctype, device=device)
    w2 = per_problem(name, w, B, n, unbatched, device)
    tol = mass_tolerance(w.dtype)
    if not torch.compiler.is_compiling():
        # One host sync buys a clear error.
        if bool((~torch.isfinite(w2)).any()) or bool((w2 < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative")
        sums = w2.detach().to(torch.float64).sum(-1)
        if bool((sums <= 0).any()):
            raise ValueError(f"{name} must have a positive total mass in every problem")
        if balanced and bool(((sums - 1).abs() > tol).any()):
            bad = float(sums[((sums - 1).abs() > tol)][0])
            raise ValueError(
                f"{name} must sum to 1 in every problem for balanced OT (reach=None), got a sum "
                f"of {bad:.6g}; normalize it or pass reach for unbalanced OT"
            )
    if balanced and w.dtype in (torch.float16, torch.bfloat16):
        # Accepted within the dtype's rounding of 1: renormalized in fp32 so the solve sees an
        # exact marginal (the balanced fixed point needs sum a = sum b).
        w2 = w2.to(ctype)
        w2 = w2 / w2.sum(-1, keepdim=True)
    return w2


def reach_pair(reach: object) -> tuple[float, float]:
    """reach -> (rho_a, rho_b), 0 meaning a hard (balanced) marginal."""
    if reach is None:
        return 0.0, 0.0
    if isinstance(reach, (tuple, list)):
        if len(reach) != 2:
            raise ValueError(f"reach must be a number or a pair, got {len(reach)} values")
        return tuple(0.0 if r is None else V.check_real("reach", r, positive=True)
                     for r in reach)  # type: ignore[return-value]
    r = V.check_real("reach", reach, positive=True)
    return r, r


def integer(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def per_problem(name: str, t: object, B: int, n: int, unbatched: bool, device) -> Tensor:
    """A float vector per problem, (n,) unbatched or (B, n), on ``device``: as (B, n)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    want = (n,) if unbatched else (B, n)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t.reshape(B, n)


def potential(name: str, t: object, B: int, n: int, unbatched: bool, device) -> Tensor:
    return per_problem(name, t, B, n, unbatched, device).detach()


def log_weights(w: Tensor) -> Tensor:
    return torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, float("-inf")))
