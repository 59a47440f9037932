"""The divergence registry: every kind the library knows, in one table.

Each kind reduces to a *base* kernel id plus a ``swap`` flag and one scalar parameter. A kernel only
needs the per-element terms of its base kind, written in log space (lp = log p, lq = log q):

    term(lp, lq)   the element's contribution, D = sum_i term_i
    h = d term / d lq,   k = d term / d lp

because, with q = softmax(a) and p = softmax(b),

    dD/da_j = h_j - q_j * sum_i h_i,      dD/db_j = k_j - p_j * sum_i k_i.

``swap`` evaluates the base kind with (p, q) exchanged and exchanges (h, k) back, which turns KL
into reverse KL and skew KL into skew reverse KL for free.

Adding a divergence: one ``Divergence`` entry here and one element function per kernel language
(``_terms`` below for the torch backend, ``triton_kernels/divergence_terms.py``,
``csrc/cpu/divergence_terms.h``). Kernels, dispatch, autograd and tests need no edit.

Two more tables sit beside ``DIVERGENCES``:

* ``ROW_DIVERGENCES``: kinds that are not sums of element terms but functions of a few per-row
  sums (Renyi, Cauchy-Schwarz), computed by ``fk.divergence`` alone
  (``fdiv_kernels.divergences._row_kinds``);
  every other op rejects them with a ValueError from ``resolve``.
* custom kinds from ``fk.register_divergence`` (``fdiv_kernels.kinds._custom``): element-term
  kinds whose terms come from a user's f-divergence generator, with base ids from
  ``CUSTOM_BASE`` up, run by the torch backend (the C++ kernels cannot; see the dispatch reasons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

# Base kernel ids, stated once in _ids (shared with the Triton kernels and csrc/common/ids.h).
from fdiv_kernels.core._ids import ALPHA, CHI2, HELLINGER, JEFFREYS, JS, KL, SKEW_KL, SOFT_CE, TV


# Base ids of custom kinds start here, far above the built-in ones
# (fdiv_kernels.core._ids.NUM_BASES);
# no C++ kernel takes them; the Triton divergence kernels do given the kind's Triton generator.
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


# name -> kind, for the kinds registered now.
CUSTOM: dict[str, CustomDivergence] = {}
# base id -> kind, for every kind ever registered in this process: ids are never reused and an
# unregistered kind keeps its entry, so a graph built with it (a fused form's backward recomputes
# its chunks from the base id) still computes that kind's gradient.
BY_BASE: dict[int, CustomDivergence] = {}


@dataclass(frozen=True)
class Divergence:
    name: str
    base: int
    swap: bool = False
    param: str | None = None  # name of the scalar parameter the user passes
    default: float = 0.0
    # Returns an error message for a bad parameter value, else None.
    check: Callable[[float], str | None] = lambda v: None
    # Maps a parameter value at which the kind degenerates to another (beta=0 -> kl) to that kind.
    degenerate: Callable[[float], str | None] = lambda v: None
    math: str = ""
    # False for kinds whose value at p = q is not 0 (soft_ce: H(p)); tests exempt them there.
    zero_at_equal: bool = True


def _unit_closed(name: str) -> Callable[[float], str | None]:
    return lambda v: None if 0.0 <= v <= 1.0 else f"{name} must be in [0, 1], got {v}"


def _unit_half_open(name: str) -> Callable[[float], str | None]:
    return lambda v: None if 0.0 <= v < 1.0 else f"{name} must be in [0, 1), got {v}"


def _finite(name: str) -> Callable[[float], str | None]:
    return lambda v: None if math.isfinite(v) else f"{name} must be a finite real, got {v}"


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in [
        Divergence("kl", KL, math="KL(p||q) = sum p (log p - log q)"),
        Divergence("reverse_kl", KL, swap=True, math="KL(q||p)"),
        Divergence(
            "js", JS, param="beta", default=0.5, check=_unit_closed("beta"),
            degenerate=lambda b: "kl" if b == 0.0 else "reverse_kl" if b == 1.0 else None,
            math="beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q",
        ),
        Divergence("tv", TV, math="0.5 sum |p - q|"),
        Divergence("hellinger", HELLINGER, math="0.5 sum (sqrt p - sqrt q)^2"),
        Divergence("chi2", CHI2, math="sum (p - q)^2 / q"),
        Divergence(
            "alpha", ALPHA, param="alpha", default=0.5, check=_finite("alpha"),
            degenerate=lambda a: "kl" if a == 1.0 else "reverse_kl" if a == 0.0 else None,
            math="(1 - sum p^alpha q^(1-alpha)) / (alpha (1 - alpha)); accurate as alpha -> 0, 1",
        ),
        Divergence(
            "skew_kl", SKEW_KL, param="lam", default=0.1, check=_unit_half_open("lam"),
            degenerate=lambda v: "kl" if v == 0.0 else None,
            math="KL(p || lam p + (1-lam) q)",
        ),
        Divergence(
            "skew_reverse_kl", SKEW_KL, swap=True, param="lam", default=0.1,
            check=_unit_half_open("lam"),
            degenerate=lambda v: "reverse_kl" if v == 0.0 else None,
            math="KL(q || lam q + (1-lam) p)",
        ),
        Divergence("jeffreys", JEFFREYS, math="KL(p||q) + KL(q||p)"),
        # Not a divergence: its value at p = q is H(p), not 0 (zero_at_equal=False).
        Divergence("soft_ce", SOFT_CE, math="-sum p log q = KL(p||q) + H(p)",
                   zero_at_equal=False),
    ]
}

# No element-term kernel: the base of a row kind without one (cauchy_schwarz). Every kernel
# rejects it (C++: "kind must be a base divergence id"; torch: "unknown base").
NO_BASE = -1


def _positive_finite(name: str) -> Callable[[float], str | None]:
    # Renyi's order: alpha <= 0 is excluded. Renyi's alpha -> 0 limit is -log q(supp p), not a
    # smooth divergence, and negative orders are not divergences.
    return lambda v: (None if math.isfinite(v) and v > 0.0
                      else f"{name} must be a finite real > 0 for kind='renyi', got {v}")


# Kinds that are functions of a few per-row sums, not sums of element terms; fk.divergence only
# (fdiv_kernels.divergences._row_kinds). ``base`` is the element kernel they are computed from,
# if any.
ROW_DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in [
        Divergence(
            "renyi", ALPHA, param="alpha", default=0.5, check=_positive_finite("alpha"),
            degenerate=lambda a: "kl" if a == 1.0 else None,
            math="log(sum p^alpha q^(1-alpha)) / (alpha - 1), alpha > 0; alpha=1 is KL(p||q)",
        ),
        Divergence(
            "cauchy_schwarz", NO_BASE,
            math="-log sum p q + 1/2 log sum p^2 + 1/2 log sum q^2",
        ),
    ]
}


def lookup(kind: str) -> Divergence | None:
    """The registry entry of ``kind`` (built-in, row kind or registered custom kind), or None."""
    d = DIVERGENCES.get(kind) or ROW_DIVERGENCES.get(kind)
    if d is None and kind in CUSTOM:
        d = Divergence(kind, CUSTOM[kind].base, math=CUSTOM[kind].math)
    return d


def all_kinds() -> list[str]:
    """Every kind name ``fk.divergence`` takes now (custom kinds included)."""
    return [*DIVERGENCES, *ROW_DIVERGENCES, *CUSTOM]


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel receives: the base id, the swap flag, the scalar parameter."""

    kind: str
    base: int
    swap: bool
    param: float


