"""The only place the vocabulary-parallel ops talk to other ranks.

Every collective goes through :func:`all_gather` or :func:`all_reduce_sum`, so one counting layer
(:func:`count_collectives`) sees each call and its payload: the tests assert that a forward sends
O(N) floats and a backward sends nothing. In eager mode they are the plain ``torch.distributed``
collectives; while ``torch.compile`` traces (or with ``FUNCTIONAL = True``) they are the functional
collectives of ``torch.distributed._functional_collectives``, which dynamo keeps in the graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

# Use the functional collectives in eager mode too (tests flip it to run that path on gloo).
FUNCTIONAL = False


@dataclass(frozen=True)
class Collective:
    """One collective as issued by this rank: its kind, the shape and bytes this rank sends.

    Args:
        op: the collective's name, e.g. "all_gather" or "all_reduce".
        shape: the shape of the tensor this rank sends.
        nbytes: the bytes this rank sends (numel times element size).
    """

    op: str
    shape: tuple[int, ...]
    nbytes: int


_logs: list[list[Collective]] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[list[Collective]]:
    """Record every collective the ops issue inside the block (nested blocks each see them)."""
    log: list[Collective] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def _record(op: str, x: Tensor) -> None:
    entry = Collective(op, tuple(x.shape), x.numel() * x.element_size())
    for log in _logs:
        log.append(entry)


def world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 1, 0
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


def _functional() -> bool:
    return FUNCTIONAL or torch.compiler.is_compiling()


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def all_gather(x: Tensor, group: dist.ProcessGroup | None, world_size: int) -> Tensor:
    """Stack every rank's ``x`` (same shape on all ranks) into (world_size, *x.shape)."""
    x = x.contiguous()
    _record("all_gather", x)
    if _functional():
        from torch.distributed import _functional_collectives as fc

        out = fc.all_gather_tensor(x.unsqueeze(0), 0, _group(group))
        return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out
    # The list form: gloo has no all_gather_into_tensor on every build.
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum of ``x`` over the ranks, as a new tensor (``x`` is left as it was)."""
    x = x.contiguous()
    _record("all_reduce", x)
    if _functional():
        from torch.distributed import _functional_collectives as fc

        out = fc.all_reduce(x, "sum", _group(group))
        return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
