"""Moving a batch's rows to and from the storage units that hold them.

The controller places rows (:mod:`transferqueue.controller.placement`): a put's rows go to
the units in blocks of ``stripe`` consecutive batch positions (config
``storage.stripe_rows``, default 128), and every BatchMeta names the unit of each row.

Blocks, not single rows: a unit's share of a batch of consecutive rows is a few runs of
``stripe`` consecutive batch positions, so :func:`take` hands each unit *views* of the
caller's tensors (``{"pieces": [...]}``, one piece per run, sent zero-copy) instead of a
gathered copy, :func:`assemble` merges answers with one slice copy per run, and a small batch
(a micro-batch of up to ``stripe`` rows) is served by one or two units instead of all.

The client splits a batch with :func:`group_by_unit`, slices each column for a unit with
:func:`take`, and puts the units' answers back in batch order with :func:`assemble` --
vectorised (no Python loop over rows for dense and jagged columns) from ``SMALL`` rows on;
shorter batches take plain-Python paths (a torch call costs 5-10 us, a row a few ns).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from transferqueue.errors import SchemaError
from transferqueue.runtime import memory
from transferqueue.storage._arena import gather_jagged, is_range, offsets_of, word_rows
from transferqueue.storage._field import as_rows
from transferqueue.storage._pool import BufferPool

#: batches of fewer rows take plain-Python paths: a torch op costs 5-10 us, a row a few ns
SMALL = 256
#: results of merges that callers dropped, kept for the next merge of that size (bytes)
OUTPUT_POOL_BYTES = 1 << 30
#: rows per stripe block (the default of ``storage.stripe_rows``)
STRIPE_ROWS = 128
#: a unit's share is sent as views of runs (no copy) when runs average at least this many
#: bytes and there are at most MAX_PIECES of them per field; else as one gathered copy.
#: Many zero-copy frames in one message stall pyzmq (its garbage-collector thread must
#: release each): 80 frames of 4 MiB per message cost ~0.6 s now and then, 20 never did.
PIECE_BYTES = 64 << 10
MAX_PIECES = 8
#: dtypes ``index_select`` handles natively (others go through a view as integer words)
_INDEXABLE = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
}  # fmt: skip

_T = TypeVar("_T")

__all__ = [
    "STRIPE_ROWS", "assemble", "carve", "dense_pieces", "dense_result", "group_by_unit",
    "jagged_parts", "runs", "take",
]  # fmt: skip


def group_by_unit(rows: Any, units: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Group a batch by the unit of each row: ``{unit: (positions, rows)}``.

    ``units`` names the unit of each row (as the controller placed it). ``positions`` are
    indices into the batch (ascending, so each unit's rows keep batch order) and ``rows``
    the row ids, both int64 tensors. Reassemble with ``out[positions] = answer``.
    """
    if len(rows) != len(units):
        raise SchemaError(f"got {len(units)} units for {len(rows)} rows")
    if not len(rows):
        return {}
    if isinstance(rows, (list, tuple)) and len(rows) < SMALL:
        groups: dict[int, list[int]] = {}
        for i, u in enumerate(units):
            groups.setdefault(int(u), []).append(i)
        if len(groups) == 1:
            ((unit, _),) = groups.items()
            return {unit: (torch.arange(len(rows)), as_rows(list(rows), unique=False))}
        return {
            u: (_int64(pos), _int64([rows[i] for i in pos])) for u, pos in sorted(groups.items())
        }
    t = as_rows(rows, unique=False)
    u_t = torch.as_tensor(np.asarray(units, dtype=np.int64))
    if bool((u_t < 0).any()):
        raise SchemaError("every row needs a unit >= 0")
    found = torch.unique(u_t).tolist()
    if len(found) == 1:
        return {int(found[0]): (torch.arange(t.numel()), t)}
    order = torch.argsort(u_t, stable=True)
    counts = torch.bincount(u_t).tolist()
    return {u: (pos, t[pos]) for u, pos in enumerate(order.split(counts)) if pos.numel()}


