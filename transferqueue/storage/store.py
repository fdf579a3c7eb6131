"""Columnar storage of one storage unit: cells ``(partition, row, field)``.

Pure and synchronous (no asyncio, no I/O); the :class:`~transferqueue.storage.unit.StorageUnit`
actor is a thin shell around one :class:`Store`.

Columns on write (``rows`` is a list or 1-D integer tensor of partition-local row ids,
unique, ``>= 0``; every column has ``len(rows)`` entries):

* a dense tensor ``(len(rows), *row_shape)`` -- a fixed-shape field;
* a jagged nested tensor (``layout=torch.jagged``) or a list of tensors, one per row -- a
  *jagged* field: reads return it per row even when the requested rows happen to agree;
* a list of plain Python values (str, dict, numbers, None, ...) -- a non-tensor field;
* ``{"pieces": [tensor, ...]}`` -- dense rows sent in consecutive runs (views of a caller's
  batch), or ``{"values": [tensor, ...], "lengths": tensor}`` -- jagged rows packed, in runs.

Columns on read (``read`` returns ``{field: column}`` in the requested row order):

* ``torch.Tensor`` ``(len(rows), *row_shape)`` for a field never written per row whose
  requested rows share one shape -- a view of the buffer for a range of slots (read-only
  for the caller: while views live, writes put the cells they rewrite elsewhere, see
  :mod:`._overlay`), else one ``index_select`` per field;
* a jagged nested tensor (``torch.nested.nested_tensor_from_jagged``) for a field written
  per row (list or nested tensor), also when the requested rows happen to agree -- one
  gather of its packed values;
* ``list[torch.Tensor]`` in the rare mixed cases: rows differing in ndim or trailing dims,
  or a dense field some of whose rows were rewritten with another shape. Entries may share
  memory with the store: treat them as read-only;
* ``list`` of values for a non-tensor field (mutable values are copied).

Layout: a partition maps row -> slot densely (free slots of cleared rows are reused). Each
field keeps (see :mod:`._field`) a contiguous buffer ``(slots, *row_shape)`` for fixed-shape
rows, grown geometrically; a packed values buffer + (start, length) per slot for jagged rows
(:mod:`._arena`); and a per-slot dict for non-tensor values and odd shapes. A dense write of a
new shape replaces the buffer when no other row uses the old one, else goes to the jagged
buffer.

Writes copy their data (CUDA tensors end up on the host). ``capacity_bytes`` bounds the stored
data bytes (tensor ``numel * element_size``; ``len`` of str/bytes, ``sys.getsizeof`` of other
values); a write that would exceed it raises :class:`StorageFullError` and writes nothing. Bad
input raises :class:`SchemaError` and writes nothing: wrong column length, tensor vs non-tensor
mixups, duplicate or negative rows. Tensor dtypes promote: a field holds one dtype,
``torch.promote_types`` of every dtype written to it (and of :meth:`Store.promote`'s floor);
a narrower write is cast to it, a wider one first converts the rows held (once per
promotion: reads stay views of one buffer).
Reading an unknown partition raises :class:`PartitionNotFoundError`; a missing cell a
``KeyError`` naming the row and field. Clearing a partition drops its buffers; clearing rows
frees their slots for reuse, and a field or partition left empty is dropped. Dropped dense
buffers go to a bounded pool that later writes take them from instead of fresh memory
(:mod:`._pool`: at most ``max(256 MiB, bytes stored)``, outside ``capacity_bytes``);
:meth:`Store.trim` empties it.

``write`` = ``prepare_write`` (validate, no state change) + ``check_capacity(plan.nbytes)`` +
``apply_write(plan)``; callers splitting them must not let the store change in between.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transferqueue.errors import PartitionNotFoundError, SchemaError, StorageFullError
from transferqueue.runtime import memory
from transferqueue.storage._arena import is_range
from transferqueue.storage._field import ABSENT, Copies, Field, FieldData, lo_hi, row_array
from transferqueue.storage._pool import BufferPool

#: a put's frames are kept only if those of its message left over (copied) are at most
#: 1/_KEEP_WASTE of the kept bytes: a kept frame holds its whole message's segment alive
_KEEP_WASTE = 8

Column = torch.Tensor | list[Any]

__all__ = ["Column", "Store", "WritePlan"]


@dataclass(frozen=True)
class WritePlan:
    """A validated write; ``nbytes`` is the net change of stored bytes it causes."""

    partition_id: str
    rows: np.ndarray
    columns: dict[str, FieldData]
    nbytes: int
    #: fields whose held rows move to a wider dtype first (``torch.promote_types``)
    promote: dict[str, torch.dtype] = dataclasses.field(default_factory=dict)


def _itemsize(dtype: torch.dtype | None) -> int:
    return 1 if dtype is None else torch.empty((), dtype=dtype).element_size()


def _as_dtype(value: Any) -> torch.dtype:
    dtype = (
        value
        if isinstance(value, torch.dtype)
        else getattr(torch, str(value).removeprefix("torch."), None)
    )
    if not isinstance(dtype, torch.dtype):
        raise SchemaError(f"unknown tensor dtype {value!r}")
    return dtype


class _Partition:
    """Row -> slot map of one partition plus its fields (numpy arrays of int64)."""

    def __init__(self) -> None:
        self.row_to_slot = np.full(0, -1, dtype=np.int64)
        self.free: list[int] = []
        self.next_slot = 0
        self.live = 0
        self.fields: dict[str, Field] = {}

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.fields.values())

    def slots_of(self, rows: np.ndarray) -> np.ndarray:
        """Slots of ``rows`` (a new array); -1 for rows this partition does not hold."""
        size = self.row_to_slot.size
        if rows.size == 0 or lo_hi(rows)[1] < size:
            return self.row_to_slot[rows]
        out = np.full(rows.shape, -1, dtype=np.int64)
        known = rows < size
        out[known] = self.row_to_slot[rows[known]]
        return out

    def assign_slots(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``rows``, giving free or fresh slots to rows not held yet; and the slots
        of the rows held already (the only ones whose cells a write must release first)."""
        slots = self.slots_of(rows)
        new = np.flatnonzero(slots < 0)
        k = new.size
        if k == 0:
            return slots, slots
        held = slots[slots >= 0] if k < slots.size else slots[:0]
        take = min(k, len(self.free))
        new_slots = np.empty(k, dtype=np.int64)
        new_slots[:take] = self.free[len(self.free) - take :]
        del self.free[len(self.free) - take :]
        new_slots[take:] = np.arange(self.next_slot, self.next_slot + k - take)
        self.next_slot += k - take
        slots[new] = new_slots
        new_rows = rows[new]
        need = lo_hi(new_rows)[1] + 1
        size = self.row_to_slot.size
        if need > size:
            grown = np.full(max(need, 2 * size), -1, dtype=np.int64)
            grown[:size] = self.row_to_slot
            self.row_to_slot = grown
        self.row_to_slot[new_rows] = new_slots
        self.live += k
        return slots, held

    def clear(self, rows: np.ndarray) -> int:
        """Drop ``rows`` (unique) and their cells; returns the bytes freed."""
        slots = self.slots_of(rows)
        held = slots >= 0
        rows, slots = rows[held], slots[held]
        if rows.size == 0:
            return 0
        freed = 0
        for name in list(self.fields):
            field = self.fields[name]
            freed += field.release(slots)
            field.trim()
            if field.count == 0:
                del self.fields[name]
        self.row_to_slot[rows] = -1
        self.free.extend(slots.tolist())
        self.live -= rows.size
        return freed


