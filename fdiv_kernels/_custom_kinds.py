"""The registry of user-defined f-divergences (``fk.register_divergence``) and their element terms.

D_f(p || q) = sum_i q_i f(p_i / q_i) for a convex generator f with f(1) = 0. In log space, with
r = p / q = exp(lp - lq), the element terms the kernels need (``fdiv_kernels._kinds``) follow from
f and f' alone::

    term = q f(r),   h = d term / d lq = q (f(r) - r f'(r)),   k = d term / d lp = p f'(r).

The torch backend evaluates them in float64 (the ratio p / q overflows float32 long before
q f(p / q) does). Zero probabilities take their limits: p = 0 < q gives term = q f(0) (so f must
be defined at 0, +inf allowed: write ``torch.xlogy(t, t)``, not ``t * log(t)``), h = q f(0),
k = 0; q = 0 < p gives term = k = p f'(inf) (= p lim f(t)/t; +inf for unbounded f') and h = 0;
p = q = 0 adds nothing.

Each custom kind gets a base id from ``CUSTOM_BASE`` up: the torch backend evaluates it with the
user's torch functions; the C++ kernels cannot (they compile their kinds in), which the dispatch
reports (``custom_kind_reasons``); the Triton kernels take it only when registered with Triton
functions -- not yet supported, reported the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# Base ids of custom kinds start here, far above the built-in ones (fdiv_kernels._ids.NUM_BASES);
# no kernel of the C++ or Triton backends takes them.
CUSTOM_BASE = 1024


@dataclass(frozen=True)
class CustomDivergence:
    name: str
    base: int
    f: Callable[[Tensor], Tensor]
    f_prime: Callable[[Tensor], Tensor]
    triton_f: object | None = None
    triton_f_prime: object | None = None

    @property
    def math(self) -> str:
        return f"sum q f(p / q), f = {getattr(self.f, '__name__', 'user generator')}"


CUSTOM: dict[str, CustomDivergence] = {}
_BY_BASE: dict[int, CustomDivergence] = {}


def _check_generator(name: str, f: Callable, f_prime: Callable) -> None:
    """f(1) = 0, f' the derivative of f (central differences), both elementwise on tensors."""
    t = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    try:
        ft, fpt = f(t), f_prime(t)
    except Exception as e:  # noqa: BLE001 - re-raised with the argument named
        raise TypeError(f"register_divergence({name!r}): f and f_prime must take and return "
                        f"float64 tensors elementwise; calling them raised {e!r}") from e
    for arg, out in (("f", ft), ("f_prime", fpt)):
        if not isinstance(out, Tensor) or out.shape != t.shape:
            raise TypeError(f"register_divergence({name!r}): {arg} must return a tensor of its "
                            f"input's shape, got {type(out).__name__} "
                            f"{getattr(out, 'shape', '')}")
    f1 = float(ft[2])
    if not abs(f1) <= 1e-10:
        raise ValueError(f"register_divergence({name!r}): f(1) must be 0 (an f-divergence "
                         f"vanishes at p = q), got f(1) = {f1}")
    h = 1e-6 * t
    fd = (f(t + h) - f(t - h)) / (2 * h)
    if not torch.allclose(fd, fpt, rtol=1e-5, atol=1e-7):
        raise ValueError(f"register_divergence({name!r}): f_prime is not the derivative of f: "
                         f"at t = {t.tolist()} f_prime gives {fpt.tolist()}, central differences "
                         f"of f give {fd.tolist()}")