def _int64(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))  # 3x faster than torch.tensor


def jagged_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, offsets)`` of a plain jagged nested tensor, else None."""
    simple = getattr(t, "_lengths", None) is None and getattr(t, "_ragged_idx", 1) == 1
    if t.is_nested and t.layout == torch.jagged and simple:
        return t.values(), t.offsets().cpu()  # type: ignore[attr-defined]
    return None


def runs(positions: Any) -> list[tuple[int, int]]:
    """``positions`` as runs of consecutive values, in order: ``[(start, length), ...]``."""
    pos = torch.as_tensor(positions, dtype=torch.int64)
    n = pos.numel()
    if n == 0:
        return []
    if n < SMALL:
        out: list[tuple[int, int]] = []
        values = pos.tolist()
        start = prev = values[0]
        for v in values[1:]:
            if v != prev + 1:
                out.append((start, prev - start + 1))
                start = v
            prev = v
        out.append((start, prev - start + 1))
        return out
    cuts = ((pos[1:] - pos[:-1]) != 1).nonzero().squeeze(1) + 1
    bounds = [0, *cuts.tolist(), n]
    starts = pos[bounds[:-1]].tolist()
    return [(s, b - a) for s, a, b in zip(starts, bounds[:-1], bounds[1:], strict=True)]


def _piece_runs(
    pos: torch.Tensor, share_bytes: int, found: list[tuple[int, int]] | None
) -> list[tuple[int, int]] | None:
    """The runs of ``pos`` when sending them as separate views beats one gathered copy."""
    if pos.numel() < 2 or share_bytes < 2 * PIECE_BYTES:
        return None
    found = runs(pos) if found is None else found
    if 1 < len(found) <= MAX_PIECES and share_bytes >= PIECE_BYTES * len(found):
        return found
    return None


def take(column: Any, positions: Any, found: list[tuple[int, int]] | None = None) -> Any:
    """The entries of a batch column at ``positions``, same kind of column.

    Dense tensor -> a slice (one run of positions) or ``index_select``; jagged nested tensor
    -> jagged nested tensor (one gather of its values); list -> list; other nested tensors
    -> list of per-row tensors. Positions that form a few long runs (a unit's blocks of a big
    batch, see the module docstring) give views, nothing copied: ``{"pieces": [view, ...]}``
    of a dense column, ``{"values": [view, ...], "lengths": lengths}`` of a jagged one.
    ``found``: ``runs(positions)``, when the caller takes several columns at the same
    positions and computed it once.
    """
    pos = torch.as_tensor(positions, dtype=torch.int64)
    one_run = len(found) == 1 if found is not None else is_range(pos)
    if isinstance(column, torch.Tensor):
        parts = jagged_parts(column)
        if parts is not None:
            values, offsets = parts
            lengths = offsets.diff()[pos]
            share = values.nbytes * pos.numel() // max(1, column.size(0))
            views_at = [(int(pos[0]), pos.numel())] if one_run else _piece_runs(pos, share, found)
            if views_at is not None:
                bounds = offsets.tolist()
                views = [values[bounds[a] : bounds[a + k]] for a, k in views_at]
                return {"values": views, "lengths": lengths}
            vals, offs = gather_jagged(values, offsets[:-1][pos], lengths)
            return torch.nested.nested_tensor_from_jagged(vals, offsets=offs.to(values.device))
        if column.is_nested:
            rows = column.unbind()
            return [rows[i] for i in pos.tolist()]
        if one_run:  # a slice: no copy (the store copies on write)
            return column[int(pos[0]) : int(pos[0]) + pos.numel()]
        share = column[0:1].nbytes * pos.numel()
        views_at = _piece_runs(pos, share, found)
        if views_at is not None:
            return {"pieces": [column[a : a + k] for a, k in views_at]}
        if pos.numel() >= SMALL and share >= memory.HUGE_MIN_BYTES:
            long_runs = runs(pos) if found is None else found
            if len(long_runs) * 8 <= pos.numel():  # too many runs to send as views
                return _gather_runs(column, long_runs, pos.numel())
        return _select(column, pos)
    if isinstance(column, (list, tuple)):
        return [column[i] for i in pos.tolist()]
    raise SchemaError(f"cannot take rows of a {type(column).__name__} column")


def _as_jagged(col: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, lengths)`` of a column that can be packed jagged, else None."""
    if not isinstance(col, torch.Tensor):
        return None
    parts = jagged_parts(col)
    if parts is not None:
        values, offsets = parts
        return values[int(offsets[0]) : int(offsets[-1])], offsets.diff()
    if col.is_nested or col.dim() < 2:
        return None
    return col.flatten(0, 1), torch.full((col.shape[0],), col.shape[1], dtype=torch.int64)


