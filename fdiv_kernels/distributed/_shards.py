"""What the vocabulary-parallel ops share: shard checks, the backend pick, DTensor unwrapping."""

from __future__ import annotations

import math
import numbers
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._dispatch import select
from fdiv_kernels.distributed import _comm


def check_shard(name: str, x: object) -> Tensor:
    """Logits of one vocabulary shard, (..., V_local); V_local may be 0 (an empty shard)."""
    V.check_float_rows(name, x)
    if math.prod(x.shape[:-1]) == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    return x


def rows(x: Tensor) -> Tensor:
    """(N, V_local) contiguous rows; reshape(-1, 0) is ambiguous, so N comes from the shape."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def check_vocab_start(vocab_start: object) -> int | None:
    if vocab_start is None:
        return None
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int or None, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return int(vocab_start)


def resolve_width(name: str, width: int, vocab_start: int | None, vocab_size: object,
                  world: int) -> tuple[int, int]:
    """(vocab_start, the number of this shard's columns below ``vocab_size``)."""
    if world > 1 and vocab_start is None:
        raise ValueError("vocab_start is required with more than one rank: the first global "
                         f"vocabulary id of this rank's {name}")
    start = vocab_start or 0
    if vocab_size is None:
        return start, width
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    return start, max(0, min(width, vocab_size - start))


def pick_backend(requested: str, x: Tensor, ops: tuple[str, ...]) -> str:
    """One backend that has every op in ``ops`` (auto skips those lacking a phase op)."""
    probe = x.new_empty(1)  # select looks at device and dtype only; the shard may be empty
    name = select(requested, probe, ops[0])
    for op in ops[1:]:
        select(name, probe, op)
    return name


@dataclass(frozen=True)
class DTensorShard:
    """Where a DTensor sharded on its last dim lives: its mesh, the mesh dim, the group, offset."""

    mesh: object
    mesh_dim: int
    group: dist.ProcessGroup
    vocab_start: int


def is_dtensor(x: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def unwrap(name: str, x: Tensor) -> tuple[Tensor, DTensorShard]:
    """The local shard of a DTensor placed Shard(-1) on one mesh dim and Replicate on the rest."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = x.device_mesh, x.placements
    last = x.dim() - 1
    vocab_dims = [i for i, p in enumerate(placements)
                  if isinstance(p, Shard) and p.dim in (-1, last)]
    others = [p for i, p in enumerate(placements) if i not in vocab_dims]
    if len(vocab_dims) != 1 or not all(isinstance(p, Replicate) for p in others):
        raise ValueError(
            f"{name} must be a DTensor sharded on its last dim over one mesh dim (Shard(-1)) and "
            f"replicated on the others, got placements {tuple(placements)}"
        )
    mesh_dim = vocab_dims[0]
    _, offset = compute_local_shape_and_global_offset(x.shape, mesh, placements)
    return x.to_local(), DTensorShard(mesh, mesh_dim, mesh.get_group(mesh_dim), int(offset[-1]))


def unwrap_pair(student: object, teacher: object):
    """Unwrap DTensor inputs (both or neither); returns (student, teacher, DTensorShard | None)."""
    if not (is_dtensor(student) or is_dtensor(teacher)):
        return student, teacher, None
    if not (is_dtensor(student) and is_dtensor(teacher)):
        raise TypeError("student_shard and teacher_shard must both be DTensors or both tensors")
    s, info = unwrap("student_shard", student)
    t, info_t = unwrap("teacher_shard", teacher)
    if (info_t.mesh != info.mesh or info_t.mesh_dim != info.mesh_dim
            or info_t.vocab_start != info.vocab_start or t.shape != s.shape):
        raise ValueError("student_shard and teacher_shard must be DTensors with one placement "
                         "and one vocabulary partition")
    return s, t, info


def rewrap(out: Tensor, info: DTensorShard | None):
    """A result replicated over the ranks, as a DTensor when the inputs were DTensors."""
    if info is None:
        return out
    from torch.distributed.tensor import DTensor, Replicate

    placements = [Replicate()] * info.mesh.ndim
    return DTensor.from_local(out, info.mesh, placements, run_check=False)


def resolve_group(group, info: DTensorShard | None, vocab_start):
    """The process group and vocab offset: from the DTensor when given, else the arguments."""
    if info is None:
        return group, check_vocab_start(vocab_start)
    if group is not None and group is not info.group:
        raise ValueError("group= must be None (or the DTensor's group) for DTensor inputs")
    if vocab_start is not None and vocab_start != info.vocab_start:
        raise ValueError(f"vocab_start={vocab_start} disagrees with the DTensor's offset "
                         f"{info.vocab_start}")
    return info.group, info.vocab_start


def gather_rows(pieces: Tensor, group, world: int, layout: tuple[int, ...] | None) -> Tensor:
    """``all_gather`` of a (P, N) tensor of per-row numbers -> (world, P, N). With ``layout``
    (this rank's vocab_start, width) the ranks' layouts ride in the same collective (two more
    numbers per piece) and are checked to tile the vocabulary exactly once, on every rank; a
    third number, the ``vocab_size`` the shards were cut to, is checked against their total."""
    g, total = gather_rows_vocab(pieces, group, world, None if layout is None else layout[:2])
    if layout is not None and len(layout) > 2 and layout[2] is not None and total != layout[2]:
        raise ValueError(f"vocab_size={layout[2]} is more than the {total} columns the shards "
                         "hold")
    return g


def gather_rows_vocab(pieces: Tensor, group, world: int, layout: tuple[int, int] | None
                      ) -> tuple[Tensor, int | None]:
    """:func:`gather_rows`, also returning the vocabulary the checked layouts tile (None
    without ``layout``)."""
    if layout is None:
        return _comm.all_gather(pieces, group, world), None
    extra = pieces.new_tensor([float(layout[0]), float(layout[1])]).expand(pieces.shape[0], 2)
    g = _comm.all_gather(torch.cat([pieces, extra], 1), group, world)
    ranks = [(int(s), int(w)) for s, w in g[:, 0, -2:].tolist()]
    check_layout(ranks)
    return g[..., :-2], sum(w for _, w in ranks)


def check_layout(layout: list[tuple[int, int]]) -> None:
    """Each rank's [vocab_start, vocab_start + width) must cover [0, V) exactly once (empty
    shards anywhere); else a ValueError naming every rank's range, raised alike on every rank."""
    expected = 0
    for start, width in sorted((s, w) for s, w in layout if w > 0):
        if start != expected:
            ranges = ", ".join(f"rank {r}: [{s}, {s + w})" for r, (s, w) in enumerate(layout))
            what = "overlap" if start < expected else "gap"
            raise ValueError(f"the vocabulary shards do not tile [0, V) exactly once ({what} at "
                             f"id {min(start, expected)}): {ranges}; check each rank's "
                             "vocab_start")
        expected = start + width


def agree_chunk(plan, chunk_size: object, group, world: int):
    """The fused TP forms' row plan with one chunk for every rank. Their collectives pair up only
    if every rank runs the same chunks, but the budget's chunk follows this rank's shard width
    (uneven or empty shards differ): without a ``chunk_size``, the smallest over the ranks (one
    all_gather of one number; none with one rank or a given ``chunk_size``)."""
    if world == 1 or chunk_size is not None:
        return plan
    mine = torch.tensor([plan.chunk], dtype=torch.int64, device=plan.weights.device)
    chunk = int(_comm.all_gather(mine, group, world).min())
    return dataclasses.replace(plan, chunk=chunk)
