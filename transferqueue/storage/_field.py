"""One field of one partition in a :class:`~transferqueue.storage.store.Store`.

A cell lives in one of four places, recorded per slot in ``Field.state``:

* ``DENSE``: a contiguous buffer ``(slots, *row_shape)`` (fixed-shape fields);
* ``MOVED``: the buffer's :class:`~._overlay.Overlay`, for a dense cell rewritten while a
  view of the buffer was alive (copy on write of that cell alone);
* ``JAGGED``: a :class:`JaggedArena` (rows that share all dims but the first);
* ``CELL``: a per-slot dict (non-tensor values, and tensors that fit neither).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from transferqueue.errors import SchemaError
from transferqueue.runtime import memory
from transferqueue.storage._arena import JaggedArena, gather_dense, is_range
from transferqueue.storage._input import (
    FieldData,
    as_rows,
    copy_value,
    dense_rows,
    lo_hi,
    row_array,
    tensor_nbytes,
    value_nbytes,
)
from transferqueue.storage._overlay import Overlay, row_nbytes, scatter
from transferqueue.storage._pool import BufferPool

ABSENT, DENSE, JAGGED, CELL, MOVED = 0, 1, 2, 3, 4

__all__ = [
    "ABSENT",
    "CELL",
    "DENSE",
    "JAGGED",
    "MOVED",
    "Copies",
    "Field",
    "FieldData",
    "as_rows",
    "lo_hi",
    "row_array",
    "shared",
]


def shared(buffer: torch.Tensor) -> bool:
    """Whether tensors other than ``buffer`` itself use its memory (views handed out by a
    read and still alive: an inproc reply, a zmq frame being sent)."""
    # ``buffer`` and the storage object made here count once each
    return memory.storage_users(buffer.untyped_storage()) > 2


def _fit(
    buf: torch.Tensor | None,
    need: int,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
    pool: BufferPool,
    give: Callable[[torch.Tensor | None], None],
) -> torch.Tensor:
    """``buf`` with room for ``need`` rows, grown geometrically (into pooled memory if any;
    ``give`` takes the outgrown one)."""
    cap = 0 if buf is None else buf.shape[0]
    if buf is not None and need <= cap:
        return buf
    grown = pool.take(max(need, 2 * cap), row_shape, dtype)
    if buf is not None:
        grown[:cap].copy_(buf)
        give(buf)
    return grown


class Copies:
    """Bytes the dense writes of one store copied (its data, growth into bigger buffers,
    overlay cells folded back; see :mod:`._overlay`): what tests of copy on write count."""

    def __init__(self) -> None:
        self.nbytes = 0


class Field:
    """The cells of one field in one partition. Slots are 1-D int64 numpy arrays (numpy
    indexes a few slots in ~1 us, torch in 5-10 us per call)."""

    def __init__(
        self,
        is_tensor: bool,
        dtype: torch.dtype | None,
        pool: BufferPool | None = None,
        copies: Copies | None = None,
    ) -> None:
        self.pool = BufferPool() if pool is None else pool
        self.copies = Copies() if copies is None else copies
        self.is_tensor = is_tensor
        self.dtype = dtype
        self.jagged = False  # written per row at least once: reads never stack it
        self.state = np.zeros(0, dtype=np.uint8)
        self.buffer: torch.Tensor | None = None
        self.written = 0  # slots below this were written (and may have been read as views)
        self.overlay: Overlay | None = None  # cells rewritten while views were alive
        self.arena: JaggedArena | None = None
        self.kept = False  # the buffer is a put's frames, kept as is (:meth:`_keep`)
        self.cells: dict[int, Any] = {}
        self.count = 0
        self.dense_count = 0  # DENSE and MOVED cells
        self.jagged_count = 0
        self.nbytes = 0

    def _row_bytes(self) -> int:
        return 0 if self.buffer is None else row_nbytes(self.buffer)

    def _cell_bytes(self, cell: Any) -> int:
        return tensor_nbytes(cell) if self.is_tensor else value_nbytes(cell)

    @property
    def moved(self) -> int:
        """Cells held in the overlay."""
        return 0 if self.overlay is None else self.overlay.count

    def states(self, slots: np.ndarray) -> np.ndarray:
        cap = self.state.size
        if slots.size == 0:
            return np.zeros(0, dtype=np.uint8)
        lo, hi = lo_hi(slots)
        if lo >= 0 and hi < cap:
            return self.state[slots]
        out = np.zeros(slots.shape, dtype=np.uint8)
        ok = (slots >= 0) & (slots < cap)
        out[ok] = self.state[slots[ok]]
        return out

    def check_compatible(self, name: str, col: FieldData) -> None:
        """Tensors and non-tensor values do not mix; tensor dtypes promote (see
        :meth:`promote`)."""
        if col.is_tensor != self.is_tensor:
            held = "tensors" if self.is_tensor else "non-tensor values"
            raise SchemaError(f"field {name!r} holds {held} in this partition; got {col.kind}")

    def promoted_bytes(self, dtype: torch.dtype) -> int:
        """The bytes this field holds once :meth:`promote` d to ``dtype``."""
        if not self.is_tensor or self.dtype is None or self.dtype == dtype:
            return self.nbytes
        old = torch.empty((), dtype=self.dtype).element_size()
        return self.nbytes * torch.empty((), dtype=dtype).element_size() // old

    def promote(self, dtype: torch.dtype) -> int:
        """Hold every row in ``dtype`` (wider than the field's: ``torch.promote_types``)
        from now on, converting the rows held; returns the change in bytes. Views that
        reads handed out keep the old values (the rows move to new buffers)."""
        if not self.is_tensor or self.dtype is None or self.dtype == dtype:
            return 0
        before, after = self.nbytes, self.promoted_bytes(dtype)
        if self.buffer is not None:
            grown = self.pool.take(self.buffer.shape[0], tuple(self.buffer.shape[1:]), dtype)
            grown[: self.buffer.shape[0]].copy_(
                self.buffer
            )  # converts (a pooled one may be longer)
            self.give(self.buffer)
            self.buffer, self.written = grown, 0
            self._fold()  # into the new buffer, which no view shares
            self.overlay = None
        if self.arena is not None:
            self.arena.promote(dtype)
        self.cells = {s: c.to(dtype) for s, c in self.cells.items()}
        self.dtype = dtype
        self.nbytes = after
        return after - before

    def bytes_at(self, slots: np.ndarray) -> int:
        """Bytes held at ``slots`` (unique)."""
        st = self.states(slots)
        nbytes = int(np.count_nonzero((st == DENSE) | (st == MOVED))) * self._row_bytes()
        if self.arena is not None:
            nbytes += self.arena.nbytes_at(slots[st == JAGGED])
        if self.cells:
            nbytes += sum(self._cell_bytes(self.cells[s]) for s in slots[st == CELL].tolist())
        return nbytes

    def release(self, slots: np.ndarray) -> int:
        """Empty the cells at ``slots`` (unique); returns the bytes they held."""
        if self.count == 0:  # a new field (or one cleared): nothing to look at
            return 0
        st = self.states(slots)
        held = slots[st != ABSENT]
        if held.size == 0:
            return 0
        n_moved = 0
        if self.overlay is not None and self.overlay.count:
            moved = slots[st == MOVED]
            n_moved = moved.size
            if n_moved:
                self.overlay.drop(moved)
        n_dense = int(np.count_nonzero(st == DENSE)) + n_moved
        freed = n_dense * self._row_bytes()
        jagged = slots[st == JAGGED] if self.jagged_count else slots[:0]
        if self.arena is not None and jagged.size:
            freed += self.arena.release(jagged)
        if self.cells:
            for s in slots[st == CELL].tolist():
                freed += self._cell_bytes(self.cells.pop(s))
        self.state[held] = ABSENT
        self.count -= held.size
        self.dense_count -= n_dense
        self.jagged_count -= jagged.size
        self.nbytes -= freed
        return freed

    def trim(self) -> None:
        """Drop buffers no row uses (overwrites keep them, to reuse their pages)."""
        if self.dense_count == 0:
            self.give(self.buffer)
            self.buffer = None
            self.overlay = None
            self.written = 0
        if self.jagged_count == 0:
            self.arena = None

    def write(self, slots: np.ndarray, col: FieldData) -> None:
        """Store ``col`` at ``slots``, which must be empty (see :meth:`release`)."""
        lo, hi = lo_hi(slots)
        need = hi + 1
        cap = self.state.size
        if need > cap:
            grown = np.zeros(max(need, 2 * cap), dtype=np.uint8)
            grown[:cap] = self.state
            self.state = grown
        if col.kind == "dense":
            self._write_dense(slots, col.data, lo, need)
        elif col.kind == "jagged" and col.lengths is not None:
            self.jagged = True
            self._write_jagged(slots, col.data, col.lengths)
        elif col.kind == "rows":
            self.jagged = True
            self._write_cells(slots, [t.to("cpu", copy=True) for t in col.data])
        else:
            self._write_cells(slots, [copy_value(v) for v in col.data])
        self.count += slots.size
        self.nbytes += col.nbytes

    def settle(self) -> None:
        """Fold the overlay back into the buffer once no view of the buffer is alive."""
        if self.moved and self.buffer is not None and not shared(self.buffer):
            self._fold()

    def _fold(self) -> None:
        if self.overlay is None or self.buffer is None or not self.overlay.count:
            return
        rows = np.flatnonzero(self.overlay.slot_of[: self.overlay.used] >= 0)
        self.state[self.overlay.slot_of[rows]] = DENSE
        self.copies.nbytes += self.overlay.fold_into(self.buffer)

    def _write_dense(
        self, slots: np.ndarray, chunks: torch.Tensor | list[torch.Tensor], lo: int, need: int
    ) -> None:
        first = chunks if isinstance(chunks, torch.Tensor) else chunks[0]
        row_shape = tuple(first.shape[1:])
        buf = self.buffer
        same = buf is not None and tuple(buf.shape[1:]) == row_shape
        if self.jagged or not (buf is None or same or self.dense_count == 0):
            self._write_dense_elsewhere(slots, dense_rows(chunks))  # jagged (or one by one)
            return
        if buf is not None and not same:
            self.give(buf)
            buf = self.buffer = None  # no row uses the old shape any more
            self.overlay = None
        if buf is None and self._keep(slots, chunks, lo, need):
            return
        old = buf
        buf = self.buffer = _fit(buf, need, row_shape, first.dtype, self.pool, self.give)
        if old is not None and buf is not old:
            self.copies.nbytes += old.nbytes
        risky = slots < self.written if lo < self.written and shared(buf) else None
        if risky is not None and 2 * int(np.count_nonzero(risky)) >= self.written:
            # most written rows are rewritten while views of them are alive: a new buffer
            # costs no more than the write (at most twice its rows copied)
            buf = self._replace_buffer(buf)
            risky = None
        if risky is not None:
            # copy on write of these cells only: views of them handed out are still alive
            self._write_moved(buf, slots, dense_rows(chunks), risky, row_shape, first.dtype)
        else:
            self.settle()
            self.copies.nbytes += scatter(buf, slots, chunks)
            self.state[slots] = DENSE
        self.written = max(self.written, need)
        self.dense_count += slots.size

    def _keep(
        self, slots: np.ndarray, chunks: torch.Tensor | list[torch.Tensor], lo: int, need: int
    ) -> bool:
        """Make a put's frames the new buffer, no copy, when they are all of it (rows 0..n-1
        in order, one frame or consecutive ones end to end) and the request lets them go
        (``memory.take_ownership``: shared-memory frames that nobody else holds). Their
        memory is not pooled when the buffer goes."""
        if lo != 0 or need != slots.size or not is_range(slots):
            return False
        buf = memory.take_ownership(chunks)
        if buf is None:
            return False
        self.buffer, self.kept = buf, True
        self.state[slots] = DENSE
        self.written = need
        self.dense_count += slots.size
        return True

    @property
    def kept_bytes(self) -> int:
        """Bytes of the buffer, when it is one kept from a put's frames (:meth:`_keep`)."""
        return self.buffer.nbytes if self.kept and self.buffer is not None else 0

    def unkeep(self) -> None:
        """Move a buffer kept from a put's frames into the store's own memory (one copy)."""
        if self.kept and self.buffer is not None:
            self._replace_buffer(self.buffer)

    def give(self, buf: torch.Tensor | None) -> None:
        """Hand the buffer this field stops using to the pool (one kept from a put's frames
        is not the store's memory: it goes back to its sender when freed)."""
        if buf is not None and self.kept:
            self.kept = False
            return
        self.pool.give(buf)

    def _replace_buffer(self, buf: torch.Tensor) -> torch.Tensor:
        """A new buffer holding ``buf``'s written rows (and the overlay's cells)."""
        grown = self.pool.take(buf.shape[0], tuple(buf.shape[1:]), buf.dtype)
        grown[: self.written].copy_(buf[: self.written])
        self.copies.nbytes += buf[: self.written].nbytes
        self.buffer, self.kept = grown, False  # ``buf`` is not the field's any more
        self._fold()
        return grown

    def _write_moved(
        self,
        buffer: torch.Tensor,
        slots: np.ndarray,
        data: torch.Tensor,
        risky: np.ndarray,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        """Rows at ``risky`` slots into the overlay, the others into ``buffer`` (the field's)."""
        if self.overlay is None:
            self.overlay = Overlay(row_shape, dtype)
        if bool(risky.all()):
            self.copies.nbytes += self.overlay.put(slots, data)
            self.state[slots] = MOVED
            return
        at = np.flatnonzero(risky)
        fresh = np.flatnonzero(~risky)
        self.copies.nbytes += self.overlay.put(slots[at], data[torch.from_numpy(at)])
        self.copies.nbytes += scatter(buffer, slots[fresh], data[torch.from_numpy(fresh)])
        self.state[slots[at]] = MOVED
        self.state[slots[fresh]] = DENSE

    def _write_dense_elsewhere(self, slots: np.ndarray, data: torch.Tensor) -> None:
        if data.dim() >= 2:
            lengths = torch.full((data.shape[0],), data.shape[1], dtype=torch.int64)
            self._write_jagged(slots, [data.flatten(0, 1)], lengths)
        else:
            self._write_cells(slots, list(data.to("cpu", copy=True).unbind(0)))

    def _write_jagged(
        self, slots: np.ndarray, parts: list[torch.Tensor], lengths: torch.Tensor
    ) -> None:
        trail, dtype = tuple(parts[0].shape[1:]), parts[0].dtype
        if self.arena is None or (self.jagged_count == 0 and not self.arena.accepts(trail, dtype)):
            self.arena = JaggedArena(trail, dtype)
        if not self.arena.accepts(trail, dtype):  # other rows hold another trailing shape
            rows = torch.cat(parts).cpu().split(lengths.tolist())
            self._write_cells(slots, list(rows))
            return
        self.arena.append(slots, parts, lengths, lambda: np.flatnonzero(self.state == JAGGED))
        self.state[slots] = JAGGED
        self.jagged_count += slots.size

    def _write_cells(self, slots: np.ndarray, items: list[Any]) -> None:
        for s, item in zip(slots.tolist(), items, strict=True):
            self.cells[s] = item
        self.state[slots] = CELL

    def holds_all_dense(self, live: int) -> bool:
        """Whether every one of the partition's ``live`` rows is held here, and dense in the
        buffer (or a value of a non-tensor field): then :meth:`gather_held` reads held slots
        without looking at their states."""
        if not self.is_tensor:
            return self.count == live
        return (
            self.dense_count == live
            and not self.jagged
            and self.buffer is not None
            and not self.moved
        )

    def gather_held(self, slots: np.ndarray, contiguous: bool | None = None) -> Any:
        """:meth:`gather` of held ``slots`` of a field that :meth:`holds_all_dense`."""
        if not self.is_tensor or self.buffer is None:
            return self.gather(slots, None, contiguous)
        return gather_dense(self.buffer, slots, contiguous)

    def gather(
        self, slots: np.ndarray, st: np.ndarray | None = None, contiguous: bool | None = None
    ) -> Any:
        """Column of the cells at ``slots`` (all present), in the order of ``slots``.

        ``st``: ``states(slots)`` if known; ``contiguous``: ``is_range(slots)`` if known."""
        if not self.is_tensor:
            return [copy_value(self.cells[s]) for s in slots.tolist()]
        st = self.states(slots) if st is None else st
        n = slots.size
        if self.buffer is not None and not self.jagged:
            n_dense = int(np.count_nonzero(st == DENSE))
            if n_dense == n:
                return gather_dense(self.buffer, slots, contiguous)
            if n_dense + int(np.count_nonzero(st == MOVED)) == n:
                return self._dense_rows(self.buffer, slots, st)
        if self.arena is not None and int(np.count_nonzero(st == JAGGED)) == n:
            values, offsets = self.arena.gather(slots)
            lengths = offsets.diff()
            if not self.jagged and n and bool((lengths == lengths[0]).all()):
                return values.view(n, int(lengths[0]), *self.arena.trail)
            return torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
        return self._gather_rows(slots, st)

    def _dense_rows(self, buffer: torch.Tensor, slots: np.ndarray, st: np.ndarray) -> torch.Tensor:
        """Cells at ``slots`` of ``buffer`` (the field's), all DENSE or MOVED, as a new tensor."""
        out = gather_dense(buffer, slots, contiguous=False)
        moved = np.flatnonzero(st == MOVED)
        if moved.size and self.overlay is not None:
            scatter(out, moved, self.overlay.rows(slots[moved]))
        return out

    def _gather_rows(self, slots: np.ndarray, st: np.ndarray) -> Any:
        """Mixed storage: per-row tensors (stacked when the field is not jagged and they agree)."""
        out: list[Any] = [None] * slots.size
        if self.buffer is not None:
            pos = np.flatnonzero((st == DENSE) | (st == MOVED))
            rows = self._dense_rows(self.buffer, slots[pos], st[pos]).unbind(0)
            for p, t in zip(pos.tolist(), rows, strict=True):
                out[p] = t
        if self.arena is not None:
            pos = np.flatnonzero(st == JAGGED)
            values, offsets = self.arena.gather(slots[pos])
            for p, t in zip(pos.tolist(), values.split(offsets.diff().tolist()), strict=True):
                out[p] = t
        slot_list = slots.tolist()
        for p in np.flatnonzero(st == CELL).tolist():
            out[p] = self.cells[slot_list[p]]
        if not self.jagged and out and all(t.shape == out[0].shape for t in out):
            return torch.stack(out)
        return out
