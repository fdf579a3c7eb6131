"""Which storage unit holds a row: rows of a partition are striped across the units.

``unit = (crc32(partition_id) + row) % num_units`` -- stable across processes and runs (no
salted ``hash()``), consecutive rows land on consecutive units, and the partition offset keeps
small partitions from all starting on unit 0.

The client splits a batch with :func:`split_rows`, slices each column for a unit with
:func:`take`, and puts the units' answers back in batch order with :func:`assemble` --
vectorised (no Python loop over rows for dense and jagged columns) from ``SMALL`` rows on;
shorter batches take plain-Python paths (a torch call costs 5-10 us, a row a few ns).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from transferqueue.errors import ConfigError, SchemaError
from transferqueue.storage._arena import gather_jagged, is_range, offsets_of, word_rows
from transferqueue.storage._field import MAX_ROW, as_rows

#: batches of fewer rows take plain-Python paths: a torch op costs 5-10 us, a row a few ns
SMALL = 256
#: dtypes ``index_select`` handles natively (others go through a view as integer words)
_INDEXABLE = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
}  # fmt: skip

__all__ = ["assemble", "partition_offset", "split_rows", "take", "unit_for_row", "units_for_rows"]


def partition_offset(partition_id: str) -> int:
    """Stable offset of a partition's stripe (crc32 of its UTF-8 name)."""
    return zlib.crc32(partition_id.encode("utf-8"))


def _check_units(num_units: int) -> None:
    if not isinstance(num_units, int) or num_units < 1:
        raise ConfigError(f"num_units must be an int >= 1, got {num_units!r}")


def unit_for_row(partition_id: str, row: int, num_units: int) -> int:
    """The unit that holds ``row`` of ``partition_id``."""
    _check_units(num_units)
    if row < 0:
        raise SchemaError(f"row ids are >= 0, got {row}")
    return (partition_offset(partition_id) + row) % num_units


def units_for_rows(partition_id: str, rows: Any, num_units: int) -> torch.Tensor:
    """``unit_for_row`` of every row, as an int64 tensor (vectorised)."""
    _check_units(num_units)
    t = as_rows(rows, unique=False)
    return (t + partition_offset(partition_id) % num_units) % num_units