def _gather_runs(column: torch.Tensor, found: list[tuple[int, int]], n: int) -> torch.Tensor:
    """The runs of ``column`` packed into one pooled buffer (pages already touched), one
    slice copy per run: past ``MAX_PIECES`` runs a big share is still one copy at memcpy
    speed, not an indexed gather into fresh pages (a throughput cliff of 3x)."""
    out = _output((n, *column.shape[1:]), column.dtype, column.device)
    i = 0
    for start, k in found:
        out[i : i + k].copy_(column[start : start + k])
        i += k
    return out


def _select(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0 for every dtype (big ones as integer words: faster)."""
    if (t.dtype in _INDEXABLE and index.numel() < SMALL) or t[0:1].numel() == 0:
        return t.index_select(0, index.to(t.device))
    words = word_rows(t.contiguous()).index_select(0, index.to(t.device))
    return words.view(torch.uint8).view(t.dtype).view(index.numel(), *t.shape[1:])


def _long_runs(
    pieces: list[tuple[torch.Tensor, Any]], n: int, found: list[list[tuple[int, int]]] | None
) -> list[list[tuple[int, int]]] | None:
    """Each piece's runs of positions, when they are long enough (>= 8 rows on average) for
    one slice copy per run to beat an indexed copy. ``found``: the runs, if known."""
    if n < SMALL:
        return None
    if found is None:
        found = [runs(pos) for pos, _ in pieces]
    return found if sum(len(f) for f in found) * 8 <= n else None


def _assemble_dense(
    pieces: list[tuple[torch.Tensor, Any]],
    n: int,
    found: list[list[tuple[int, int]]] | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    first = pieces[0][1]
    if n < SMALL and sum(pos.numel() for pos, _ in pieces) == n:
        # one cat + one gather: fewer torch calls than an index_copy_ per piece
        order = [0] * n
        for i, p in enumerate(p for pos, _ in pieces for p in pos.tolist()):
            order[p] = i
        return _select(torch.cat([col for _, col in pieces]), _int64(order))
    if out is None:
        out = _output((n, *first.shape[1:]), first.dtype, first.device)
    if out[0:1].numel() == 0:
        return out
    long_runs = _long_runs(pieces, n, found)
    if long_runs is not None:  # blocks of a striped batch: one slice copy per run
        for (_, col), piece_runs in zip(pieces, long_runs, strict=True):
            i = 0
            for start, k in piece_runs:
                out[start : start + k].copy_(col[i : i + k])
                i += k
        return out
    dst = word_rows(out)  # index_copy_ on words works for every dtype
    for pos, col in pieces:
        dst.index_copy_(0, pos.to(out.device), word_rows(col.contiguous()))
    return out


def _assemble_jagged(
    pieces: list[tuple[torch.Tensor, Any]],
    packed: list[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    found: list[list[tuple[int, int]]] | None,
) -> torch.Tensor:
    long_runs = _long_runs(pieces, n, found)
    if long_runs is not None:  # blocks of a striped batch: one cat of run slices
        segments = []
        for (vals, lens), piece_runs in zip(packed, long_runs, strict=True):
            offs = offsets_of(lens).tolist()
            i = 0
            for start, k in piece_runs:
                segments.append((start, vals[offs[i] : offs[i + k]], lens[i : i + k]))
                i += k
        segments.sort(key=lambda seg: seg[0])
        first = segments[0][1]
        total = sum(v.shape[0] for _, v, _ in segments)
        vals = _output((total, *first.shape[1:]), first.dtype, first.device)
        torch.cat([v for _, v, _ in segments], out=vals)
        offsets = offsets_of(torch.cat([ln for _, _, ln in segments]))
        return torch.nested.nested_tensor_from_jagged(vals, offsets=offsets.to(vals.device))
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


def assemble(
    pieces: list[tuple[Any, Any]],
    n: int,
    copy: bool = False,
    found: list[list[tuple[int, int]]] | None = None,
    out: torch.Tensor | None = None,
) -> Any:
    """Put per-unit answers ``[(positions, column), ...]`` back together in batch order.

    Dense pieces of one row shape -> one dense tensor; pieces whose rows differ only in the
    first dim (jagged nested tensors, dense pieces of other lengths) -> a jagged nested tensor;
    anything else -> a list with one entry per row. ``copy``: the pieces may share memory
    with a store (inproc), so the result must not -- a lone piece is cloned. ``found``:
    ``runs`` of each piece's positions, when the caller merges several columns of the same
    pieces and computed them once. ``out``: where the dense result goes, when the caller
    planned it (:func:`dense_result`, :func:`carve`).
    """
    pieces = [(torch.as_tensor(pos, dtype=torch.int64), col) for pos, col in pieces]
    cols = [col for _, col in pieces]
    if not cols:
        return []
    if len(pieces) == 1 and pieces[0][0].numel() == n and is_range(pieces[0][0]):
        # one unit answered the whole batch in order: nothing to merge
        if copy and out is not None:
            return out.copy_(cols[0])
        return _cloned(cols[0]) if copy else cols[0]
    if all(isinstance(c, torch.Tensor) and not c.is_nested for c in cols):
        shapes = {(tuple(c.shape[1:]), c.dtype) for c in cols}
        if len(shapes) == 1:
            return _assemble_dense(pieces, n, found, out)
    packed = [_as_jagged(c) for c in cols]
    if all(p is not None for p in packed):
        kinds = {(tuple(p[0].shape[1:]), p[0].dtype) for p in packed if p is not None}
        if len(kinds) == 1:
            return _assemble_jagged(pieces, [p for p in packed if p is not None], n, found)
    rows: list[Any] = [None] * n
    for pos, col in pieces:
        items = col.unbind() if isinstance(col, torch.Tensor) else col
        for p, item in zip(pos.tolist(), items, strict=True):
            rows[p] = item.clone() if copy and isinstance(item, torch.Tensor) else item
    return rows


_outputs = BufferPool(min_bytes=OUTPUT_POOL_BYTES)
_outputs_lock = threading.Lock()


def _forget_outputs() -> None:
    """In a forked child: a fresh pool and lock (the parent's buffers are copy-on-write
    memory here, and its lock may have been held by a thread the fork did not copy)."""
    global _outputs, _outputs_lock, _merger, _merger_lock
    _outputs = BufferPool(min_bytes=OUTPUT_POOL_BYTES)
    _outputs_lock = threading.Lock()
    _merger, _merger_lock = None, threading.Lock()  # the parent's threads are not here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_outputs)


def _output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised result tensor. Big CPU ones come from buffers of earlier results
    that their holders dropped (pages already touched: a copy into fresh pages runs at a
    fifth of memcpy speed on VMs), else from :func:`memory.empty`; every big one is
    tracked, so it serves a later result once dropped. The pool keeps at most
    ``OUTPUT_POOL_BYTES`` of them, oldest forgotten first."""
    if device.type != "cpu" or math.prod(shape) * dtype.itemsize < memory.HUGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    with _outputs_lock:
        buf = _outputs.take(shape[0], shape[1:], dtype)
        _outputs.give(buf)
    return buf[: shape[0]]


def dense_pieces(pieces: list[tuple[Any, Any]]) -> tuple[tuple[int, ...], torch.dtype, int] | None:
    """``(row shape, dtype, rows)`` when every piece is a dense CPU tensor of one row shape
    and dtype (what one new dense tensor can hold), else None."""
    if not pieces:
        return None
    first = pieces[0][1]
    if not isinstance(first, torch.Tensor) or first.is_nested or first.dim() == 0:
        return None
    row, dtype, rows = tuple(first.shape[1:]), first.dtype, 0
    for _, col in pieces:
        if (
            not isinstance(col, torch.Tensor)
            or col.is_nested
            or col.device.type != "cpu"
            or col.dtype != dtype
            or col.dim() == 0
            or tuple(col.shape[1:]) != row
        ):
            return None
        rows += col.shape[0]
    return row, dtype, rows


def dense_result(
    pieces: list[tuple[Any, Any]], n: int, copy: bool
) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The shape and dtype of the new dense CPU tensor :func:`assemble` makes of these
    pieces of ``n`` rows (from ``SMALL`` rows on), or None where it makes none (a lone
    piece it may return as is) or another kind (jagged, lists, a small batch)."""
    if n < SMALL or (len(pieces) == 1 and not copy):
        return None
    kind = dense_pieces(pieces)
    return None if kind is None else ((n, *kind[0]), kind[1])


#: bytes between the starts of two results carved from one buffer (cache-line aligned)
_ALIGN = 64


def carve(plans: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the planned shapes, all in ONE pooled buffer, when there
    are several and they are big (``memory.HUGE_MIN_BYTES`` together); else ``{}`` (each
    result gets its own buffer). A get of many fields then writes into one buffer of
    touched (huge) pages, as a get of one field does, instead of one fresh malloc per
    field: an inproc get of 64 MiB over 32 fields ran at 0.39x the 1-field rate without it.
    The fields share that buffer's memory: it serves a later result only once every one
    of them is dropped (the pool checks), and a field kept alone keeps the whole buffer."""
    sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in plans.items()}
    total = sum(-(-b // _ALIGN) * _ALIGN for b in sizes.values())
    if len(plans) < 2 or total < memory.HUGE_MIN_BYTES:
        return {}
    buf = _output((total,), torch.uint8, torch.device("cpu"))
    outs, at = {}, 0
    for k, (shape, dtype) in plans.items():
        outs[k] = buf[at : at + sizes[k]].view(dtype).view(shape)
        at += -(-sizes[k] // _ALIGN) * _ALIGN
    return outs


_merger: ThreadPoolExecutor | None = None
_merger_lock = threading.Lock()


def in_parallel(fn: Callable[[str], _T], names: list[str]) -> dict[str, _T]:
    """``{name: fn(name)}``, the calls spread over torch's intra-op thread count. The
    merges of many fields' carved results: each copy is too small for torch to split over
    threads as it splits a one-field merge's big copies, so the fields are split instead
    (copies release the GIL)."""
    global _merger
    threads = torch.get_num_threads()
    if threads < 2 or len(names) < 2:
        return {name: fn(name) for name in names}
    with _merger_lock:
        if _merger is None:
            _merger = ThreadPoolExecutor(threads, thread_name_prefix="tq-merge")
        pool = _merger
    chunks = [names[i::threads] for i in range(threads)]
    done = pool.map(lambda chunk: [(name, fn(name)) for name in chunk], chunks)
    return {name: value for part in done for name, value in part}


def _copy(t: torch.Tensor) -> torch.Tensor:
    return _output(tuple(t.shape), t.dtype, t.device).copy_(t)


def _cloned(col: Any) -> Any:
    """A column that shares no memory with ``col`` (values are copied by the store)."""
    if isinstance(col, torch.Tensor):
        parts = jagged_parts(col)
        if parts is not None:
            values, offsets = parts
            return torch.nested.nested_tensor_from_jagged(
                _copy(values), offsets=offsets.to(values.device)
            )
        return _copy(col)
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in col]
