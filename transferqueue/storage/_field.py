"""One field of one partition in a :class:`~transferqueue.storage.store.Store`.

A cell lives in one of three places, recorded per slot in ``Field.state``:

* ``DENSE``: a contiguous buffer ``(slots, *row_shape)`` (fixed-shape fields);
* ``JAGGED``: a :class:`JaggedArena` (rows that share all dims but the first);
* ``CELL``: a per-slot dict (non-tensor values, and tensors that fit neither).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transferqueue.errors import SchemaError
from transferqueue.runtime import memory
from transferqueue.storage._arena import JaggedArena, gather_dense, is_range, word_rows
from transferqueue.storage._pool import BufferPool

ABSENT, DENSE, JAGGED, CELL = 0, 1, 2, 3
MAX_ROW = 2**31 - 1
_IMMUTABLE = (str, bytes, int, float, bool, complex, type(None))


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def value_nbytes(value: Any) -> int:
    """Rough size of a non-tensor value."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, torch.Tensor):
        return tensor_nbytes(value)
    return sys.getsizeof(value)


def copy_value(value: Any) -> Any:
    return value if type(value) in _IMMUTABLE else copy.deepcopy(value)


def _rows_tensor(rows: Any) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows
    if isinstance(rows, range):
        return torch.arange(rows.start, rows.stop, rows.step, dtype=torch.int64)
    try:  # numpy converts a list of ints several times faster than torch does
        arr = np.asarray(rows)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"rows must be a list or 1-D tensor of ints: {exc}") from None
    if arr.size == 0:
        return torch.zeros(0, dtype=torch.int64)
    if arr.dtype.kind not in "iu":
        raise SchemaError(f"rows must be integers, got {arr.dtype} values")
    return torch.from_numpy(arr.astype(np.int64, copy=False))


def as_rows(rows: Any, unique: bool) -> torch.Tensor:
    """``rows`` as a 1-D int64 CPU tensor of valid row ids; SchemaError otherwise."""
    t = _rows_tensor(rows)
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise SchemaError(f"rows must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise SchemaError(f"rows must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.int64)
    if t.numel() == 0:
        return t
    lo_t, hi_t = torch.aminmax(t)
    lo, hi = int(lo_t), int(hi_t)
    if lo < 0 or hi > MAX_ROW:
        raise SchemaError(f"rows must be in [0, {MAX_ROW}], got values in [{lo}, {hi}]")
    if unique and torch.unique(t).numel() != t.numel():
        raise SchemaError("rows of one write must be unique")
    return t


def _scatter(
    buffer: torch.Tensor, slots: torch.Tensor, src: torch.Tensor | list[torch.Tensor]
) -> None:
    """``buffer[slots] = src`` for every dtype (``index_copy_`` on a byte view); ``src`` may
    be consecutive chunks (copied one by one into a range of slots: no concatenation)."""
    if is_range(slots):
        s0 = int(slots[0])
        for chunk in _tensors(src):
            buffer[s0 : s0 + chunk.shape[0]].copy_(chunk)
            s0 += chunk.shape[0]
        return
    if buffer[0].numel() == 0:
        return
    word_rows(buffer).index_copy_(0, slots, word_rows(dense_rows(src).to("cpu").contiguous()))


def _tensors(data: Any) -> list[torch.Tensor]:
    return [data] if isinstance(data, torch.Tensor) else list(data)


