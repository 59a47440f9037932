"""Benchmark cases: one op at one shape, the providers that compute it, its compulsory bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fdiv_kernels.core._dispatch import BACKENDS, BackendUnavailableError, select

# The torch backend is the readable spec, not a contender: benchmarked only when asked for.
DEFAULT_BACKENDS = tuple(b for b in BACKENDS if b != "torch")


def our_backends(op: str, probe: torch.Tensor, wanted=None) -> list[str]:
    """The backends among ``wanted`` (default: all but torch) that can run ``op`` on ``probe``."""
    names = []
    for b in wanted or DEFAULT_BACKENDS:
        try:
            select(b, probe, op)
        except BackendUnavailableError:
            continue
        names.append(b)
    return names


# A provider's setup builds fresh inputs and returns the closure that is timed.
Setup = Callable[[], Callable[[], object]]


def backward_step(loss: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                  leaves: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """The timed closure of a forward + backward case: ``loss(*inputs).backward()``, then the
    ``leaves``' gradients dropped (they require grad from here on)."""
    for x in leaves:
        x.requires_grad_(True)

    def run() -> None:
        loss(*inputs).backward()
        for x in leaves:
            x.grad = None
    return run


@dataclass
class Case:
    op: str                      # e.g. "divergence:js"
    mode: str                    # "fwd" or "full" (forward + backward)
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    compulsory_bytes: int        # the bytes any implementation must move (see each op's comment)
    providers: dict[str, Setup] = field(default_factory=dict)
    ours: tuple[str, ...] = ()   # provider names that are this library's
    # Optional per-provider measurements beyond time and memory (e.g. gradient error).
    extra: dict[str, Callable[[], dict]] = field(default_factory=dict)


@dataclass
class Row:
    op: str
    mode: str
    backend: str
    shape: list[int]
    dtype: str
    ms: float | None
    gbps: float | None
    bandwidth_fraction: float | None
    peak_mem_bytes: int | None
    ratios: dict[str, float] = field(default_factory=dict)  # peer ms / this ms (> 1: faster)
    extra: dict[str, float] = field(default_factory=dict)
    error: str | None = None
