"""The arrays and registries of one partition (driven by :mod:`.state`; no I/O).

Rows are partition-local and dense (``0..n-1``). A ``uint8`` state per row says whether it is
dead (dropped), pending (a reserved slot), in flight (allocated by an insert, not committed),
committed, or lost (its bytes lived on a storage unit that died). A dead row's id is reused
by a later insert once its bytes are known to be gone from the units (``recycle``), so memory
follows the live rows, not every row ever written; a row id is stable while its row lives.
Production bits per (row, field) and consumption bits per (task, row) are one byte per cell
in numpy arrays whose capacity grows geometrically; a first reservation gets exactly its size.
Each row also remembers the storage unit that holds its bytes (``-1``: none yet).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from transferqueue.errors import PartitionSealedError

__all__ = ["COMMITTED", "DEAD", "INFLIGHT", "LOST", "PENDING", "FieldSpec", "Partition"]

DEAD, PENDING, INFLIGHT, COMMITTED, LOST = 0, 1, 2, 3, 4
#: ``unit`` of a row that holds no bytes anywhere / of a dead row waiting in ``free``
NO_UNIT, FREE = -1, -2
_EMPTY_TAGS: Mapping[str, Any] = MappingProxyType({})
_MIN_CAPACITY = 16
_MIN_WINDOW = 256
_INF = float("inf")
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_ROWS.flags.writeable = False


@dataclass(frozen=True)
class FieldSpec:
    """What a field holds: dtype (``"torch.float32"``, ``"object"``) and per-row rank
    (``-1`` for non-tensor values)."""

    dtype: str
    ndim: int = -1

    def to_plain(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "ndim": self.ndim}

    @classmethod
    def from_plain(cls, value: Any) -> FieldSpec:
        """A spec from a FieldSpec, a ``{"dtype", "ndim"}`` dict or a ``(dtype, ndim)`` pair."""
        if isinstance(value, FieldSpec):
            return value
        if isinstance(value, Mapping) and "dtype" in value:
            return cls(str(value["dtype"]), int(value.get("ndim", -1)))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(str(value[0]), int(value[1]))
        raise TypeError(f"a field spec must be a FieldSpec, dict or (dtype, ndim), got {value!r}")


def live_mask(state: np.ndarray) -> np.ndarray:
    """Which of these row states are live: pending, in flight or committed."""
    return (state >= PENDING) & (state <= COMMITTED)


def rows_array(rows: Any) -> np.ndarray:
    arr = np.asarray(rows if not isinstance(rows, torch.Tensor) else rows.numpy())
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"rows must be a 1-D sequence of integers, got {rows!r}")
    return arr.astype(np.int64, copy=False)


def check_tags(tags: Sequence[Any] | None, n: int) -> list[Mapping[str, Any] | None]:
    if tags is None:
        return [None] * n
    tags = list(tags)
    if len(tags) != n:
        raise ValueError(f"got {len(tags)} tag dicts for {n} rows; give one per row")
    for t in tags:
        if t is not None and not isinstance(t, Mapping):
            raise TypeError(f"each row's tags must be a dict, got {type(t).__name__}")
        if t and not all(isinstance(k, str) for k in t):
            raise TypeError(f"tag names must be strings, got {list(t)!r}")
    return tags


class Partition:
    """The arrays and registries of one partition (see the module docstring)."""

    def __init__(self, pid: str, generation: int) -> None:
        self.pid = pid
        self.generation = generation
        self.expected_size = 0
        self.sealed = False
        self.n = 0
        self.state = np.zeros(0, dtype=np.uint8)
        self.prod: dict[str, np.ndarray] = {}
        self.specs: dict[str, FieldSpec] = {}
        self.cons: dict[str, np.ndarray] = {}
        #: rows handed to a task under a consumer lease (not consumed until acked)
        self.leased: dict[str, np.ndarray] = {}
        #: rows a task gets again before newer ones (nacked or their lease expired)
        self.requeued: dict[str, list[int]] = {}
        self.lwm: dict[str, int] = {}
        self.tags: list[dict[str, Any] | None] = []
        self.keys: dict[str, int] = {}
        self.row_keys: dict[int, str] = {}
        self.n_pending = 0
        self.pending_lo = 0
        self.unit = np.zeros(0, dtype=np.int16)
        #: dead rows whose bytes are gone from the units: reused lowest first (a heap)
        self.free: list[int] = []
        #: the unit the next allocated block of rows goes to (placement round robin)
        self.next_unit = 0
        #: staleness-bounded admission (None: a plain partition); see :mod:`.admission`
        self.max_staleness: int | None = None
        self.global_batch_size = 0
        self.version = 0
        self.admitted = 0
        #: the policy version each row was reserved under (-1: not reserved)
        self.row_version = np.zeros(0, dtype=np.int32)
        #: reserved rows whose admission was given back (evicted or dropped unseen)
        self.unadmitted: set[int] = set()

    # ------------------------------------------------------------ storage
    @property
    def capacity(self) -> int:
        return len(self.state)

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity, _MIN_CAPACITY)

        def grown(a: np.ndarray) -> np.ndarray:
            b = np.zeros(new_cap, dtype=a.dtype)
            b[: self.n] = a[: self.n]
            return b

        self.state = grown(self.state)
        unit = np.full(new_cap, NO_UNIT, dtype=np.int16)
        unit[: self.n] = self.unit[: self.n]
        self.unit = unit
        version = np.full(new_cap, -1, dtype=np.int32)
        version[: self.n] = self.row_version[: self.n]
        self.row_version = version
        self.prod = {f: grown(a) for f, a in self.prod.items()}
        self.cons = {t: grown(a) for t, a in self.cons.items()}
        self.leased = {t: grown(a) for t, a in self.leased.items()}

    def add_rows(self, count: int, code: int) -> np.ndarray:
        # a first reservation gets exactly its size; later growth is geometric
        self._grow(self.n + count)
        rows = np.arange(self.n, self.n + count, dtype=np.int64)
        self.state[self.n : self.n + count] = code
        self.tags.extend([None] * count)
        self.n += count
        return rows

    def take_free(self, count: int) -> np.ndarray:
        """Up to ``count`` recycled dead rows (lowest first), now in flight."""
        got = [heapq.heappop(self.free) for _ in range(min(count, len(self.free)))]
        rows = np.array(got, dtype=np.int64)
        if len(rows):
            self.state[rows] = INFLIGHT
            self.unit[rows] = NO_UNIT
            for t, lwm in self.lwm.items():  # a reused row below a task's mark is unconsumed
                self.lwm[t] = min(lwm, int(rows[0]))
        return rows

    def recycle(self, rows: np.ndarray) -> None:
        """Dead ``rows`` whose bytes are gone from every unit may be reused (others and
        rows already waiting for reuse are left alone)."""
        rows = rows[(rows >= 0) & (rows < self.n)]
        rows = np.unique(rows[(self.state[rows] == DEAD) & (self.unit[rows] != FREE)])
        self.unit[rows] = FREE
        for r in rows.tolist():
            heapq.heappush(self.free, r)

    def task(self, task: str) -> np.ndarray:
        if task not in self.cons:
            self.cons[task] = np.zeros(self.capacity, dtype=bool)
            self.leased[task] = np.zeros(self.capacity, dtype=bool)
            self.lwm[task] = 0
        return self.cons[task]

    def nbytes(self) -> int:
        arrays: list[np.ndarray] = [self.state, self.unit, self.row_version, *self.prod.values()]
        arrays += [*self.cons.values(), *self.leased.values()]
        return sum(a.nbytes for a in arrays) + 8 * len(self.tags)

    # ------------------------------------------------------------ scanning
    def scan(
        self, start: int, k: float, mask: Callable[[int, int], np.ndarray]
    ) -> tuple[np.ndarray, bool]:
        """Rows >= ``start`` where ``mask`` holds, scanning windows of doubling size until at
        least ``k`` are found (one window when ``k`` is infinite). Also returns whether the
        scan reached the last row."""
        n = self.n
        if k == _INF:
            return mask(start, n).nonzero()[0] + start, True
        found: list[np.ndarray] = []
        total, lo, width = 0, start, max(_MIN_WINDOW, 2 * int(k))
        while lo < n and total < k:
            hi = min(n, lo + width)
            idx = mask(lo, hi).nonzero()[0]
            if len(idx):
                found.append(idx + lo)
                total += len(idx)
            lo, width = hi, 2 * width
        if len(found) == 1:
            return found[0], lo >= n
        return (np.concatenate(found) if found else _NO_ROWS), lo >= n

    def first_unconsumed(self, task: str) -> int:
        """The lowest live row ``task`` has not consumed (``n`` when none)."""
        cons = self.task(task)
        lo, width = self.lwm[task], _MIN_WINDOW
        while lo < self.n:
            hi = min(self.n, lo + width)
            window = live_mask(self.state[lo:hi])
            window &= ~cons[lo:hi]
            first = int(window.argmax())
            if window[first]:
                return lo + first
            lo, width = hi, 2 * width
        return self.n

    def live(self) -> np.ndarray:
        return live_mask(self.state[: self.n])

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.live()).astype(np.int64)

    def check_rows(self, rows: np.ndarray, action: str) -> None:
        """``rows`` must be distinct rows in flight or committed."""
        if not len(rows):
            return
        if rows.min() < 0 or rows.max() >= self.n:
            bad = rows[(rows < 0) | (rows >= self.n)]
        else:
            st = self.state[rows]
            bad = rows[(st < INFLIGHT) | (st == LOST)]
        if len(bad):
            raise ValueError(
                f"cannot {action} rows {bad[:8].tolist()} of partition {self.pid!r}: they are "
                f"not rows in flight or committed (pending slots, dropped, lost or unknown rows)"
            )
        distinct = len(set(rows.tolist())) if len(rows) < 256 else len(np.unique(rows))
        if distinct != len(rows):
            raise ValueError(f"cannot {action}: rows repeat in {rows.tolist()[:16]}")

    def tag_view(self, row: int) -> Mapping[str, Any]:
        t = self.tags[row]
        return MappingProxyType(t) if t else _EMPTY_TAGS

    def merge_tags(self, rows: np.ndarray, tags: list[Mapping[str, Any] | None]) -> None:
        for r, t in zip(rows.tolist(), tags, strict=True):
            if t:
                cur = self.tags[r]
                if cur is None:
                    self.tags[r] = dict(t)
                else:
                    cur.update(t)

    # ------------------------------------------------------------ status
    @property
    def bounded(self) -> bool:
        """No row can be added any more: sealed, or its reservation is full (a partition
        under staleness-bounded admission grows by reservations: only a seal bounds it)."""
        if self.sealed:
            return True
        return self.max_staleness is None and self.expected_size > 0 and self.n_pending == 0

    def ready_mask(self, task: str, fields: Sequence[str], lo: int, hi: int) -> np.ndarray:
        """Rows in [lo, hi) committed with every field, not consumed by ``task`` and not
        leased to it."""
        mask = self.state[lo:hi] == COMMITTED
        for f in fields:
            col = self.prod.get(f)
            if col is None:
                return np.zeros(hi - lo, dtype=bool)
            np.logical_and(mask, col[lo:hi], out=mask)
        np.greater(mask, self.task(task)[lo:hi], out=mask)  # mask & ~consumed
        return np.greater(mask, self.leased[task][lo:hi], out=mask)  # & ~leased

    def exhausted(self, task: str) -> bool:
        if task not in self.cons:
            return self.bounded and not self.live().any()
        return self.bounded and self.first_unconsumed(task) >= self.n

    def mark_consumed(self, task: str, rows: np.ndarray) -> None:
        self.task(task)[rows] = True
        self.lwm[task] = self.first_unconsumed(task)

    def drop(self, rows: np.ndarray) -> None:
        """Rows become dead: bits, tags and keys go. A row that never held bytes is
        reusable at once; others after :meth:`recycle` (their bytes are gone)."""
        self.forget(rows)
        self.row_version[rows] = -1
        if self.unadmitted:
            self.unadmitted.difference_update(rows.tolist())
        self.state[rows] = DEAD
        self.recycle(rows[self.unit[rows] == NO_UNIT])

    def to_pending(self, rows: np.ndarray) -> None:
        """In-flight ``rows`` whose bytes are gone become pending slots again (a reserved
        slot keeps the version it was reserved under)."""
        self.forget(rows)
        for r in rows[self.row_version[rows] >= 0].tolist():
            self.tags[r] = {"version": int(self.row_version[r])}
        self.state[rows] = PENDING
        self.unit[rows] = NO_UNIT
        self.n_pending += len(rows)
        if len(rows):
            self.pending_lo = min(self.pending_lo, int(rows.min()))

    def forget(self, rows: np.ndarray) -> None:
        """Clear the bits, tags and keys of ``rows`` (their state is the caller's)."""
        self.n_pending -= int(np.count_nonzero(self.state[rows] == PENDING))
        for a in (*self.prod.values(), *self.cons.values(), *self.leased.values()):
            a[rows] = False
        for r in rows.tolist():
            self.tags[r] = None
            key = self.row_keys.pop(r, None)
            if key is not None:
                del self.keys[key]

    def take_pending(self, count: int) -> np.ndarray:
        def free_slot(lo: int, hi: int) -> np.ndarray:  # reserved slots wait for their put
            return (self.state[lo:hi] == PENDING) & (self.row_version[lo:hi] < 0)

        rows, _ = self.scan(self.pending_lo, count, free_slot)
        rows = rows[:count]
        if len(rows) < count:  # no free slot left below n
            self.pending_lo = self.n
        if len(rows):
            self.state[rows] = INFLIGHT
            self.n_pending -= len(rows)
            self.pending_lo = max(self.pending_lo, int(rows[-1]) + 1)
        return rows

    def reserve(self, size: int) -> None:
        if size == self.expected_size:
            return
        produced = int(np.count_nonzero(self.state[: self.n] == COMMITTED))
        if size < produced:
            raise ValueError(
                f"expected_size={size} is below the {produced} rows partition {self.pid!r} "
                f"has already produced"
            )
        if size > self.n:
            if self.sealed:
                raise PartitionSealedError(
                    f"partition {self.pid!r} is sealed: its reservation cannot grow"
                )
            self.n_pending += size - self.n
            self.pending_lo = min(self.pending_lo, self.n)
            self.add_rows(size - self.n, PENDING)
        elif size < self.expected_size:
            extra = np.flatnonzero(self.state[size : self.n] == PENDING) + size
            self.drop(extra.astype(np.int64))
        self.expected_size = size


def tag_filter(
    where: Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None,
) -> Callable[[Mapping[str, Any], int], bool] | None:
    """``where`` as a test of a row's tags: equality on each key, or a callable."""
    if where is None:
        return None
    if callable(where):
        fn = where
        return lambda tags, row: bool(fn(tags))
    if not isinstance(where, Mapping) or not all(isinstance(k, str) for k in where):
        raise TypeError(f"where must be a dict of tag name -> value, or a callable; got {where!r}")
    wanted = dict(where)
    missing = object()
    return lambda tags, row: all(tags.get(k, missing) == v for k, v in wanted.items())
