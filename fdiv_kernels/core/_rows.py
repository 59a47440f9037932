"""Row steps under an element budget, for the row loops whose (rows, width) temporaries are the
only memory beyond their outputs: the torch spec, the unfused vocab-parallel sparse op,
Sinkhorn's cost rows, the row-scaled gradient."""

from __future__ import annotations

from collections.abc import Iterator


def row_chunks(n: int, per_row: int, budget: int) -> Iterator[slice]:
    """Slices of ``range(n)`` holding at most ``budget // per_row`` rows each (at least one)."""
    rows = max(1, budget // max(per_row, 1))
    for lo in range(0, n, rows):
        yield slice(lo, min(n, lo + rows))