class Store:
    """Cells ``(partition, row, field)`` of one storage unit; see the module docstring."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise SchemaError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._partitions: dict[str, _Partition] = {}
        #: per partition, the dtype a field is held in at least (set by :meth:`promote`)
        self._floors: dict[str, dict[str, torch.dtype]] = {}
        self._nbytes = 0
        self._pool = BufferPool(lambda: self._nbytes)
        self._copies = Copies()

    @property
    def copied_bytes(self) -> int:
        """Bytes this store's dense writes copied so far (see :class:`._field.Copies`)."""
        return self._copies.nbytes

    @property
    def kept_bytes(self) -> int:
        """Bytes of buffers kept as is from puts' shared-memory frames (``Field._keep``):
        stored data whose memory the putting process's segments hold."""
        return sum(f.kept_bytes for p in self._partitions.values() for f in p.fields.values())

    @property
    def pooled_bytes(self) -> int:
        """Bytes of dropped buffers kept for reuse (not stored data; see :mod:`._pool`)."""
        return self._pool.nbytes

    def trim(self) -> None:
        """Return the pooled buffers to the allocator (see :mod:`._pool`)."""
        self._pool.clear()

    @property
    def nbytes(self) -> int:
        """Stored data bytes, over all partitions."""
        return self._nbytes

    def fits(self, incoming_bytes: int) -> bool:
        cap = self.capacity_bytes
        return cap is None or self._nbytes + incoming_bytes <= cap

    def check_capacity(self, incoming_bytes: int) -> None:
        """Raise :class:`StorageFullError` if ``incoming_bytes`` more would not fit."""
        if self.fits(incoming_bytes):
            return
        cap = self.capacity_bytes
        raise StorageFullError(
            f"storage unit full: the write needs {incoming_bytes} more bytes, "
            f"{self._nbytes} of {cap} bytes are in use ({cap - self._nbytes if cap else 0} "
            f"free); clear consumed samples or partitions, or raise storage.capacity_bytes"
        )

    # ---- writing -------------------------------------------------------------------------

    def prepare_write(self, partition_id: str, rows: Any, columns: dict[str, Any]) -> WritePlan:
        """Validate a write and compute its net size; changes nothing."""
        rows_t = row_array(rows, unique=True)
        n = rows_t.size
        if not isinstance(columns, dict):
            raise SchemaError(f"columns must be a dict of field -> column, got {type(columns)}")
        cols = {
            str(name): FieldData.from_column(str(name), col, n) for name, col in columns.items()
        }
        part = self._partitions.get(partition_id)
        floors = self._floors.get(partition_id, {})
        promote: dict[str, torch.dtype] = {}
        nbytes = 0
        held_slots = part.slots_of(rows_t) if part is not None and n else None
        if held_slots is not None:
            held_slots = held_slots[held_slots >= 0]
            held_slots = held_slots if held_slots.size else None  # new rows only
        for name, col in cols.items():
            held = part.fields.get(name) if part is not None else None
            if held is not None:
                held.check_compatible(name, col)
            if col.dtype is not None:  # a tensor column: the field's one dtype
                target = col.dtype
                for other in (floors.get(name), held.dtype if held is not None else None):
                    if other is not None and other != target:  # a torch call: only if needed
                        target = torch.promote_types(target, other)
                col = cols[name] = col.cast(target)
                if held is not None and held.dtype != target:
                    promote[name] = target
                    nbytes += held.promoted_bytes(target) - held.nbytes
            nbytes += col.nbytes
            if held is not None and held_slots is not None:
                freed = held.bytes_at(held_slots)
                if name in promote:
                    freed = freed * _itemsize(promote[name]) // _itemsize(held.dtype)
                nbytes -= freed
        return WritePlan(partition_id, rows_t, cols, nbytes, promote)

    def promote(self, partition_id: str, dtypes: dict[str, Any]) -> int:
        """Hold fields of ``partition_id`` in at least these dtypes (``{field: dtype}``, a
        torch dtype or its name), converting the rows held, and writing later rows so;
        returns the change in stored bytes."""
        floors = self._floors.setdefault(partition_id, {})
        part = self._partitions.get(partition_id)
        grown = 0
        for name, raw in dtypes.items():
            dtype = _as_dtype(raw)
            floor = floors.get(name)
            floors[name] = dtype if floor is None else torch.promote_types(floor, dtype)
            held = part.fields.get(name) if part is not None else None
            if held is not None and held.dtype is not None:
                grown += held.promote(torch.promote_types(held.dtype, floors[name]))
        self._nbytes += grown
        return grown

    def apply_write(self, plan: WritePlan) -> None:
        """Store a plan from :meth:`prepare_write` (the store must not have changed since)."""
        if plan.rows.size == 0 or not plan.columns:
            return
        part = self._partitions.get(plan.partition_id)
        if part is None:
            part = self._partitions[plan.partition_id] = _Partition()
        slots, held = part.assign_slots(plan.rows)
        kept_now: list[Field] = []  # fields that kept this request's frames as their buffer
        for name, col in plan.columns.items():
            field = part.fields.get(name)
            if field is None:
                field = part.fields[name] = Field(
                    col.is_tensor, col.dtype, self._pool, self._copies
                )
            elif name in plan.promote:
                self._nbytes += field.promote(plan.promote[name])
            freed = field.release(held) if held.size else 0
            kept = field.kept
            field.write(slots, col)
            if field.kept != kept:
                kept_now.append(field)
            self._nbytes += col.nbytes - freed
        if kept_now and memory.frames_left() * _KEEP_WASTE > sum(f.kept_bytes for f in kept_now):
            # a kept frame holds its whole message's segment: with more than a little of
            # the request's other frames copied, not kept, keeping holds their bytes twice
            for field in kept_now:
                field.unkeep()

    def write(self, partition_id: str, rows: Any, columns: dict[str, Any]) -> None:
        """Write ``columns`` into ``rows`` of ``partition_id``: all of it, or nothing."""
        plan = self.prepare_write(partition_id, rows, columns)
        self.check_capacity(plan.nbytes)
        self.apply_write(plan)

    # ---- reading -------------------------------------------------------------------------

    def read(self, partition_id: str, rows: Any, fields: list[str]) -> dict[str, Column]:
        """Columns of ``fields`` for ``rows``, in the order of ``rows``."""
        part = self._partitions.get(partition_id)
        if part is None:
            raise PartitionNotFoundError(
                f"partition {partition_id!r} has no data in this storage unit "
                "(never written, or cleared)"
            )
        rows_t = row_array(rows, unique=False)
        slots = part.slots_of(rows_t)
        # once per read, not per field: are all rows held, are their slots a range
        held = slots.size == 0 or lo_hi(slots)[0] >= 0
        contiguous = is_range(slots)
        out: dict[str, Column] = {}
        for name in fields:
            field = part.fields.get(name)
            if field is None:
                raise KeyError(
                    f"field {name!r} is not stored for partition {partition_id!r} "
                    f"in this storage unit (fields here: {sorted(part.fields)})"
                )
            field.settle()  # no view of its buffer left: rewritten cells go back into it
            if held and field.holds_all_dense(part.live):  # no per-slot state to look at
                out[name] = field.gather_held(slots, contiguous)
                continue
            st = field.states(slots)
            missing = np.flatnonzero(st == ABSENT)
            if missing.size:
                row = int(rows_t[missing[0]])
                raise KeyError(
                    f"row {row} of partition {partition_id!r} has no field {name!r} "
                    "in this storage unit (never written, or cleared)"
                )
            out[name] = field.gather(slots, st, contiguous)
        return out

    def fields(self, partition_id: str) -> list[str]:
        """Names of the fields stored for ``partition_id`` ([] for an unknown partition)."""
        part = self._partitions.get(partition_id)
        return [] if part is None else list(part.fields)

    def partition_ids(self) -> list[str]:
        return list(self._partitions)

    def stats(self) -> dict[str, dict[str, Any]]:
        """``{partition: {"rows": int, "fields": [str], "nbytes": int}}``."""
        return {
            pid: {"rows": p.live, "fields": list(p.fields), "nbytes": p.nbytes}
            for pid, p in self._partitions.items()
        }

    # ---- clearing ------------------------------------------------------------------------

    def clear_rows(self, partition_id: str, rows: Any) -> int:
        """Drop every cell of ``rows``; unknown rows are ignored. Returns the bytes freed."""
        part = self._partitions.get(partition_id)
        if part is None:
            return 0
        rows_t = row_array(rows, unique=False)
        if rows_t.size <= 16:  # np.unique costs ~20 us to set up
            rows_t = np.array(sorted(set(rows_t.tolist())), dtype=np.int64)
        else:
            rows_t = np.unique(rows_t)
        freed = part.clear(rows_t)
        self._nbytes -= freed
        if part.live == 0:
            del self._partitions[partition_id]
        return freed

    def clear_partition(self, partition_id: str) -> int:
        """Drop the partition and its buffers (idempotent). Returns the bytes freed."""
        self._floors.pop(partition_id, None)
        part = self._partitions.pop(partition_id, None)
        if part is None:
            return 0
        freed = part.nbytes
        for field in part.fields.values():
            field.give(field.buffer)
        part.fields.clear()
        self._nbytes -= freed
        return freed
