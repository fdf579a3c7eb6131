"""The storage unit actor: a thin asyncio shell over one :class:`Store`.

Public ``async def`` methods are called remotely; arguments and results are codec payloads
only (tensors, jagged nested tensors, lists, dicts, str, numbers, None, bytes).

* ``put(partition_id, rows, columns, timeout=None) -> int`` -- writes all columns or nothing
  (``rows``: list or 1-D int tensor; ``columns``: ``{field: column}``, see
  :mod:`transferqueue.storage.store`); returns the net bytes added. When the unit is full it
  raises :class:`StorageFullError`, or with ``block_when_full`` waits (woken by clears, never
  polling) until the write fits or ``timeout`` seconds pass. A write larger than the whole
  capacity raises at once.
* ``get(partition_id, rows, fields) -> {field: column}`` in the order of ``rows``: a dense
  tensor, a jagged nested tensor (per-row tensors that share ndim >= 1 and trailing dims),
  a list of tensors (other per-row shapes) or a list of values.
* ``clear_rows(partition_id, rows) -> int`` / ``clear_partition(partition_id) -> int``:
  idempotent; return the bytes freed.
* ``stats() -> dict``.

``capacity_bytes`` bounds this unit alone. A system started by ``tq.init`` passes ``None``:
``storage.capacity_bytes`` is a system-wide bound, kept by the controller when it admits a
put (:mod:`transferqueue.controller.placement`). The copy of a put runs on the event loop (memory bandwidth:
about 10 ms for 128 MiB on a 16-core host, page faults included): simpler than a thread, and
it keeps the store single-threaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import torch

from transferqueue.errors import ConfigError, SchemaError
from transferqueue.storage.store import Column, Store, WritePlan

__all__ = ["StorageUnit"]


def _to_wire(col: Column) -> Column:
    """Per-row tensors as one jagged nested tensor where its layout allows (2 wire buffers)."""
    if isinstance(col, torch.Tensor) or not col or not isinstance(col[0], torch.Tensor):
        return col
    first = col[0]
    trail = first.shape[1:]
    if first.dim() >= 1 and all(t.dim() == first.dim() and t.shape[1:] == trail for t in col):
        return torch.nested.as_nested_tensor(col, layout=torch.jagged)
    return col


def _check_partition(partition_id: Any) -> None:
    if not isinstance(partition_id, str) or not partition_id:
        raise SchemaError(f"partition_id must be a non-empty str, got {partition_id!r}")


class StorageUnit:
    """One storage unit of ``num_units``; holds the rows routed to it."""

    def __init__(
        self,
        unit_id: int,
        num_units: int,
        capacity_bytes: int | None = None,
        block_when_full: bool = False,
    ) -> None:
        if not isinstance(num_units, int) or num_units < 1:
            raise ConfigError(f"num_units must be an int >= 1, got {num_units!r}")
        if not isinstance(unit_id, int) or not 0 <= unit_id < num_units:
            raise ConfigError(f"unit_id must be in [0, {num_units}), got {unit_id!r}")
        if capacity_bytes is not None and (
            not isinstance(capacity_bytes, int) or capacity_bytes < 0
        ):
            raise ConfigError(f"capacity_bytes must be an int >= 0 or None, got {capacity_bytes!r}")
        self.unit_id = unit_id
        self.num_units = num_units
        self.block_when_full = block_when_full
        self._store = Store(capacity_bytes)
        self._space = asyncio.Condition()  # notified whenever a clear frees bytes
        self._waiting = 0

    async def put(
        self,
        partition_id: str,
        rows: Any,
        columns: dict[str, Any],
        timeout: float | None = None,
    ) -> int:
        """Write ``columns`` into ``rows``; returns the net bytes added."""
        _check_partition(partition_id)
        plan = self._store.prepare_write(partition_id, rows, columns)
        if not self._store.fits(plan.nbytes):
            cap = self._store.capacity_bytes
            if not self.block_when_full or (cap is not None and plan.nbytes > cap):
                self._store.check_capacity(plan.nbytes)
            plan = await self._wait_for_space(partition_id, rows, columns, timeout)
        self._store.apply_write(plan)
        return plan.nbytes

    async def _wait_for_space(
        self, partition_id: str, rows: Any, columns: dict[str, Any], timeout: float | None
    ) -> WritePlan:
        """Wait until the write fits (re-planned after each clear); StorageFullError at timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._waiting += 1
        try:
            async with self._space:
                while True:
                    plan = self._store.prepare_write(partition_id, rows, columns)
                    left = None if deadline is None else deadline - loop.time()
                    if self._store.fits(plan.nbytes) or (left is not None and left <= 0):
                        self._store.check_capacity(plan.nbytes)
                        return plan
                    # on timeout: loop once more, then check_capacity raises with the numbers
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._space.wait(), left)
        finally:
            self._waiting -= 1

    async def get(self, partition_id: str, rows: Any, fields: list[str]) -> dict[str, Column]:
        """``{field: column}`` for ``rows``, in their order (see the module docstring)."""
        _check_partition(partition_id)
        if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
            raise SchemaError(f"fields must be a list of str, got {fields!r}")
        cols = self._store.read(partition_id, rows, list(fields))
        return {name: _to_wire(col) for name, col in cols.items()}

    async def clear_rows(self, partition_id: str, rows: Any) -> int:
        """Drop ``rows`` of ``partition_id``; returns the bytes freed."""
        _check_partition(partition_id)
        freed = self._store.clear_rows(partition_id, rows)
        await self._notify(freed)
        return freed

    async def clear_partition(self, partition_id: str) -> int:
        """Drop ``partition_id`` and its buffers; returns the bytes freed."""
        _check_partition(partition_id)
        freed = self._store.clear_partition(partition_id)
        await self._notify(freed)
        return freed

    async def promote(self, partition_id: str, dtypes: dict[str, str]) -> int:
        """Hold fields of ``partition_id`` in at least ``dtypes`` (``{field: dtype name}``),
        converting the rows held; returns the bytes freed (negative: the rows grew)."""
        _check_partition(partition_id)
        if not isinstance(dtypes, dict):
            raise SchemaError(f"dtypes must be a dict of field -> dtype, got {dtypes!r}")
        return -self._store.promote(partition_id, dtypes)

    async def _notify(self, freed: int) -> None:
        if freed and self._waiting:
            async with self._space:
                self._space.notify_all()

    async def watch(self) -> None:
        """Never returns while the unit lives: the controller holds one such call per unit,
        and its failure with ``ActorDiedError`` tells the controller the unit died."""
        await asyncio.Event().wait()

    async def stats(self) -> dict[str, Any]:
        """Bytes used and capacity, waiting puts, bytes its writes copied and kept (from
        shared-memory puts, no copy), and per-partition rows/fields/bytes."""
        return {
            "unit_id": self.unit_id,
            "pid": os.getpid(),
            "num_units": self.num_units,
            "nbytes": self._store.nbytes,
            "capacity_bytes": self._store.capacity_bytes,
            "block_when_full": self.block_when_full,
            "waiting_puts": self._waiting,
            "copied_bytes": self._store.copied_bytes,
            "kept_bytes": self._store.kept_bytes,
            "partitions": self._store.stats(),
        }
