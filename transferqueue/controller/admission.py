"""Staleness-bounded admission, the AReaL rule (pure; no I/O, no asyncio).

A partition created with ``max_staleness=k`` and ``global_batch_size=B`` carries the
trainer's policy version ``v`` (from 0; ``advance_version`` moves it on). Producers
``reserve`` slots before they generate; a reservation is admitted while the samples admitted
so far plus it stay within ``(v + k + 1) * B`` -- at most k versions of work ahead of the
trainer. With k = 0 rollout and training alternate exactly (synchronous RL). A reserved
slot is a pending row that only the reservation's own put fills (``put(data,
metadata=reserved)``); it remembers the version it was reserved under (its ``version`` tag),
so consumers can skip or evict rows that are too old (``get_meta(max_version_lag=j)``).
Such a partition grows by reservations, so only ``seal`` bounds it (ends its streams).
"""

from __future__ import annotations

import numpy as np

from transferqueue.controller.partition import PENDING, Partition

__all__ = ["advance", "configure", "give_back", "reserve", "room"]


def configure(part: Partition, max_staleness: int | None, global_batch_size: int | None) -> None:
    if max_staleness is None and global_batch_size is None:
        return
    if max_staleness is None or global_batch_size is None:
        raise ValueError("max_staleness and global_batch_size go together: give both")
    for name, value, low in (
        ("max_staleness", max_staleness, 0),
        ("global_batch_size", global_batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if part.max_staleness is not None and (
        (part.max_staleness, part.global_batch_size) != (max_staleness, global_batch_size)
    ):
        raise ValueError(
            f"partition {part.pid!r} already has max_staleness={part.max_staleness}, "
            f"global_batch_size={part.global_batch_size}"
        )
    part.max_staleness, part.global_batch_size = max_staleness, global_batch_size


def room(part: Partition) -> int | None:
    """Samples that may still be admitted now (None: no bound)."""
    if part.max_staleness is None:
        return None
    limit = (part.version + part.max_staleness + 1) * part.global_batch_size
    return max(0, limit - part.admitted)


def reserve(part: Partition, n: int, version: int) -> np.ndarray:
    """``n`` pending slots reserved under ``version`` (the caller checked :func:`room`)."""
    rows = part.take_free(n) if part.free else np.zeros(0, dtype=np.int64)
    if len(rows):
        part.state[rows] = PENDING
    if len(rows) < n:
        rows = np.concatenate([rows, part.add_rows(n - len(rows), PENDING)])
    part.n_pending += n
    part.expected_size += n
    part.admitted += n
    part.row_version[rows] = version
    for r in rows.tolist():
        part.tags[r] = {"version": version}
    return rows


def give_back(part: Partition, rows: np.ndarray) -> None:
    """Reserved ``rows`` that were evicted or dropped unseen (too stale, or a group filter
    found no signal) no longer count against the window: only accepted samples do, as in
    AReaL, so rejections cannot starve the trainer and the producers together."""
    if part.max_staleness is None:
        return
    mine = [r for r in rows.tolist() if part.row_version[r] >= 0 and r not in part.unadmitted]
    part.unadmitted.update(mine)
    part.admitted -= len(mine)


def advance(part: Partition) -> int:
    part.version += 1
    return part.version