def dense_rows(data: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A dense column given as one tensor or as consecutive chunks, as one tensor."""
    return data if isinstance(data, torch.Tensor) else torch.cat(data)


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
) -> torch.Tensor:
    """``buf`` with room for ``need`` rows, grown geometrically (into pooled memory if any)."""
    cap = 0 if buf is None else buf.shape[0]
    if buf is not None and need <= cap:
        return buf
    grown = pool.take(max(need, 2 * cap), row_shape, dtype)
    if buf is not None:
        grown[:cap].copy_(buf)
        pool.give(buf)
    return grown


def _uniform(items: list[torch.Tensor]) -> bool:
    """Whether per-row tensors can be packed jagged (same ndim >= 1, same trailing dims)."""
    first = items[0]
    trail = first.shape[1:]
    return first.dim() >= 1 and all(t.dim() == first.dim() and t.shape[1:] == trail for t in items)


@dataclass(frozen=True)
class FieldData:
    """A validated column of one write (its data not copied yet).

    ``kind``: ``"dense"`` (``data`` a tensor), ``"jagged"`` (``data`` tensors whose
    concatenation holds the rows, split by ``lengths``), ``"rows"`` (``data`` per-row tensors
    of differing ndim or trailing dims) or ``"values"`` (``data`` a list of values).
    """

    kind: str
    data: Any
    nbytes: int
    dtype: torch.dtype | None = None
    lengths: torch.Tensor | None = None

    @property
    def is_tensor(self) -> bool:
        return self.kind != "values"

    def cast(self, dtype: torch.dtype) -> FieldData:
        """This column in ``dtype`` (a tensor column; itself when it is in it already)."""
        if self.dtype is None or self.dtype == dtype:
            return self
        data = (
            self.data.to(dtype)
            if isinstance(self.data, torch.Tensor)
            else [t.to(dtype) for t in self.data]
        )
        nbytes = sum(tensor_nbytes(t) for t in _tensors(data))
        return FieldData(self.kind, data, nbytes, dtype, self.lengths)

    @staticmethod
    def from_column(name: str, col: Any, n: int) -> FieldData:
        if isinstance(col, dict):
            return FieldData._from_pieces(name, col, n)
        if isinstance(col, torch.Tensor) and col.is_nested:
            return FieldData._from_nested(name, col.detach(), n)
        if isinstance(col, torch.Tensor):
            if col.dim() == 0 or col.shape[0] != n:
                raise SchemaError(
                    f"field {name!r}: tensor of shape {tuple(col.shape)} does not have "
                    f"one entry per row ({n} rows)"
                )
            return FieldData("dense", col.detach(), tensor_nbytes(col), col.dtype)
        if isinstance(col, (list, tuple)):
            return FieldData._from_list(name, list(col), n)
        raise SchemaError(
            f"field {name!r}: a column must be a tensor, a nested tensor or a list, "
            f"got {type(col).__name__}"
        )

    @staticmethod
    def _from_pieces(name: str, col: dict[str, Any], n: int) -> FieldData:
        """A column sent in runs (views of a caller's batch, see
        :func:`~transferqueue.client.routing.take`): ``{"pieces": [tensor, ...]}`` dense
        rows, or ``{"values": [tensor, ...], "lengths": tensor}`` jagged rows packed."""
        keys = sorted(col)
        parts = col.get("pieces") if keys == ["pieces"] else col.get("values")
        lengths = col.get("lengths") if keys == ["lengths", "values"] else None
        ok = keys == ["pieces"] or isinstance(lengths, torch.Tensor)
        if not (ok and isinstance(parts, list) and parts):
            raise SchemaError(
                f"field {name!r}: a dict column is {{'pieces': [tensor, ...]}} or "
                f"{{'values': [tensor, ...], 'lengths': tensor}}; got keys {keys}"
            )
        if not all(isinstance(t, torch.Tensor) and not t.is_nested and t.dim() for t in parts):
            raise SchemaError(f"field {name!r}: pieces must be plain tensors of rank >= 1")
        if len({(t.dtype, tuple(t.shape[1:])) for t in parts}) != 1:
            raise SchemaError(f"field {name!r}: pieces differ in dtype or trailing shape")
        total = sum(t.shape[0] for t in parts)
        nbytes = sum(tensor_nbytes(t) for t in parts)
        parts = [t.detach() for t in parts]
        if lengths is None:
            if total != n:
                raise SchemaError(f"field {name!r}: pieces hold {total} rows for {n} rows")
            return FieldData("dense", parts, nbytes, parts[0].dtype)
        lengths = lengths.to("cpu", torch.int64)
        if lengths.dim() != 1 or lengths.numel() != n:
            raise SchemaError(f"field {name!r}: lengths must hold one entry per row ({n} rows)")
        if bool((lengths < 0).any()) or int(lengths.sum()) != total:
            raise SchemaError(f"field {name!r}: lengths do not add up to the {total} values sent")
        return FieldData("jagged", parts, nbytes, parts[0].dtype, lengths)

    @staticmethod
    def _from_nested(name: str, col: torch.Tensor, n: int) -> FieldData:
        simple = getattr(col, "_lengths", None) is None and getattr(col, "_ragged_idx", 1) == 1
        if col.layout != torch.jagged or not simple:
            return FieldData._from_list(name, list(col.unbind()), n)
        if col.size(0) != n:
            raise SchemaError(f"field {name!r} has {col.size(0)} entries for {n} rows")
        offsets: torch.Tensor = col.offsets().cpu()  # type: ignore[attr-defined]
        start, end = int(offsets[0]), int(offsets[-1])
        values = col.values()[start:end]
        return FieldData("jagged", [values], tensor_nbytes(values), col.dtype, offsets.diff())

    @staticmethod
    def _from_list(name: str, items: list[Any], n: int) -> FieldData:
        if len(items) != n:
            raise SchemaError(f"field {name!r} has {len(items)} entries for {n} rows")
        n_tensors = sum(isinstance(x, torch.Tensor) for x in items)
        if n_tensors == 0:
            return FieldData("values", items, sum(value_nbytes(v) for v in items))
        if n_tensors != n:
            raise SchemaError(f"field {name!r} mixes tensors and non-tensor values")
        dtypes = {t.dtype for t in items}
        if len(dtypes) != 1 or any(t.is_nested for t in items):
            raise SchemaError(
                f"field {name!r}: per-row tensors must be plain tensors of one dtype, "
                f"got dtypes {sorted(str(d) for d in dtypes)}"
            )
        rows = [t.detach() for t in items]
        nbytes = sum(tensor_nbytes(t) for t in rows)
        if _uniform(rows):
            lengths = torch.tensor([t.shape[0] for t in rows], dtype=torch.int64)
            return FieldData("jagged", rows, nbytes, rows[0].dtype, lengths)
        return FieldData("rows", rows, nbytes, rows[0].dtype)


class Field:
    """The cells of one field in one partition."""

    def __init__(
        self, is_tensor: bool, dtype: torch.dtype | None, pool: BufferPool | None = None
    ) -> None:
        self.pool = BufferPool() if pool is None else pool
        self.is_tensor = is_tensor
        self.dtype = dtype
        self.jagged = False  # written per row at least once: reads never stack it
        self.state = torch.zeros(0, dtype=torch.uint8)
        self.buffer: torch.Tensor | None = None
        self.written = 0  # slots below this were written (and may have been read as views)
        self.arena: JaggedArena | None = None
        self.cells: dict[int, Any] = {}
        self.count = 0
        self.dense_count = 0
        self.jagged_count = 0
        self.nbytes = 0

    def _row_bytes(self) -> int:
        return 0 if self.buffer is None else tensor_nbytes(self.buffer[0])

    def _cell_bytes(self, cell: Any) -> int:
        return tensor_nbytes(cell) if self.is_tensor else value_nbytes(cell)

    def states(self, slots: torch.Tensor) -> torch.Tensor:
        cap = self.state.numel()
        if slots.numel() == 0 or (int(slots.min()) >= 0 and int(slots.max()) < cap):
            return self.state[slots]
        out = torch.zeros(slots.shape, dtype=torch.uint8)
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
            self.pool.give(self.buffer)
            self.buffer, self.written = grown, 0
        if self.arena is not None:
            self.arena.promote(dtype)
        self.cells = {s: c.to(dtype) for s, c in self.cells.items()}
        self.dtype = dtype
        self.nbytes = after
        return after - before

    def bytes_at(self, slots: torch.Tensor) -> int:
        """Bytes held at ``slots`` (unique)."""
        st = self.states(slots)
        nbytes = int((st == DENSE).sum()) * self._row_bytes()
        if self.arena is not None:
            nbytes += self.arena.nbytes_at(slots[st == JAGGED])
        return nbytes + sum(self._cell_bytes(self.cells[s]) for s in slots[st == CELL].tolist())

    def release(self, slots: torch.Tensor) -> int:
        """Empty the cells at ``slots`` (unique); returns the bytes they held."""
        if self.count == 0:  # a new field (or one cleared): nothing to look at
            return 0
        st = self.states(slots)
        held = st != ABSENT
        n_dense = int((st == DENSE).sum())
        freed = n_dense * self._row_bytes()
        jagged = slots[st == JAGGED]
        if self.arena is not None and jagged.numel():
            freed += self.arena.release(jagged)
        for s in slots[st == CELL].tolist():
            freed += self._cell_bytes(self.cells.pop(s))
        self.state[slots[held]] = ABSENT
        self.count -= int(held.sum())
        self.dense_count -= n_dense
        self.jagged_count -= jagged.numel()
        self.nbytes -= freed
        return freed

    def trim(self) -> None:
        """Drop buffers no row uses (overwrites keep them, to reuse their pages)."""
        if self.dense_count == 0:
            self.pool.give(self.buffer)
            self.buffer = None
            self.written = 0
        if self.jagged_count == 0:
            self.arena = None

    def write(self, slots: torch.Tensor, col: FieldData) -> None:
        """Store ``col`` at ``slots``, which must be empty (see :meth:`release`)."""
        need = int(slots.max()) + 1
        cap = self.state.numel()
        if need > cap:
            grown = torch.zeros(max(need, 2 * cap), dtype=torch.uint8)
            grown[:cap] = self.state
            self.state = grown
        if col.kind == "dense":
            self._write_dense(slots, col.data)
        elif col.kind == "jagged" and col.lengths is not None:
            self.jagged = True
            self._write_jagged(slots, col.data, col.lengths)
        elif col.kind == "rows":
            self.jagged = True
            self._write_cells(slots, [t.to("cpu", copy=True) for t in col.data])
        else:
            self._write_cells(slots, [copy_value(v) for v in col.data])
        self.count += slots.numel()
        self.nbytes += col.nbytes

    def _write_dense(self, slots: torch.Tensor, chunks: torch.Tensor | list[torch.Tensor]) -> None:
        first = _tensors(chunks)[0]
        row_shape = tuple(first.shape[1:])
        buf = self.buffer
        fits = buf is None or tuple(buf.shape[1:]) == row_shape or self.dense_count == 0
        if self.jagged or not fits:  # store these rows jagged (or one by one)
            data = dense_rows(chunks)
            if data.dim() >= 2:
                lengths = torch.full((data.shape[0],), data.shape[1], dtype=torch.int64)
                self._write_jagged(slots, [data.flatten(0, 1)], lengths)
            else:
                self._write_cells(slots, list(data.to("cpu", copy=True).unbind(0)))
            return
        if buf is not None and tuple(buf.shape[1:]) != row_shape:
            self.pool.give(buf)
            buf = None  # no row uses the old shape any more
        buf = _fit(buf, int(slots.max()) + 1, row_shape, first.dtype, self.pool)
        if int(slots.min()) < self.written and shared(buf):
            # copy on write: reads handed out views of these slots that are still alive
            buf = buf.clone()
        self.buffer = buf
        _scatter(buf, slots, chunks)
        self.written = max(self.written, int(slots.max()) + 1)
        self.state[slots] = DENSE
        self.dense_count += slots.numel()

    def _write_jagged(
        self, slots: torch.Tensor, parts: list[torch.Tensor], lengths: torch.Tensor
    ) -> None:
        trail, dtype = tuple(parts[0].shape[1:]), parts[0].dtype
        if self.arena is None or (self.jagged_count == 0 and not self.arena.accepts(trail, dtype)):
            self.arena = JaggedArena(trail, dtype)
        if not self.arena.accepts(trail, dtype):  # other rows hold another trailing shape
            rows = torch.cat(parts).cpu().split(lengths.tolist())
            self._write_cells(slots, list(rows))
            return
        live = (self.state == JAGGED).nonzero().squeeze(1)
        self.arena.append(slots, parts, lengths, live)
        self.state[slots] = JAGGED
        self.jagged_count += slots.numel()

    def _write_cells(self, slots: torch.Tensor, items: list[Any]) -> None:
        for s, item in zip(slots.tolist(), items, strict=True):
            self.cells[s] = item
        self.state[slots] = CELL

    def holds_all_dense(self, live: int) -> bool:
        """Whether every one of the partition's ``live`` rows is held here, and dense (or a
        value of a non-tensor field): then :meth:`gather_held` reads held slots without
        looking at their states."""
        if not self.is_tensor:
            return self.count == live
        return self.dense_count == live and not self.jagged and self.buffer is not None

    def gather_held(self, slots: torch.Tensor, contiguous: bool | None = None) -> Any:
        """:meth:`gather` of held ``slots`` of a field that :meth:`holds_all_dense`."""
        if not self.is_tensor or self.buffer is None:
            return self.gather(slots, None, contiguous)
        return gather_dense(self.buffer, slots, contiguous)

    def gather(
        self, slots: torch.Tensor, st: torch.Tensor | None = None, contiguous: bool | None = None
    ) -> Any:
        """Column of the cells at ``slots`` (all present), in the order of ``slots``.

        ``st``: ``states(slots)`` if known; ``contiguous``: ``is_range(slots)`` if known."""
        if not self.is_tensor:
            return [copy_value(self.cells[s]) for s in slots.tolist()]
        st = self.states(slots) if st is None else st
        n = slots.numel()
        if self.buffer is not None and not self.jagged and int((st == DENSE).sum()) == n:
            return gather_dense(self.buffer, slots, contiguous)
        if self.arena is not None and int((st == JAGGED).sum()) == n:
            values, offsets = self.arena.gather(slots)
            lengths = offsets.diff()
            if not self.jagged and n and bool((lengths == lengths[0]).all()):
                return values.view(n, int(lengths[0]), *self.arena.trail)
            return torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
        return self._gather_rows(slots, st)

    def _gather_rows(self, slots: torch.Tensor, st: torch.Tensor) -> Any:
        """Mixed storage: per-row tensors (stacked when the field is not jagged and they agree)."""
        out: list[Any] = [None] * slots.numel()
        if self.buffer is not None:
            pos = (st == DENSE).nonzero().squeeze(1)
            rows = gather_dense(self.buffer, slots[pos]).unbind(0)
            for p, t in zip(pos.tolist(), rows, strict=True):
                out[p] = t
        if self.arena is not None:
            pos = (st == JAGGED).nonzero().squeeze(1)
            values, offsets = self.arena.gather(slots[pos])
            for p, t in zip(pos.tolist(), values.split(offsets.diff().tolist()), strict=True):
                out[p] = t
        slot_list = slots.tolist()
        for p in (st == CELL).nonzero().squeeze(1).tolist():
            out[p] = self.cells[slot_list[p]]
        if not self.jagged and out and all(t.shape == out[0].shape for t in out):
            return torch.stack(out)
        return out
