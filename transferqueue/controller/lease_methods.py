"""The controller's lease calls: a put's lease (``begin_put`` -> ``commit`` or
``abort_put``; the release of its rows), consumer leases (``ack`` / ``nack``) and the one
timer that ends leases at their deadlines. Mixed into
:class:`~transferqueue.controller.actor.ControllerActor`; the lease state itself is pure
(:mod:`.leases`, :mod:`.puts`, :mod:`.state`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from transferqueue.metadata import BatchMeta

if TYPE_CHECKING:
    from transferqueue.controller.leases import Release
    from transferqueue.controller.state import ControllerState

log = logging.getLogger("transferqueue.controller")

__all__ = ["LeaseMethods"]


class LeaseMethods:
    """Remote methods of put and consumer leases (see the module docstring)."""

    if TYPE_CHECKING:
        _state: ControllerState
        _clearing: dict[str, asyncio.Event]
        _block_when_full: bool
        _crossed: dict[str, int]
        _timer: asyncio.TimerHandle | None
        _timer_at: float

        _space: Any  # the actor's waiters for freed bytes

        async def _checkpoint_gate(
            self,
            pid: str,
            specs: Mapping[str, Any],
            rows: Sequence[int] | None,
            keys: Sequence[str] | None,
        ) -> None: ...
        def _track_release(self, rel: Release) -> Callable[[], None]: ...
        def _alive_units(self) -> list[int]: ...
        async def _on_units(
            self, calls: Mapping[int, tuple[Any, ...]], committed: bool = True
        ) -> None: ...
        def _changed(self, pid: str) -> None: ...
        def _own(self, coro: Any, what: str) -> None: ...

    async def begin_put(
        self,
        pid: str,
        specs: Mapping[str, Any],
        n: int = 0,
        rows: Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
        tags: Sequence[Mapping[str, Any] | None] | None = None,
        nbytes: int = 0,
        client: str = "",
        node: str | None = None,
    ) -> dict[str, Any]:
        """Validate a put and give it rows under a put lease: ``rows`` (existing rows),
        ``keys`` (rows of those keys, new ones allocated) or ``n`` new rows. Returns the
        lease id, the rows and their units, the rows allocated here (``fresh``) and the
        lease's seconds (``ttl``): the writes must land and the commit arrive within them."""
        await self._checkpoint_gate(pid, specs, rows, keys)
        clearing = self._clearing.get(pid)
        if clearing is not None:
            await clearing.wait()
        capacity = self._state.capacity
        if self._block_when_full and not capacity.fits(nbytes) and capacity.can_ever_fit(nbytes):
            while not capacity.fits(nbytes):  # woken by clears and releases, never polling
                await self._space.wait(None)
        lease = self._state.begin_put(
            pid, specs, now=time.time(), n=n, rows=rows, keys=keys, tags=tags,
            nbytes=nbytes, client=client, node=node,
        )  # fmt: skip
        self._arm_expiry()
        return {
            "lease": lease.lease,
            "rows": lease.rows.tolist(),
            "units": lease.units.tolist(),
            "fresh": lease.fresh.tolist(),
            "ttl": self._state.put_lease_s,
            # fields the partition holds in a wider dtype: the client writes them so
            "dtypes": self._state.target_dtypes(pid, lease.specs),
        }

    async def commit(
        self, pid: str, lease: int, net_bytes: int = 0, crossed_bytes: int = 0
    ) -> BatchMeta:
        """Publish the put of ``lease``. A refused commit releases the lease at once.
        A put that widens a field's dtype has every unit convert the rows it holds first, so
        that a get returns the field's one dtype once the commit is visible.
        ``crossed_bytes``: the bytes the writer sent to units on other nodes."""
        try:
            widened = self._state.widened(lease)
            if widened:
                calls = {u: ("promote", pid, widened) for u in self._alive_units()}
                await self._on_units(calls)  # the bytes they grew by count as stored
            meta = self._state.commit_put(lease, net_bytes)
        except Exception:
            await self._end(lease, "aborted")
            raise
        if crossed_bytes:
            self._crossed[pid] = self._crossed.get(pid, 0) + int(crossed_bytes)
        self._changed(pid)
        return meta

    async def abort_put(self, pid: str, lease: int) -> list[int]:
        """End ``lease`` without publishing; returns the rows actually released ([] when
        the lease had already ended -- e.g. it committed and the reply was lost)."""
        return await self._end(lease, "aborted")

    async def _end(self, lease: int, reason: str) -> list[int]:
        rel = self._state.end_lease(lease, reason)
        return [] if rel is None else await self._drain(rel)

    async def _drain(self, rel: Release) -> list[int]:
        """Clear the bytes of released rows from their units, then give the rows back."""
        groups = rel.by_unit()
        calls = {u: ("clear_rows", rel.pid, rows) for u, rows in groups.items()}
        forget = self._track_release(rel)  # a snapshot meanwhile sees its slots as pending
        try:
            await self._on_units(calls, committed=False)
        finally:
            forget()
        released = self._state.finish_release(rel)
        self._changed(rel.pid)
        return released

    def _arm_expiry(self) -> None:
        """One timer, at the earliest lease deadline (put or consumer lease). A new lease
        ends after the ones before it, so on the hot path the timer set stays: it is only
        moved earlier (a timer for a lease that ended meanwhile fires, finds nothing and
        re-arms)."""
        deadline = self._state.next_deadline()
        if deadline is None or (self._timer is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        delay = max(0.0, deadline - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_expiry)

    def _on_expiry(self) -> None:
        self._timer = None
        now = time.time()
        for rel in self._state.expire(now):
            log.warning(
                "put lease of %d row(s) of partition %r expired: released", len(rel.rows), rel.pid
            )
            self._own(self._drain(rel), "releasing the rows of an expired put lease")
        for pid in self._state.expire_consumers(now):  # their rows are ready again
            self._changed(pid)
        self._arm_expiry()

    # ------------------------------------------------------------ consumer leases
    async def ack(self, pid: str, lease: int, rows: Sequence[int] | None = None) -> dict[str, Any]:
        """Rows of a consumer lease are consumed; reports rows no longer leased under it."""
        result = self._state.ack(pid, lease, rows)
        if result["acked"]:
            self._changed(pid)  # the stream may have ended
        return result

    async def nack(self, pid: str, lease: int) -> int:
        """Give a consumer lease's rows back at once (handed out again first)."""
        count = self._state.nack(pid, lease)
        if count:
            self._changed(pid)
        return count
