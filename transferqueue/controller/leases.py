"""Leases: time-bounded claims on rows (pure; no I/O, no asyncio).

Put leases: the claim a put holds on its rows.

A put allocates rows (``begin_put``), writes their bytes to the storage units, then commits.
Between the first and the last step its rows are *in flight* under a :class:`PutLease`:
the put's client, the rows it writes, which of them it allocated (``fresh``) and which of
those were pending slots (``slots``), the unit of each row, the tags and field specs it will
publish, the bytes it reserved and its deadline. The lease ends in exactly one way:

* commit -- the rows are published (fields and tags ready in one step);
* abort -- the put failed and said so;
* expiry -- the deadline passed first (the writer died, hangs or was cut off).

An aborted or expired lease yields a :class:`Release`: its fresh rows stay in flight until
their bytes are cleared from the units, then slots go back to pending and appended rows are
dropped (reusable). Rows are never handed to another put while old bytes may still be on
their way to a unit.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

L = TypeVar("L", bound=Any)

__all__ = ["ConsumerLease", "LeaseTable", "PutLease", "PutLeases", "Release"]


@dataclass
class PutLease:
    lease: int
    pid: str
    generation: int
    rows: np.ndarray
    fresh: np.ndarray
    slots: np.ndarray
    #: the unit of each row of ``rows``
    units: np.ndarray
    specs: Mapping[str, Any]
    tags: list[Any] | None
    nbytes: int
    deadline: float
    client: str = ""


@dataclass
class Release:
    """Rows an ended lease gives back, once their bytes are gone from ``units``."""

    pid: str
    generation: int
    rows: np.ndarray
    units: np.ndarray
    slots: np.ndarray
    #: why: "aborted" or "expired"
    reason: str = "aborted"

    def by_unit(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for r, u in zip(self.rows.tolist(), self.units.tolist()):
            if u >= 0:
                out.setdefault(u, []).append(r)
        return out


@dataclass
class ConsumerLease:
    """Rows handed to a task under a consumer lease: not consumed until acked; back to the
    task's ready set (first) on nack or when ``deadline`` passes."""

    lease: int
    pid: str
    generation: int
    task: str
    rows: set[int]
    deadline: float
    client: str = ""


@dataclass
class LeaseTable(Generic[L]):
    """Live leases (anything with ``lease`` and ``deadline``), by id, deadlines in a heap."""

    _live: dict[int, L] = field(default_factory=dict)
    _deadlines: list[tuple[float, int]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._live)

    def new_id(self) -> int:
        return int(next(self._ids))

    def add(self, lease: L) -> None:
        self._live[lease.lease] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.lease))

    def get(self, lease_id: int) -> L | None:
        return self._live.get(lease_id)

    def pop(self, lease_id: int) -> L | None:
        return self._live.pop(lease_id, None)

    def values(self) -> list[L]:
        return list(self._live.values())

    def expired(self, now: float) -> list[L]:
        """Remove and return the leases whose deadline is at or before ``now``."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lease_id = heapq.heappop(self._deadlines)
            lease = self._live.pop(lease_id, None)
            if lease is not None:
                out.append(lease)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of a live lease (ended ones are dropped from the heap)."""
        while self._deadlines and self._deadlines[0][1] not in self._live:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None


class PutLeases(LeaseTable[PutLease]):
    """The live put leases."""

    def in_flight(self, pid: str) -> int:
        return sum(len(lease.fresh) for lease in self._live.values() if lease.pid == pid)
