"""Jagged rows of one field packed end to end: a values buffer plus (start, length) per slot.

Rows of a jagged field share every dim but the first (``trail``). A write appends its rows to
the end of the buffer in one copy; a read gathers the requested rows with one
``index_select`` and returns values + offsets -- no tensor object per row either way.
Overwritten and cleared rows leave garbage that is compacted away (one gather) when more than
half of the buffer is garbage and the buffer would otherwise have to grow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from transferqueue.runtime import memory

_LONG_ROW = 256  # average entries per row from which a cat of slices beats an index

__all__ = [
    "JaggedArena",
    "gather_dense",
    "gather_jagged",
    "index_tensor",
    "is_range",
    "offsets_of",
]


def is_range(slots: torch.Tensor | np.ndarray) -> bool:
    """Whether ``slots`` (1-D, a tensor or a numpy array) is ``s0, s0+1, ..., s0+n-1``
    (then a slice replaces a gather)."""
    n = len(slots)
    if n == 0 or int(slots[-1]) - int(slots[0]) != n - 1:
        return False
    if n < 3:
        return True
    if isinstance(slots, np.ndarray):
        return bool((np.diff(slots) == 1).all())
    return bool((slots.diff() == 1).all())


def index_tensor(slots: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``slots`` as an int64 tensor for torch's index ops (a numpy array is not copied)."""
    return torch.from_numpy(slots) if isinstance(slots, np.ndarray) else slots


def word_rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``(rows, ...)`` tensor as ``(rows, k)`` words of the widest integer type
    that divides a row's bytes: index ops then work for every dtype (float8, uint16, ...)
    and move whole words, not bytes (4x faster than a byte view)."""
    rows = t.shape[0]
    row_bytes = t[0:1].numel() * t.element_size() if rows else 0
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row_bytes % size == 0 and t.element_size() <= size:
            return t.reshape(rows, -1).view(torch.uint8).view(dtype)
    return t.reshape(rows, -1).view(torch.uint8)


def gather_dense(
    buffer: torch.Tensor, slots: torch.Tensor | np.ndarray, contiguous: bool | None = None
) -> torch.Tensor:
    """``buffer[slots]``: a view for a range of slots, else a new tensor (``index_select``).

    ``contiguous``: ``is_range(slots)`` when the caller knows it already. A view shares the
    buffer's memory: the store never writes into cells a live view shows (see
    :mod:`._overlay`)."""
    if is_range(slots) if contiguous is None else contiguous:
        s0 = int(slots[0])
        return buffer[s0 : s0 + len(slots)]
    n = len(slots)
    if buffer[0:1].numel() == 0:
        return buffer.new_empty((n, *buffer.shape[1:]))
    words = word_rows(buffer).index_select(0, index_tensor(slots))
    return words.view(torch.uint8).view(buffer.dtype).view(n, *buffer.shape[1:])


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0+l1, ...]`` as int64."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def gather_jagged(
    values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``values[starts[i] : starts[i] + lengths[i]]`` packed: ``(values, offsets)``.

    ``starts`` and ``lengths`` are CPU int64 tensors; ``values`` may live on any device (the
    result does too; ``offsets`` are on the CPU).

    Contiguous rows: a view of ``values`` (an arena never writes into bytes it handed out:
    it appends past its end and compacts into a new buffer). Long rows (>= ``_LONG_ROW``
    entries on average): one ``cat`` of row slices. Short rows: one ``index_select`` with a per-entry index (building
    a view per row would cost more than the index).
    """
    offsets = offsets_of(lengths)
    total = int(offsets[-1])
    n = lengths.numel()
    if n and bool((starts[1:] == starts[:-1] + lengths[:-1]).all()):
        s0 = int(starts[0])
        return values[s0 : s0 + total], offsets
    if n and total >= _LONG_ROW * n:
        slices = [values[a : a + b] for a, b in zip(starts.tolist(), lengths.tolist(), strict=True)]
        return torch.cat(slices), offsets
    shift = torch.repeat_interleave(starts - offsets[:-1], lengths, output_size=total)
    index = torch.arange(total, dtype=torch.int64) + shift
    return values.index_select(0, index.to(values.device)), offsets


