"""Dense buffers of cleared fields, kept for the next write of the same size.

In RL loops partitions live one step: step N is cleared, step N+1 written with the same
field shapes. Writing into freshly allocated memory costs a page fault per 4 KiB page (copies
run ~5x slower than into touched memory), so a :class:`~transferqueue.storage.store.Store`
keeps the storage of buffers it drops (cleared fields and partitions, buffers outgrown) in a
:class:`BufferPool`, keyed by byte size, and a new or growing buffer takes a pooled storage of
sufficient size (at most ``4x`` the size asked for) instead of fresh memory -- unless views of
it that a read handed out are still alive (a zmq frame still being sent).

Bound: pooled bytes stay <= ``max(MIN_POOL_BYTES, bytes stored)``, where ``bytes stored`` is
counted before the clear that gives the buffer back (so one step's buffers fit); the oldest
pooled buffers go first. Pooled bytes are not stored data: ``nbytes`` and ``capacity_bytes``
ignore them. :meth:`BufferPool.clear` (``Store.trim``) returns them to the allocator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from transferqueue.runtime import memory

MIN_POOL_BYTES = 256 << 20
_MAX_WASTE = 4  # a pooled storage serves a request of at least 1/_MAX_WASTE of its size

__all__ = ["MIN_POOL_BYTES", "BufferPool"]


class BufferPool:
    """Untyped storages of dropped dense buffers, oldest first."""

    def __init__(
        self, stored_bytes: Callable[[], int] = lambda: 0, min_bytes: int = MIN_POOL_BYTES
    ) -> None:
        self._free: list[torch.UntypedStorage] = []
        self._stored_bytes = stored_bytes
        self._min_bytes = min_bytes
        self.nbytes = 0

    def give(self, buffer: torch.Tensor | None) -> None:
        """Keep ``buffer``'s storage (CPU only) if it fits in the bound."""
        if buffer is None or buffer.device.type != "cpu":
            return
        limit = max(self._min_bytes, self._stored_bytes())
        storage = buffer.untyped_storage()
        size = storage.nbytes()
        if size == 0 or size > limit or any(s.data_ptr() == storage.data_ptr() for s in self._free):
            return
        while self._free and self.nbytes + size > limit:
            self.nbytes -= self._free.pop(0).nbytes()
        self._free.append(storage)
        self.nbytes += size

    def take(self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A ``(>= rows, *row_shape)`` buffer: a pooled storage if one fits, else fresh."""
        row_bytes = torch.empty((1, *row_shape), dtype=dtype).nbytes
        need = rows * row_bytes
        best = -1
        for i, s in enumerate(self._free):
            size = s.nbytes()
            fits = need <= size <= _MAX_WASTE * need
            if (
                fits
                and (best < 0 or size < self._free[best].nbytes())
                and memory.storage_users(s) == 1
            ):
                best = i
        if need == 0 or best < 0:
            return memory.empty((rows, *row_shape), dtype)
        storage = self._free.pop(best)
        self.nbytes -= storage.nbytes()
        return memory.on_storage(storage, (storage.nbytes() // row_bytes, *row_shape), dtype)

    def clear(self) -> None:
        self._free.clear()
        self.nbytes = 0