def register_divergence(
    name: str,
    f: Callable[[Tensor], Tensor],
    f_prime: Callable[[Tensor], Tensor],
    triton_f: object | None = None,
    triton_f_prime: object | None = None,
) -> None:
    r"""Register the f-divergence D_f(p || q) = sum_i q_i f(p_i / q_i) under ``name``.

    Afterwards every op that takes ``kind=`` accepts ``name`` on the torch backend (``auto``
    picks it; the C++ backends report that they cannot run custom kinds). The element terms and
    both gradients follow from f and f' (module docstring of ``fdiv_kernels._custom_kinds``).

    Args:
        name: a new kind name; a built-in kind's name raises ValueError, as does a name already
            registered.
        f: the convex generator, a torch function applied elementwise to a tensor of ratios
            t = p / q >= 0, with f(1) = 0 (checked numerically). It must give its limits at 0
            (finite or +inf, never NaN: use ``torch.xlogy(t, t)`` for t log t).
        f_prime: its derivative f'(t), also evaluated at t = +inf for q = 0 < p (the limit
            f(t)/t), and checked against central differences of f.
        triton_f, triton_f_prime: ``@triton.jit`` versions for the Triton kernels. Not supported
            yet: passing them raises NotImplementedError (the Triton backend then reports that
            it cannot run the kind).

    Example: Pearson chi^2, equal to the built-in ``chi2``::

        fk.register_divergence("pearson", lambda t: (t - 1) ** 2, lambda t: 2 * (t - 1))
        fk.divergence(student_logits, teacher_logits, kind="pearson")
    """
    from fdiv_kernels._kinds import DIVERGENCES, ROW_DIVERGENCES

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a str identifier, got {name!r}")
    if name in DIVERGENCES or name in ROW_DIVERGENCES:
        raise ValueError(f"name {name!r} is a built-in kind; choose another name")
    if name in CUSTOM:
        raise ValueError(f"name {name!r} is already registered")
    for arg, fn in (("f", f), ("f_prime", f_prime)):
        if not callable(fn):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    if triton_f is not None or triton_f_prime is not None:
        raise NotImplementedError(
            "triton_f / triton_f_prime: custom kinds do not run in the Triton kernels yet; "
            "register without them (the torch backend runs the kind on any device)"
        )
    _check_generator(name, f, f_prime)
    base = CUSTOM_BASE + max((d.base - CUSTOM_BASE + 1 for d in CUSTOM.values()), default=0)
    d = CustomDivergence(name, base, f, f_prime, triton_f, triton_f_prime)
    CUSTOM[name] = d
    _BY_BASE[base] = d


def unregister_divergence(name: str) -> None:
    """Remove a kind added by ``register_divergence`` (KeyError if ``name`` is not one)."""
    d = CUSTOM.pop(name)
    del _BY_BASE[d.base]


def custom_name(base: int) -> str | None:
    """The registered name of a custom base id, or None if ``base`` is not one."""
    d = _BY_BASE.get(base)
    return d.name if d else None


def custom_terms(base: int, lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(term, d term/d lq, d term/d lp) of a registered kind, elementwise (see module doc)."""
    d = _BY_BASE.get(base)
    if d is None:
        raise ValueError(f"unknown base divergence id {base} (no custom kind registered under it)")
    # In float64 (at least): r = p / q overflows float32 once lp - lq > 88, where q f(r) is still
    # finite (chi^2: p^2 / q); float32 log-probs never differ by more than ~104, far below
    # float64's 709.
    dtype = lp.dtype
    wide = torch.promote_types(dtype, torch.float64)
    lp, lq = lp.to(wide), lq.to(wide)
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros_like(p)
    p0, q0 = p == 0, q == 0
    # r where both are positive; placeholders elsewhere (their results are replaced below).
    r = torch.exp(torch.where(p0 | q0, zero, lp - lq))
    r = torch.where(p0 & ~q0, zero, r)  # p = 0 < q: r = 0, f(0) is the user's limit
    fr, fpr = d.f(r), d.f_prime(r)
    fp_inf = d.f_prime(torch.full((), math.inf, dtype=p.dtype, device=p.device))
    r_fpr = torch.where(r == 0, zero, r * fpr)  # r f'(r) -> 0 as r -> 0 (t log t: f'(0) = -inf)
    term = torch.where(q0, torch.where(p0, zero, p * fp_inf), q * fr)
    h = torch.where(q0, zero, q * (fr - r_fpr))
    k = torch.where(p0, zero, torch.where(q0, p * fp_inf, p * fpr))
    return term.to(dtype), h.to(dtype), k.to(dtype)


def custom_kind_reasons(backend: str, base: int) -> list[str]:
    """Why ``backend`` cannot run the kind with base id ``base`` (empty: it can)."""
    name = custom_name(base)
    if name is None or backend == "torch":
        return []
    if backend == "triton":
        return [f"kind {name!r} is a custom kind (fk.register_divergence) and the Triton kernels "
                "do not take custom kinds yet"]
    return [f"kind {name!r} is a custom kind (fk.register_divergence): the C++ kernels compile "
            "their kinds in and cannot run it"]


__all__ = ["CUSTOM", "CUSTOM_BASE", "register_divergence", "unregister_divergence"]