class JaggedArena:
    """The jagged rows (one ``trail`` shape and dtype) of one field in one partition.

    ``start`` / ``length`` per slot are numpy arrays (indexing a few slots costs ~1 us in
    numpy, 5-10 us per torch call); slots are numpy int64 arrays."""

    def __init__(self, trail: tuple[int, ...], dtype: torch.dtype) -> None:
        self.trail = trail
        self.dtype = dtype
        self.values = torch.empty((0, *trail), dtype=dtype)
        self.start = np.zeros(0, dtype=np.int64)
        self.length = np.zeros(0, dtype=np.int64)
        self.end = 0  # values[:end] are used (live rows and garbage)
        self.live = 0  # elements (first-dim entries) in live rows
        self.elem_bytes = torch.empty((1, *trail), dtype=dtype).nbytes

    def promote(self, dtype: torch.dtype) -> None:
        """Hold the rows in ``dtype`` from now on (a new buffer: views handed out stay)."""
        self.values = self.values.to(dtype)
        self.dtype = dtype
        self.elem_bytes = torch.empty((1, *self.trail), dtype=dtype).nbytes

    def accepts(self, trail: tuple[int, ...], dtype: torch.dtype) -> bool:
        return trail == self.trail and dtype == self.dtype

    def nbytes_at(self, slots: np.ndarray) -> int:
        """Bytes of the rows at ``slots`` (all held here)."""
        return int(self.length[slots].sum()) * self.elem_bytes

    def release(self, slots: np.ndarray) -> int:
        """Forget the rows at ``slots`` (all held here); returns their bytes."""
        n = int(self.length[slots].sum())
        self.length[slots] = 0
        self.live -= n
        return n * self.elem_bytes

    def append(
        self,
        slots: np.ndarray,
        parts: list[torch.Tensor],
        lengths: torch.Tensor,
        live_slots: Callable[[], np.ndarray],
    ) -> None:
        """Store rows (``parts`` concatenated, split by ``lengths``) at empty ``slots``.

        ``live_slots()`` lists the slots already held here (asked for only to compact).
        """
        lens = lengths.numpy()
        total = int(lens.sum())
        self._reserve(total, live_slots)
        dst = self.values[self.end : self.end + total]
        if len(parts) == 1:
            dst.copy_(parts[0])
        elif all(p.device.type == "cpu" for p in parts):
            torch.cat(parts, out=dst)
        else:
            dst.copy_(torch.cat(parts))
        need = int(slots.max()) + 1
        if need > self.start.size:
            size = max(need, 2 * self.start.size)
            self.start = _grown(self.start, size)
            self.length = _grown(self.length, size)
        self.start[slots] = self.end + np.cumsum(lens) - lens
        self.length[slots] = lens
        self.end += total
        self.live += total

    def gather(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, offsets)`` of the rows at ``slots`` (all held here), in that order."""
        starts = torch.from_numpy(self.start[slots])
        return gather_jagged(self.values, starts, torch.from_numpy(self.length[slots]))

    def _reserve(self, total: int, live_slots: Callable[[], np.ndarray]) -> None:
        cap = self.values.shape[0]
        if self.end + total <= cap:
            return
        if self.end - self.live > self.live:  # mostly garbage: compact instead of growing
            live = live_slots()
            values, offsets = self.gather(live)
            self.values, self.end = values, self.live
            self.start[live] = offsets[:-1].numpy()
            cap = values.shape[0]
            if self.end + total <= cap:
                return
        grown = memory.empty((max(self.end + total, 2 * cap), *self.trail), self.dtype)
        grown[: self.end].copy_(self.values[: self.end])
        self.values = grown


def _grown(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=a.dtype)
    out[: a.size] = a
    return out
