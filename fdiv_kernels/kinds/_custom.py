"""The registry of user-defined f-divergences (``fk.register_divergence``) and their element terms.

D_f(p || q) = sum_i q_i f(p_i / q_i) for a convex generator f with f(1) = 0. In log space, with
r = p / q = exp(lp - lq), the element terms the kernels need (``fdiv_kernels.kinds._registry``)
follow from f and f' alone::

    term = q f(r),   h = d term / d lq = q (f(r) - r f'(r)),   k = d term / d lp = p f'(r).

The torch backend evaluates them in float64 (the ratio p / q overflows float32 long before
q f(p / q) does). Zero probabilities take their limits: p = 0 < q gives term = q f(0) (so f must
be defined at 0, +inf allowed: write ``torch.xlogy(t, t)``, not ``t * log(t)``), h = q f(0),
k = 0; q = 0 < p gives term = k = p f'(inf) (= p lim f(t)/t; +inf for unbounded f') and h = 0;
p = q = 0 adds nothing.

Each custom kind gets a base id from ``CUSTOM_BASE`` up: the torch backend evaluates it with the
user's torch functions; the C++ kernels cannot (they compile their kinds in), which the dispatch
reports (each backend's record declares which of its ops take custom kinds); the Triton
divergence kernels take it when registered with
``@triton.jit`` versions of f and f' (passed to the kernels as constexprs, element terms in fp32
with the same zero conventions: ``triton_kernels/divergence_terms.custom_terms``); the Triton
sparse-teacher kernels do not.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from fdiv_kernels.kinds._registry import (
    BY_BASE,
    CUSTOM,
    CUSTOM_BASE,
    DIVERGENCES,
    ROW_DIVERGENCES,
    CustomDivergence,
)

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
    # Where the kernels evaluate the generator: ratios r = p / q over many decades (finite values
    # there), f(0) for p = 0 < q and f'(inf) for q = 0 < p (limits, +-inf allowed, never NaN).
    grid = torch.logspace(-6, 6, 25, dtype=torch.float64)
    for arg, fn in (("f", f), ("f_prime", f_prime)):
        vals = fn(grid)
        if not bool(torch.isfinite(vals).all()):
            bad = grid[~torch.isfinite(vals)][0].item()
            raise ValueError(f"register_divergence({name!r}): {arg} must be finite for every "
                             f"ratio t in [1e-6, 1e6]; {arg}({bad:g}) = "
                             f"{fn(torch.tensor([bad], dtype=torch.float64)).item()}")
    edges = (("f", f, 0.0, "p = 0 < q: write t log t as torch.xlogy(t, t)"),
             ("f_prime", f_prime, math.inf, "q = 0 < p: the limit f(t) / t as t -> inf"))
    for arg, fn, at, why in edges:
        v = fn(torch.tensor([at], dtype=torch.float64)).item()
        if math.isnan(v):
            raise ValueError(f"register_divergence({name!r}): {arg}({at}) is NaN; the kernels "
                             f"evaluate it ({why}); give the limit (finite or +-inf)")
    h = 1e-6 * t
    fd = (f(t + h) - f(t - h)) / (2 * h)
    if not torch.allclose(fd, fpt, rtol=1e-5, atol=1e-7):
        raise ValueError(f"register_divergence({name!r}): f_prime is not the derivative of f: "
                         f"at t = {t.tolist()} f_prime gives {fpt.tolist()}, central differences "
                         f"of f give {fd.tolist()}")


def _check_triton_generator(triton_f: object | None, triton_f_prime: object | None) -> None:
    """Both or neither, and both ``@triton.jit`` functions (a JITFunction, or the interpreter's
    InterpretedFunction under TRITON_INTERPRET=1)."""
    if (triton_f is None) != (triton_f_prime is None):
        given, missing = (("triton_f", "triton_f_prime") if triton_f_prime is None
                          else ("triton_f_prime", "triton_f"))
        raise ValueError(f"{given} was given without {missing}: the Triton kernels need both "
                         "(or neither: the kind then runs on the torch backend only)")
    if triton_f is None:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for arg, fn in (("triton_f", triton_f), ("triton_f_prime", triton_f_prime)):
        if not isinstance(fn, (JITFunction, InterpretedFunction)):
            raise TypeError(f"{arg} must be a @triton.jit function, got {type(fn).__name__}")


def register_divergence(
    name: str,
    f: Callable[[Tensor], Tensor],
    f_prime: Callable[[Tensor], Tensor],
    triton_f: object | None = None,
    triton_f_prime: object | None = None,
) -> None:
    r"""Register the f-divergence D_f(p || q) = sum_i q_i f(p_i / q_i) under ``name``.

    Afterwards every op that takes ``kind=`` accepts ``name`` on the torch backend (``auto``
    picks it; the C++ backends report that they cannot run custom kinds; Triton runs it when
    given ``triton_f`` / ``triton_f_prime``). The element terms and
    both gradients follow from f and f' (module docstring of ``fdiv_kernels.kinds._custom``).

    Args:
        name: a new kind name; a built-in kind's name raises ValueError, as does a name already
            registered.
        f: the convex generator, a torch function applied elementwise to a tensor of ratios
            t = p / q >= 0, with f(1) = 0. Checked at registration (ValueError naming the
            generator): f(1) = 0, f and f' finite for t in [1e-6, 1e6], f(0) and f'(inf) not
            NaN (give their limits: ``torch.xlogy(t, t)`` for t log t), f' the derivative of f.
            Convexity is left to the caller: a non-convex f gives a number that is not a
            divergence (it can be negative).
        f_prime: its derivative f'(t), also evaluated at t = +inf for q = 0 < p (the limit
            f(t)/t), and checked against central differences of f.
        triton_f, triton_f_prime: ``@triton.jit`` versions of f and f' for the Triton kernels
            (both or neither, else ValueError): functions of one fp32 block, elementwise (f'
            is also called on a block of +inf). With them ``fk.divergence``,
            ``fused_linear_divergence`` and the phase ops run the kind on the Triton backend
            (the kernels are specialized on the pair; fp32 terms, see
            ``triton_kernels/divergence_terms.custom_terms`` for where they overflow); the
            sparse-teacher ops stay torch-only. Without them the Triton backend reports that
            it cannot run the kind.

    Example: Pearson chi^2, equal to the built-in ``chi2``::

        fk.register_divergence("pearson", lambda t: (t - 1) ** 2, lambda t: 2 * (t - 1))
        fk.divergence(student_logits, teacher_logits, kind="pearson")

    and with the Triton versions (module-level ``@triton.jit`` functions)::

        @triton.jit
        def pearson_f(t):
            return (t - 1.0) * (t - 1.0)

        @triton.jit
        def pearson_fp(t):
            return 2.0 * (t - 1.0)

        fk.register_divergence("pearson", lambda t: (t - 1) ** 2, lambda t: 2 * (t - 1),
                               triton_f=pearson_f, triton_f_prime=pearson_fp)
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a str identifier, got {name!r}")
    if name in DIVERGENCES or name in ROW_DIVERGENCES:
        raise ValueError(f"name {name!r} is a built-in kind; choose another name")
    if name in CUSTOM:
        raise ValueError(f"name {name!r} is already registered")
    for arg, fn in (("f", f), ("f_prime", f_prime)):
        if not callable(fn):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    _check_triton_generator(triton_f, triton_f_prime)
    _check_generator(name, f, f_prime)
    # Never an id used before in this process (BY_BASE keeps unregistered kinds).
    base = CUSTOM_BASE + len(BY_BASE)
    d = CustomDivergence(name, base, f, f_prime, triton_f, triton_f_prime)
    CUSTOM[name] = d
    BY_BASE[base] = d


