"""Consumer leases: at-least-once delivery with ack / nack / requeue (pure; no I/O).

Opt-in per ``get_meta`` call (``lease_s``): the rows handed out are *leased* to the task
instead of consumed. ``ack`` marks them consumed; ``nack`` gives them back at once; a lease
whose deadline passes gives them back too. Rows given back go to the front of the task's
ready set (``Partition.requeued``), so they are handed out before newer rows. A stream ends
only when every live row is acked (leased rows are not consumed).

Guarantee: every row is acked at most once per task (an ack of a lease that ended -- acked
before, nacked, expired -- acks nothing and is reported as such), and a row is delivered
again only after its lease expired or was nacked.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from transferqueue.controller.leases import ConsumerLease, LeaseTable
from transferqueue.controller.partition import Partition

__all__ = ["Delivery"]

#: ended leases remembered (oldest forgotten first), to report a second ack precisely
_ENDED_KEPT = 4096


class Delivery:
    """Consumer leases of every partition of one controller."""

    def __init__(self) -> None:
        self.leases: LeaseTable[ConsumerLease] = LeaseTable()
        self._ended: OrderedDict[int, str] = OrderedDict()  # lease -> "acked"/"nacked"/...
        #: rows handed out again per (partition, task)
        self.redelivered: Counter[tuple[str, str]] = Counter()

    def lease(
        self,
        part: Partition,
        task: str,
        rows: np.ndarray,
        *,
        now: float,
        lease_s: float,
        client: str = "",
    ) -> ConsumerLease:
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or lease_s <= 0:
            raise ValueError(f"lease_s must be a number of seconds > 0, got {lease_s!r}")
        part.task(task)
        part.leased[task][rows] = True
        lease = ConsumerLease(
            lease=self.leases.new_id(),
            pid=part.pid,
            generation=part.generation,
            task=task,
            rows=set(rows.tolist()),
            deadline=now + lease_s,
            client=client,
        )
        self.leases.add(lease)
        return lease

    def _end(self, lease: ConsumerLease, fate: str) -> None:
        self.leases.pop(lease.lease)
        self._ended[lease.lease] = fate
        while len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)

    def _live_rows(
        self, part: Partition | None, lease: ConsumerLease, rows: np.ndarray
    ) -> np.ndarray:
        """The rows of ``lease`` among ``rows`` that are still leased to its task."""
        if part is None or part.generation != lease.generation or not len(rows):
            return rows[:0]
        rows = rows[(rows >= 0) & (rows < part.n)]
        return rows[part.leased[lease.task][rows]]

    def ack(
        self, part: Partition | None, lease_id: int, rows: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Mark ``rows`` of the lease (all of it by default) consumed. Returns
        ``{"acked": n, "not_leased": m}``: rows not (any more) leased under it -- the lease
        ended (acked before, nacked, expired and perhaps delivered again) -- are not acked
        again; they are counted in ``not_leased`` and ``ended`` says how the lease ended."""
        asked = None if rows is None else {int(r) for r in rows}
        lease = self.leases.get(lease_id)
        if lease is None:
            ended = self._ended.get(lease_id, "unknown")
            return {"acked": 0, "not_leased": len(asked or ()), "ended": ended}
        mine = lease.rows if asked is None else asked & lease.rows
        live = self._live_rows(part, lease, np.array(sorted(mine), dtype=np.int64))
        if part is not None and len(live):
            part.leased[lease.task][live] = False
            part.mark_consumed(lease.task, live)
        lease.rows = lease.rows - mine
        if not lease.rows:
            self._end(lease, "acked")
        asked_n = len(mine) if asked is None else len(asked)
        return {"acked": len(live), "not_leased": asked_n - len(live), "ended": ""}

    def give_back(self, part: Partition | None, lease: ConsumerLease, fate: str) -> int:
        """End ``lease`` without acking: its rows go back to the front of the task's ready
        set. Returns the rows given back."""
        self._end(lease, fate)
        live = self._live_rows(part, lease, np.array(sorted(lease.rows), dtype=np.int64))
        if part is None or not len(live):
            return 0
        part.leased[lease.task][live] = False
        queue = part.requeued.setdefault(lease.task, [])
        queue[:0] = live.tolist()
        self.redelivered[(lease.pid, lease.task)] += len(live)
        return len(live)

    def nack(self, part: Partition | None, lease_id: int) -> int:
        lease = self.leases.get(lease_id)
        return 0 if lease is None else self.give_back(part, lease, "nacked")

    def expired(self, now: float) -> list[ConsumerLease]:
        return self.leases.expired(now)

    def rows_in_hand(self, part: Partition, task: str, group: str) -> list[int]:
        """Rows still leased to ``task`` under leases of lease group ``group``."""
        out: list[int] = []
        leased = part.leased.get(task)
        for lease in self.leases.values():
            if lease.pid == part.pid and lease.task == task and lease.client == group:
                out += [r for r in lease.rows if r < part.n and leased is not None and leased[r]]
        return out

    def leased_counts(self, part: Partition) -> dict[str, int]:
        n = part.n
        return {t: int(np.count_nonzero(a[:n])) for t, a in part.leased.items() if a[:n].any()}
