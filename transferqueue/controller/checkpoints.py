"""The controller's side of checkpoints: a hold for a save, a staged restore for a load.

Mixed into :class:`~transferqueue.controller.actor.ControllerActor` (the pure part is
:mod:`.snapshot`; the files and the client's orchestration are
:mod:`transferqueue.ops.checkpoint`).

**Save.** ``checkpoint_begin`` starts a *hold* (one at a time; a second save waits for the
first), waits for puts that rewrite committed rows to end, and takes the snapshot at one
instant of the event loop. Until ``checkpoint_end`` (or until the hold's ``ttl`` passes
without a ``checkpoint_renew``: the saver died), the bytes of the snapshot's rows stay as
they were: puts that would rewrite them wait, and clears drop rows from the state at once
but free their bytes -- and let their row ids be reused -- only when the hold ends. Puts of
new rows go on (they are not in the snapshot).

**Load.** ``checkpoint_restore_begin`` refuses a system that holds partitions with rows
(:class:`SystemNotEmptyError`) unless ``overwrite`` (then it clears them), places the
checkpoint's rows on the live units and returns the placement; puts into those partitions
wait. The client writes the bytes to the units, then ``checkpoint_restore_commit``
publishes every partition in one step (write, then publish). An abort, or a restore not
renewed within its ``ttl``, clears what was written.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferqueue.controller import snapshot
from transferqueue.errors import CheckpointError, SystemNotEmptyError

if TYPE_CHECKING:
    from transferqueue.controller.leases import Release
    from transferqueue.controller.state import ControllerState

log = logging.getLogger("transferqueue.controller")

__all__ = ["CheckpointMethods"]

#: seconds added to the put lease to wait for update puts before a snapshot
_UPDATE_MARGIN_S = 5.0


class _Broadcast:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class CheckpointMethods:
    """Remote methods of checkpoints (see the module docstring)."""

    if TYPE_CHECKING:
        _state: ControllerState
        _clearing: dict[str, asyncio.Event]

        async def _until(
            self, pid: str, ready: Callable[[], Any], timeout: float | None, late: str
        ) -> Any: ...
        async def _on_units(
            self, calls: Mapping[int, tuple[Any, ...]], committed: bool = True
        ) -> None: ...
        async def clear_partition(self, pid: str) -> None: ...
        def _changed(self, pid: str) -> None: ...
        def _own(self, coro: Any, what: str) -> None: ...
        def _alive_units(self) -> list[int]: ...

    def _init_checkpoints(self) -> None:
        self._ckpt_ids = itertools.count(1)
        self._ckpt_timers: dict[int, asyncio.TimerHandle] = {}
        self._hold = 0  # the live save's hold (0: none)
        self._held: dict[str, np.ndarray] | None = None  # its rows, once snapshotted
        self._hold_changed = _Broadcast()
        self._draining: dict[int, Release] = {}  # releases whose bytes are being cleared
        self._restores: dict[int, tuple[Any, Any, int]] = {}
        self._restoring: dict[str, asyncio.Event] = {}  # partitions being restored

    # ------------------------------------------------------------------ timers
    def _arm(self, op: int, ttl: float, expire: Callable[[int], Any]) -> None:
        old = self._ckpt_timers.pop(op, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._ckpt_timers[op] = loop.call_later(max(ttl, 0.001), expire, op)

    def _disarm(self, op: int) -> None:
        timer = self._ckpt_timers.pop(op, None)
        if timer is not None:
            timer.cancel()

    async def checkpoint_renew(self, op: int, ttl: float) -> bool:
        """Extend a live hold or restore by ``ttl`` seconds; False if it already ended."""
        if op != self._hold and op not in self._restores:
            return False
        self._arm(op, ttl, self._expired)
        return True

    def _expired(self, op: int) -> None:
        self._ckpt_timers.pop(op, None)
        if op == self._hold:
            log.warning("checkpoint hold %d expired (the saving client is gone?): released", op)
            self._end_hold(op)
        elif op in self._restores:
            log.warning("checkpoint restore %d expired (the loading client is gone?)", op)
            self._own(self.checkpoint_restore_abort(op), "aborting an expired checkpoint load")

    # ------------------------------------------------------------------ save
    async def checkpoint_begin(self, ttl: float) -> dict[str, Any]:
        """Start a hold and snapshot every partition (see the module docstring). Returns
        ``{"hold", "partitions", "units"}``: the plain snapshot and, per partition, the unit
        of each row (for reading the bytes; not saved)."""
        while self._hold:
            await self._hold_changed.wait()
        hold = self._hold = next(self._ckpt_ids)
        self._held = None
        self._arm(hold, ttl, self._expired)
        try:
            timeout = self._state.put_lease_s + _UPDATE_MARGIN_S
            while busy := snapshot.updates_in_flight(self._state):
                await self._until(
                    busy[0], self._no_update_in(busy[0]), timeout,
                    f"a put rewriting rows of partition {busy[0]!r} did not end in {timeout} s",
                )  # fmt: skip
            plain = snapshot.take(self._state, self._draining.values())
        except BaseException:
            self._end_hold(hold)
            raise
        self._held = snapshot.held_rows(plain)
        units = {p["pid"]: self._units_of(p["pid"], p["n"]) for p in plain}
        return {"hold": hold, "partitions": plain, "units": units}

    def _no_update_in(self, pid: str) -> Callable[[], bool | None]:
        def ready() -> bool | None:
            return None if pid in snapshot.updates_in_flight(self._state) else True

        return ready

    def _units_of(self, pid: str, n: int) -> torch.Tensor:
        part = self._state._parts[pid]
        return torch.from_numpy(part.unit[:n].astype(np.int64))

    async def checkpoint_end(self, hold: int) -> None:
        """The save has read its bytes: end the hold (deferred clears run now)."""
        self._end_hold(hold)

    def _end_hold(self, hold: int) -> None:
        if hold != self._hold:
            return
        self._disarm(hold)
        self._hold, self._held = 0, None
        self._hold_changed.changed()

    def _hold_blocks(
        self, pid: str, specs: Any, rows: Sequence[int] | None, keys: Sequence[str] | None
    ) -> bool:
        """Whether a put must wait for the hold: it writes bytes of rows the save holds."""
        if not self._hold or not specs or (rows is None and keys is None):
            return False
        if self._held is None:  # the snapshot is not taken yet: any row may be in it
            return True
        mask = self._held.get(pid)
        if mask is None:
            return False
        found = rows if rows is not None else self._state.rows_of_present_keys(pid, keys or [])
        arr = np.asarray(list(found), dtype=np.int64)
        arr = arr[(arr >= 0) & (arr < len(mask))]
        return bool(mask[arr].any())

    async def _checkpoint_gate(
        self, pid: str, specs: Any, rows: Sequence[int] | None, keys: Sequence[str] | None
    ) -> None:
        """Called first by ``begin_put``: wait while a load restores ``pid`` or the put
        would rewrite bytes a save holds."""
        restoring = self._restoring.get(pid)
        if restoring is not None:
            await restoring.wait()
        while self._hold_blocks(pid, specs, rows, keys):
            await self._hold_changed.wait()

    async def _after_hold(self) -> None:
        while self._hold:
            await self._hold_changed.wait()

    def _track_release(self, rel: Release) -> Callable[[], None]:
        """A release is being drained (its slots go back to pending: a snapshot needs
        them); returns the call that forgets it."""
        key = id(rel)
        self._draining[key] = rel

        def forget() -> None:
            self._draining.pop(key, None)

        return forget

    # ------------------------------------------------------------------ load
    async def checkpoint_restore_begin(
        self, partitions: list[dict[str, Any]], nbytes: int, overwrite: bool, ttl: float
    ) -> dict[str, Any]:
        """Stage a restore of ``partitions`` (a plain snapshot); returns ``{"restore",
        "units"}``: the placement of every row, for the client to write the bytes."""
        plain = snapshot.check(partitions)
        if self._restores:
            raise CheckpointError("another checkpoint load into this system is in progress")
        # partitions without a row (made by a consumer waiting for them) do not count:
        # one the checkpoint brings is replaced, its waiters woken
        existing = [p for p in self._state.list_partitions() if snapshot.has_rows(self._state, p)]
        if existing and not overwrite:
            raise SystemNotEmptyError(
                f"cannot load a checkpoint into a system that holds partitions "
                f"{existing[:8]}{' ...' if len(existing) > 8 else ''}: load into a fresh "
                f"system, or pass overwrite=True to clear them first"
            )
        await self._after_hold()  # a save's deferred clears would wipe restored bytes
        for pid in existing:
            await self.clear_partition(pid)
        for p in plain:  # bytes of a partition of that id still being cleared
            clearing = self._clearing.get(p["pid"])
            if clearing is not None:
                await clearing.wait()
        if self._restores:
            raise CheckpointError("another checkpoint load into this system is in progress")
        self._state.capacity.check(nbytes)
        self._state.capacity.reserve(nbytes)
        generations = [next(self._state._generations) for _ in plain]
        parts = snapshot.build(plain, self._state.placement, generations)
        restore = next(self._ckpt_ids)
        self._restores[restore] = (parts, plain, nbytes)
        for pid in parts:
            self._restoring[pid] = asyncio.Event()
        self._arm(restore, ttl, self._expired)
        units = {pid: torch.from_numpy(p.unit[: p.n].astype(np.int64)) for pid, p in parts.items()}
        return {"restore": restore, "units": units}

    async def checkpoint_restore_commit(self, restore: int, net_bytes: int) -> list[str]:
        """The bytes are on the units: publish every restored partition in one step."""
        entry = self._restores.get(restore)
        if entry is None:
            raise CheckpointError(
                "the checkpoint load ended before its commit (it expired: was the loading "
                "client too slow?): nothing was published; load again"
            )
        parts, plain, nbytes = entry
        busy = [pid for pid in parts if snapshot.has_rows(self._state, pid)]
        if busy:
            await self.checkpoint_restore_abort(restore)
            raise CheckpointError(
                f"partitions {busy[:8]} got rows while the checkpoint was loading: nothing "
                f"was published; clear them (or load with overwrite=True) and load again"
            )
        del self._restores[restore]
        self._disarm(restore)
        snapshot.install(self._state, parts, plain)
        self._state.capacity.settle(nbytes, net_bytes)
        for pid in parts:
            self._restoring.pop(pid).set()
            self._changed(pid)
        return list(parts)

    async def checkpoint_restore_abort(self, restore: int) -> None:
        """Give up a staged restore: the bytes written for it are cleared."""
        entry = self._restores.pop(restore, None)
        if entry is None:
            return
        self._disarm(restore)
        parts, _, nbytes = entry
        self._state.capacity.settle(nbytes, 0)
        try:
            for pid in parts:
                calls = {u: ("clear_partition", pid) for u in self._alive_units()}
                await self._on_units(calls, committed=False)
        finally:
            for pid in parts:
                self._restoring.pop(pid).set()
