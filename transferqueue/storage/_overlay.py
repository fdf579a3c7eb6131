"""Copy on write of single cells: the rows of a dense buffer rewritten while views are alive.

A read of a range of slots hands out a view of a field's dense buffer (no copy; an inproc
reply, a zmq frame still being sent). A later write into those slots must not change what
the view shows, and copying the whole buffer first would make an O(batch) write cost
O(partition). Instead the rewritten cells go to an :class:`Overlay`: a small buffer of its
own (never handed out as a view: reads copy out of it) plus ``where[slot]``, the overlay
row of each slot's current cell. The cells under them in the dense buffer stay as the views
saw them. When no view of the buffer is left, the next write or read folds the overlay back
into the buffer (one scatter of the overlay's cells) and drops its rows, so reads of ranges
are views again.

Costs: a write moves only its own cells; a fold moves each overlay cell once; ``where`` is
8 bytes per slot, grown with the field like its state (allocated at the field's first copy
on write, never per write). Memory: at most one overlay cell per slot (a rewrite of a cell
already in the overlay overwrites it there), so a field holds at most twice its bytes while
views are alive -- as the buffer copy it replaces did.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from transferqueue.storage._arena import gather_dense, index_tensor, is_range, word_rows

__all__ = ["Overlay", "row_nbytes", "scatter"]


def row_nbytes(buffer: torch.Tensor) -> int:
    """Bytes of one row of a ``(rows, *row_shape)`` tensor (no slice made)."""
    return math.prod(buffer.shape[1:]) * buffer.element_size()


def scatter(buffer: torch.Tensor, slots: np.ndarray, src: torch.Tensor | list[torch.Tensor]) -> int:
    """``buffer[slots] = src`` for every dtype (``index_copy_`` on a word view); ``src`` may
    be consecutive chunks (copied one by one into a range of slots: no concatenation).
    Returns the bytes copied."""
    chunks = [src] if isinstance(src, torch.Tensor) else src
    if is_range(slots):
        s0 = int(slots[0])
        for chunk in chunks:
            buffer[s0 : s0 + chunk.shape[0]].copy_(chunk)
            s0 += chunk.shape[0]
        return len(slots) * row_nbytes(buffer)
    row_bytes = row_nbytes(buffer)
    if row_bytes:
        data = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        word_rows(buffer).index_copy_(
            0, index_tensor(slots), word_rows(data.to("cpu").contiguous())
        )
    return len(slots) * row_bytes


class Overlay:
    """The overlay cells of one dense buffer (``row_shape``, ``dtype``); see the module."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.row_shape = row_shape
        self.dtype = dtype
        self.where = np.zeros(0, dtype=np.int64)  # slot -> overlay row + 1 (0: none)
        self._reset()

    def _reset(self) -> None:
        self.data = torch.empty((0, *self.row_shape), dtype=self.dtype)
        self.slot_of = np.zeros(0, dtype=np.int64)  # overlay row -> slot (-1: free)
        self.free: list[int] = []
        self.used = 0  # overlay rows ever given out since the last fold
        self.count = 0  # overlay rows holding a cell

    def put(self, slots: np.ndarray, src: torch.Tensor | list[torch.Tensor]) -> int:
        """Hold ``src`` as the cells of ``slots`` (none of them in the overlay); returns the
        bytes copied."""
        k = len(slots)
        take = min(k, len(self.free))
        reused = self.free[len(self.free) - take :]
        del self.free[len(self.free) - take :]
        rows = np.array(reused + list(range(self.used, self.used + k - take)), dtype=np.int64)
        self.used += k - take
        cap = self.data.shape[0]
        if self.used > cap:
            size = max(self.used, 2 * cap)
            grown = torch.empty((size, *self.row_shape), dtype=self.dtype)
            grown[:cap].copy_(self.data)
            self.data = grown
            self.slot_of = np.concatenate([self.slot_of, np.full(size - cap, -1, np.int64)])
        need = int(slots.max()) + 1
        if need > self.where.size:
            where = np.zeros(max(need, 2 * self.where.size), dtype=np.int64)
            where[: self.where.size] = self.where
            self.where = where
        self.where[slots] = rows + 1
        self.slot_of[rows] = slots
        self.count += k
        return scatter(self.data, rows, src)

    def drop(self, slots: np.ndarray) -> None:
        """Forget the cells of ``slots`` (all in the overlay)."""
        rows = self.where[slots] - 1
        self.where[slots] = 0
        self.slot_of[rows] = -1
        self.free.extend(rows.tolist())
        self.count -= len(slots)
        if self.count == 0:
            self._reset()

    def rows(self, slots: np.ndarray) -> torch.Tensor:
        """The cells of ``slots`` (all in the overlay), as a new tensor (never a view)."""
        return gather_dense(self.data, self.where[slots] - 1, contiguous=False)

    def fold_into(self, buffer: torch.Tensor) -> int:
        """Write every overlay cell into ``buffer`` at its slot and empty the overlay (no
        view of ``buffer`` may be alive); returns the bytes copied."""
        if self.count == 0:
            return 0
        rows = np.flatnonzero(self.slot_of[: self.used] >= 0)
        slots = self.slot_of[rows]
        copied = scatter(buffer, slots, gather_dense(self.data, rows))
        self.where[slots] = 0
        self._reset()
        return copied