def unregister_divergence(name: str) -> None:
    """Remove a kind added by ``register_divergence``: new calls no longer accept ``name``.

    A graph already built with the kind keeps computing that kind's gradient (its base id is
    never given to another kind). Raises KeyError naming the registered kinds if ``name`` is not
    one of them.
    """
    if name not in CUSTOM:
        raise KeyError(f"{name!r} is not a registered custom kind (registered: {sorted(CUSTOM)})")
    del CUSTOM[name]


def custom_name(base: int) -> str | None:
    """The registered name of a custom base id, or None if ``base`` is not one."""
    d = BY_BASE.get(base)
    return d.name if d else None


def custom_terms(base: int, lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(term, d term/d lq, d term/d lp) of a registered kind, elementwise (see module doc)."""
    d = BY_BASE.get(base)
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


def triton_generator(base: int) -> tuple[object, object]:
    """(triton_f, triton_f_prime) of a custom kind, for the Triton divergence kernels' F / F_PRIME
    constexprs; ValueError if ``base`` is not a custom kind registered with them."""
    d = BY_BASE.get(base)
    if d is None or d.triton_f is None:
        raise ValueError(f"divergence base id {base} is not a custom kind registered with "
                         "triton_f / triton_f_prime")
    return d.triton_f, d.triton_f_prime


__all__ = ["CUSTOM", "CUSTOM_BASE", "register_divergence", "unregister_divergence"]