def resolve(kind: str, beta: float | None, alpha: float | None, lam: float | None,
            *, row_kinds: bool = False) -> KernelSpec:
    """Validate the kind and its parameter; fold degenerate parameters into their limit kind.

    ``row_kinds``: the caller computes the kinds of ``ROW_DIVERGENCES`` (only ``fk.divergence``
    does); elsewhere they raise ValueError, never run as their base kind.
    """
    d = lookup(kind) if isinstance(kind, str) else None
    if d is None:
        raise ValueError(f"kind must be one of {sorted(all_kinds())}, got {kind!r}")
    if kind in ROW_DIVERGENCES and not row_kinds:
        raise ValueError(
            f"kind={kind!r} is a function of per-row sums, not a sum of element terms: only "
            f"fk.divergence computes it (this op takes {sorted(DIVERGENCES)} and registered "
            "custom kinds)"
        )
    given = {"beta": beta, "alpha": alpha, "lam": lam}
    for name, value in given.items():
        if value is not None and name != d.param:
            raise ValueError(f"{name}= does not apply to kind={kind!r}")
    value = given[d.param] if d.param else None
    param = d.default if value is None else value
    if d.param is not None:
        if isinstance(param, bool) or not isinstance(param, (int, float)):
            raise TypeError(f"{d.param} must be a real number, got {type(param).__name__}")
        param = float(param)
        err = d.check(param)
        if err:
            raise ValueError(err)
        limit = d.degenerate(param)
        if limit is not None:
            d = lookup(limit)
            param = 0.0
    return KernelSpec(d.name, d.base, d.swap, param)