def split_rows(
    partition_id: str, rows: Any, num_units: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Group a batch of rows by unit: ``{unit: (positions, rows)}``.

    ``positions`` are the indices into ``rows`` (ascending, so each unit's rows keep batch
    order) and ``rows`` the row ids, both int64 tensors; units with no rows are left out.
    Reassemble a unit's answer in batch order with ``out[positions] = answer``.
    """
    _check_units(num_units)
    small = _split_small(partition_id, rows, num_units)
    if small is not None:
        return small
    t = as_rows(rows, unique=False)
    units = units_for_rows(partition_id, t, num_units)
    if t.numel() == 0:
        return {}
    if num_units == 1:
        return {0: (torch.arange(t.numel()), t)}
    order = torch.argsort(units, stable=True)
    counts = torch.bincount(units, minlength=num_units).tolist()
    return {unit: (pos, t[pos]) for unit, pos in enumerate(order.split(counts)) if pos.numel()}


def _int64(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))  # 3x faster than torch.tensor


def _split_small(
    partition_id: str, rows: Any, num_units: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
    """:func:`split_rows` of a short list of ints in plain Python; None for other input."""
    if not isinstance(rows, (list, tuple)) or not rows or len(rows) >= SMALL:
        return None
    if not all(type(r) is int for r in rows) or min(rows) < 0 or max(rows) > MAX_ROW:
        return None  # as_rows raises the right error, or converts numpy ints
    if num_units == 1:
        return {0: (torch.arange(len(rows)), _int64(list(rows)))}
    off = partition_offset(partition_id) % num_units
    groups: list[list[int]] = [[] for _ in range(num_units)]
    for i, r in enumerate(rows):
        groups[(r + off) % num_units].append(i)
    return {
        unit: (_int64(pos), _int64([rows[i] for i in pos]))
        for unit, pos in enumerate(groups)
        if pos
    }


def _jagged_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, offsets)`` of a plain jagged nested tensor, else None."""
    simple = getattr(t, "_lengths", None) is None and getattr(t, "_ragged_idx", 1) == 1
    if t.is_nested and t.layout == torch.jagged and simple:
        return t.values(), t.offsets().cpu()  # type: ignore[attr-defined]
    return None


def take(column: Any, positions: Any) -> Any:
    """The entries of a batch column at ``positions``, same kind of column.

    Dense tensor -> ``index_select``; jagged nested tensor -> jagged nested tensor (one
    gather of its values); list -> list; other nested tensors -> list of per-row tensors.
    """
    pos = torch.as_tensor(positions, dtype=torch.int64)
    if isinstance(column, torch.Tensor):
        parts = _jagged_parts(column)
        if parts is not None:
            values, offsets = parts
            starts, lengths = offsets[:-1][pos], offsets.diff()[pos]
            vals, offs = gather_jagged(values, starts, lengths)
            return torch.nested.nested_tensor_from_jagged(vals, offsets=offs.to(values.device))
        if column.is_nested:
            rows = column.unbind()
            return [rows[i] for i in pos.tolist()]
        if is_range(pos):  # a slice: no copy (the store copies on write)
            return column[int(pos[0]) : int(pos[0]) + pos.numel()]
        return _select(column, pos)
    if isinstance(column, (list, tuple)):
        return [column[i] for i in pos.tolist()]
    raise SchemaError(f"cannot take rows of a {type(column).__name__} column")


def _as_jagged(col: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, lengths)`` of a column that can be packed jagged, else None."""
    if not isinstance(col, torch.Tensor):
        return None
    parts = _jagged_parts(col)
    if parts is not None:
        values, offsets = parts
        return values[int(offsets[0]) : int(offsets[-1])], offsets.diff()
    if col.is_nested or col.dim() < 2:
        return None
    return col.flatten(0, 1), torch.full((col.shape[0],), col.shape[1], dtype=torch.int64)


def _select(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0 for every dtype (big ones as integer words: faster)."""
    if (t.dtype in _INDEXABLE and index.numel() < SMALL) or t[0:1].numel() == 0:
        return t.index_select(0, index.to(t.device))
    words = word_rows(t.contiguous()).index_select(0, index.to(t.device))
    return words.view(torch.uint8).view(t.dtype).view(index.numel(), *t.shape[1:])


def _assemble_dense(pieces: list[tuple[torch.Tensor, Any]], n: int) -> torch.Tensor:
    first = pieces[0][1]
    if n < SMALL and sum(pos.numel() for pos, _ in pieces) == n:
        # one cat + one gather: fewer torch calls than an index_copy_ per piece
        order = [0] * n
        for i, p in enumerate(p for pos, _ in pieces for p in pos.tolist()):
            order[p] = i
        return _select(torch.cat([col for _, col in pieces]), _int64(order))
    out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
    if out[0:1].numel() == 0:
        return out
    dst = word_rows(out)  # index_copy_ on words works for every dtype
    for pos, col in pieces:
        dst.index_copy_(0, pos.to(out.device), word_rows(col.contiguous()))
    return out


def _assemble_jagged(
    pieces: list[tuple[torch.Tensor, Any]], packed: list[tuple[torch.Tensor, torch.Tensor]], n: int
) -> torch.Tensor:
    values = torch.cat([v for v, _ in packed])
    starts = torch.empty(n, dtype=torch.int64)
    lengths = torch.empty(n, dtype=torch.int64)
    base = 0
    for (pos, _), (vals, lens) in zip(pieces, packed, strict=True):
        starts[pos] = base + offsets_of(lens)[:-1]
        lengths[pos] = lens
        base += vals.shape[0]
    vals, offsets = gather_jagged(values, starts, lengths)
    return torch.nested.nested_tensor_from_jagged(vals, offsets=offsets.to(vals.device))


def assemble(pieces: list[tuple[Any, Any]], n: int) -> Any:
    """Put per-unit answers ``[(positions, column), ...]`` back together in batch order.

    Dense pieces of one row shape -> one dense tensor; pieces whose rows differ only in the
    first dim (jagged nested tensors, dense pieces of other lengths) -> a jagged nested tensor;
    anything else -> a list with one entry per row.
    """
    pieces = [(torch.as_tensor(pos, dtype=torch.int64), col) for pos, col in pieces]
    cols = [col for _, col in pieces]
    if not cols:
        return []
    if len(pieces) == 1 and pieces[0][0].numel() == n and is_range(pieces[0][0]):
        return cols[0]  # one unit answered the whole batch in order: nothing to merge
    if all(isinstance(c, torch.Tensor) and not c.is_nested for c in cols):
        shapes = {(tuple(c.shape[1:]), c.dtype) for c in cols}
        if len(shapes) == 1:
            return _assemble_dense(pieces, n)
    packed = [_as_jagged(c) for c in cols]
    if all(p is not None for p in packed):
        kinds = {(tuple(p[0].shape[1:]), p[0].dtype) for p in packed if p is not None}
        if len(kinds) == 1:
            return _assemble_jagged(pieces, [p for p in packed if p is not None], n)
    out: list[Any] = [None] * n
    for pos, col in pieces:
        items = col.unbind() if isinstance(col, torch.Tensor) else col
        for p, item in zip(pos.tolist(), items, strict=True):
            out[p] = item
    return out
