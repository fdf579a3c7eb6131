"""The controller actor: a thin async shell over :class:`ControllerState`.

It translates requests into state calls and owns the waiting: one :class:`_Waiters` per
partition, woken after every change (commit, seal, clear, reset, ...), never by a timer.
Waiters of one (partition, task, rank, batch_index) are served in arrival order.

It also owns what needs the storage units: clearing the bytes of dropped and released rows
before their ids are reused (:meth:`_drain`), a timer at the earliest put-lease deadline
(it fires when a lease must end, it never polls; a checkpoint hold or load has one of its
own, :mod:`.checkpoints`), and one long-lived ``watch`` call per unit whose failure with
``ActorDiedError`` tells the controller the unit died (its rows are then reported lost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from transferqueue.controller.checkpoints import CheckpointMethods
from transferqueue.controller.kv_methods import KvMethods
from transferqueue.controller.lease_methods import LeaseMethods
from transferqueue.controller.state import ControllerState
from transferqueue.errors import ActorDiedError, PartitionNotFoundError
from transferqueue.metadata import BatchMeta, PartitionInfo
from transferqueue.runtime.actor import ActorRef, Address
from transferqueue.runtime.loop import background

log = logging.getLogger("transferqueue.controller")
T = TypeVar("T")

#: seconds a storage unit reported dead has to answer before its rows are declared lost
_CONFIRM_TIMEOUT_S = 2.0
#: tokens of withdrawn calls that have not arrived kept at most (oldest forgotten first)
_WITHDRAWN_KEPT = 4096


class _Waiters:
    """A broadcast: ``changed()`` wakes everyone awaiting ``wait()``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None) -> None:
        await asyncio.wait_for(self._event.wait(), timeout)


class ControllerActor(CheckpointMethods, LeaseMethods, KvMethods):
    """Remote methods of the control plane (see :class:`AsyncTransferQueueClient`);
    checkpoints: :class:`CheckpointMethods`."""

    def __init__(
        self,
        pre_allocate: int = 0,
        sampler: Any = "sequential",
        *,
        num_units: int = 1,
        stripe_rows: int = 128,
        capacity_bytes: int | None = None,
        block_when_full: bool = False,
        put_lease_s: float = 60.0,
    ) -> None:
        self._state = ControllerState(
            default_expected_size=pre_allocate,
            sampler=sampler,
            num_units=num_units,
            stripe_rows=stripe_rows,
            capacity_bytes=capacity_bytes,
            put_lease_s=put_lease_s,
        )
        self._block_when_full = block_when_full
        self._waiters: dict[str, _Waiters] = {}
        self._queues: dict[tuple[Any, ...], deque[object]] = {}
        self._system: dict[str, Any] = {}
        self._waiting: dict[str, str] = {}  # token of a waiting get_meta -> its partition
        self._withdrawn: OrderedDict[str, None] = OrderedDict()  # tokens cancel_wait named
        self._units: list[ActorRef] = []
        self._tasks: set[asyncio.Future[Any]] = set()  # unit watchers, drains
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # the wall-clock deadline the timer is set for
        self._space = _Waiters()  # woken when bytes are freed
        self._clearing: dict[str, asyncio.Event] = {}  # partitions whose bytes are going
        self._reserving: dict[str, int] = {}  # reserve calls waiting for room, per partition
        self._init_checkpoints()
        self._crossed: dict[str, int] = {}  # bytes committed puts sent across nodes

    def _changed(self, pid: str) -> None:
        waiters = self._waiters.get(pid)
        if waiters is not None:
            waiters.changed()

    def _own(self, coro: Any, what: str) -> None:
        task = background(coro, what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for timer in self._ckpt_timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ system
    async def set_system(self, info: Mapping[str, Any]) -> None:
        self._system = dict(info)
        self._units = [ActorRef(Address.from_plain(u)) for u in info.get("units", [])]
        self._state.placement.set_nodes(info.get("unit_nodes"))
        for i, ref in enumerate(self._units):
            self._own(self._watch(i, ref), f"watching storage unit {i}")

    async def _watch(self, unit: int, ref: ActorRef) -> None:
        """A call that never returns while the unit lives: its failure says it may have died
        (confirmed before its rows are declared lost; a unit that answers is watched on)."""
        while True:
            try:
                await ref.call("watch", timeout=None)
            except ActorDiedError:
                if await self._confirm_dead(unit):
                    return

    async def _confirm_dead(self, unit: int) -> bool:
        """Ask the unit itself: only a unit that cannot be reached any more is dead (a
        missed heartbeat on a loaded host is not death). Marks it dead if so."""
        if unit in self._state.placement.dead:
            return True
        try:
            await self._units[unit].call("stats", timeout=_CONFIRM_TIMEOUT_S)
        except ActorDiedError:
            self._unit_died(unit)
            return True
        except Exception:  # slow, not gone: the watch goes on
            return False
        log.info("storage unit %d was reported dead but answers: kept", unit)
        return False

    def _unit_died(self, unit: int) -> None:
        lost = self._state.mark_unit_dead(unit)
        if lost:
            log.warning("storage unit %d died; rows lost per partition: %s", unit, lost)
        for pid in lost:
            self._changed(pid)
        self._space.changed()

    async def unit_died(self, unit: int) -> bool:
        """A client saw storage unit ``unit`` die (``ActorDiedError``); returns whether the
        controller confirmed it (it asks the unit first)."""
        if not 0 <= unit < len(self._units):
            return False
        return await self._confirm_dead(unit)

    async def system_info(self) -> dict[str, Any]:
        return self._system

    async def capacity(self) -> dict[str, Any]:
        """The system-wide byte accounting: bound, committed bytes, bytes being written."""
        cap = self._state.capacity
        return {
            "capacity_bytes": cap.capacity_bytes,
            "used_bytes": cap.used,
            "reserved_bytes": cap.reserved,
        }

    async def process_id(self) -> int:
        """The controller's process id (operators and fault tests kill it)."""
        return os.getpid()

    # -------------------------------------------------------------- partitions
    async def create_partition(
        self,
        pid: str,
        expected_size: int = 0,
        max_staleness: int | None = None,
        global_batch_size: int | None = None,
    ) -> PartitionInfo:
        self._state.create_partition(
            pid, expected_size, max_staleness=max_staleness, global_batch_size=global_batch_size
        )
        self._changed(pid)
        return self._info(pid)

    async def seal(self, pid: str) -> PartitionInfo:
        self._state.seal(pid)
        self._changed(pid)
        return self._info(pid)

    async def clear_partition(self, pid: str) -> None:
        """Forget ``pid`` and free its bytes on every unit (puts into it wait meanwhile)."""
        self._state.clear_partition(pid)
        self._changed(pid)
        self._waiters.pop(pid, None)
        self._crossed.pop(pid, None)
        done = self._clearing.setdefault(pid, asyncio.Event())
        if self._hold:  # a save reads these bytes: they go once it has (puts wait till then)
            self._own(self._clear_units(pid, done), f"clearing partition {pid!r} after a save")
            return
        await self._clear_units(pid, done)

    async def _clear_units(self, pid: str, done: asyncio.Event) -> None:
        await self._after_hold()
        try:
            calls = {u: ("clear_partition", pid) for u in self._alive_units()}
            await self._on_units(calls)
        finally:
            self._clearing.pop(pid, None)
            done.set()

    async def clear_samples(self, pid: str, rows: Sequence[int]) -> None:
        """Drop ``rows`` and free their bytes; their ids are reused only after that."""
        generation = self._state.generation(pid)
        groups = self._state.drop_rows(pid, rows)
        self._changed(pid)
        if self._hold:  # a save reads these bytes: freed (and the rows reused) once it has
            self._own(self._free_rows(pid, generation, groups), "freeing rows after a save")
        else:
            await self._free_rows(pid, generation, groups)

    async def _free_rows(self, pid: str, generation: int, groups: dict[int, list[int]]) -> None:
        await self._after_hold()
        await self._on_units({u: ("clear_rows", pid, r) for u, r in groups.items()})
        self._state.recycle(pid, generation, [r for rs in groups.values() for r in rs])

    def _alive_units(self) -> list[int]:
        return self._state.placement.alive() if self._units else []

    async def _on_units(self, calls: Mapping[int, tuple[Any, ...]], committed: bool = True) -> None:
        """Run one call per unit (``{unit: (method, *args)}``), in parallel; the bytes they
        free go back to the capacity (``committed``: they were counted as stored -- not so
        for a released put, whose reservation already went). A dead unit is marked so;
        other failures are logged."""
        items = [(u, c) for u, c in calls.items() if u < len(self._units)]
        results = await asyncio.gather(
            *(self._units[u].call(c[0], *c[1:]) for u, c in items), return_exceptions=True
        )
        for (unit, call), result in zip(items, results):
            if isinstance(result, int):
                if committed:
                    self._state.capacity.freed(result)
            elif isinstance(result, ActorDiedError):
                await self._confirm_dead(unit)
            elif isinstance(result, BaseException):
                log.warning("storage unit %d could not %s: %s", unit, call[0], result)
        self._space.changed()

    async def reset_consumption(self, pid: str, task: str | None = None) -> None:
        self._state.reset_consumption(pid, task)
        self._changed(pid)

    async def list_partitions(self) -> list[str]:
        return self._state.list_partitions()

    async def partition_info(self, pid: str) -> PartitionInfo:
        return self._info(pid)

    def _info(self, pid: str) -> PartitionInfo:
        waiting: dict[str, int] = {}
        for (qpid, task, *_), queue in self._queues.items():
            if qpid == pid:
                waiting[task] = waiting.get(task, 0) + len(queue)
        return dataclasses.replace(
            self._state.partition_info(pid),
            waiting=waiting,
            reserving=self._reserving.get(pid, 0),
            cross_node_bytes=self._crossed.get(pid, 0),
        )

    # ------------------------------------------------------------ admission
    async def reserve(
        self,
        pid: str,
        n: int,
        version: int | None = None,
        timeout: float | None = None,
        wait: bool = True,
    ) -> BatchMeta:
        """Reserve ``n`` slots under the partition's staleness bound, waiting (woken by
        ``advance_version``, never polling) while they do not fit; with ``wait=False``
        reserve what fits now. ``TimeoutError`` after ``timeout`` seconds."""
        meta = self._state.reserve(pid, n, version, partial=not wait)
        if meta is None:
            generation = self._state.generation(pid)

            def admitted() -> BatchMeta | None:
                if self._state.generation(pid) != generation:
                    raise PartitionNotFoundError(f"partition {pid!r} was cleared")
                return self._state.reserve(pid, n, version)

            self._reserving[pid] = self._reserving.get(pid, 0) + 1
            try:
                meta = await self._until(
                    pid, admitted, timeout,
                    f"no room to reserve {n} slot(s) of partition {pid!r} within {timeout} s: "
                    f"the trainer has not advanced its version",
                )  # fmt: skip
            finally:
                self._reserving[pid] -= 1
        self._changed(pid)  # consumers may wait for these slots now
        return meta

    async def advance_version(self, pid: str) -> int:
        """The trainer finished a version: producers may reserve one batch further."""
        version = self._state.advance_version(pid)
        self._changed(pid)
        return version

    async def locate(self, pid: str, rows: Sequence[int]) -> list[int]:
        """The unit of each of ``rows`` (``RowsLostError`` for lost rows)."""
        return self._state.locate(pid, rows)

    async def set_tags(
        self, pid: str, rows: Sequence[int], tags: Sequence[Mapping[str, Any]]
    ) -> None:
        self._state.set_tags(pid, rows, tags)
        self._changed(pid)

    # ------------------------------------------------------------------ reads
    async def get_meta(
        self,
        fields: Sequence[str],
        batch_size: int,
        pid: str,
        task: str,
        sampling_config: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float | None = None,
        drop_last: bool = False,
        token: str | None = None,
        *,
        where: Mapping[str, Any] | None = None,
        max_version_lag: int | None = None,
        evict: bool = False,
        lease_s: float | None = None,
        client: str = "",
        lease_group: str = "",
    ) -> BatchMeta:
        """``token``: names a waiting call, so that :meth:`cancel_wait` can withdraw it.
        ``where``, ``max_version_lag``, ``evict``, ``lease_s``: see ControllerState.get_meta."""
        if token is not None and token in self._withdrawn:  # withdrawn before it arrived
            del self._withdrawn[token]
            return BatchMeta.empty(pid, list(fields))

        def withdrawn() -> bool:
            return token is not None and token in self._withdrawn

        def attempt() -> BatchMeta | None:
            if withdrawn():
                return BatchMeta.empty(pid, list(fields))  # consume nothing
            admitted = self._state.admitted(pid)
            meta = self._state.get_meta(
                pid, task, fields, batch_size, sampling_config, drop_last, where=where,
                max_version_lag=max_version_lag, evict=evict, lease_s=lease_s,
                now=time.time(), client=client, lease_group=lease_group,
            )  # fmt: skip
            if lease_s is not None and meta is not None and meta.lease:
                self._arm_expiry()
            if self._state.admitted(pid) < admitted:  # evictions made room: wake reserves
                self._changed(pid)
            return meta

        # one queue per (partition, task, rank, step): a rank waiting for a later step never
        # holds back a slower rank of its group whose step is already formed
        cfg = sampling_config or {}
        key = (pid, task, cfg.get("dp_rank"), cfg.get("batch_index"))
        queue = self._queues.get(key)
        if not queue:  # nobody waits ahead of us
            meta = attempt()
            if meta is not None:
                return meta
        if not wait:
            return BatchMeta.empty(pid, list(fields))
        if token is None:
            return await self._wait_turn(key, pid, attempt, withdrawn, timeout)
        self._waiting[token] = pid
        try:
            return await self._wait_turn(key, pid, attempt, withdrawn, timeout)
        finally:
            del self._waiting[token]
            self._withdrawn.pop(token, None)

    async def cancel_wait(self, token: str) -> None:
        """Withdraw the waiting ``get_meta`` called with ``token`` (its caller was cancelled):
        it returns an empty batch and consumes nothing. A token whose call has not arrived
        yet (calls may overtake each other) is remembered, and that call returns at once."""
        self._withdrawn[token] = None
        pid = self._waiting.get(token)
        if pid is not None:
            self._changed(pid)
        else:
            while len(self._withdrawn) > _WITHDRAWN_KEPT:
                self._withdrawn.popitem(last=False)

    async def _until(
        self, pid: str, ready: Callable[[], T | None], timeout: float | None, late: str
    ) -> T:
        """``ready()`` once it is not None, re-checked after every change of ``pid`` (never
        polling); ``TimeoutError(late)`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (got := ready()) is None:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(late)
            try:
                await self._waiters.setdefault(pid, _Waiters()).wait(left)
            except asyncio.TimeoutError:
                raise TimeoutError(late) from None
        return got

    async def _wait_turn(
        self, key: tuple[Any, ...], pid: str, attempt: Any, withdrawn: Any, timeout: float | None
    ) -> BatchMeta:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ticket = object()
        queue = self._queues.setdefault(key, deque())
        queue.append(ticket)
        generation = self._state.generation(pid)
        try:
            while True:
                if queue[0] is ticket or withdrawn():
                    meta = attempt()  # creates the partition if it does not exist yet
                    if meta is not None:
                        return meta
                    generation = generation or self._state.generation(pid)
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"no batch of partition {pid!r} was ready within {timeout} s"
                    )
                waiters = self._waiters.setdefault(pid, _Waiters())
                try:
                    await waiters.wait(remaining)
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"no batch of partition {pid!r} was ready within {timeout} s"
                    ) from None
                if generation and self._state.generation(pid) != generation:
                    raise PartitionNotFoundError(f"partition {pid!r} was cleared while waiting")
        finally:
            queue.remove(ticket)
            if not queue:
                self._queues.pop(key, None)
            elif queue[0] is not ticket:
                self._changed(pid)  # let the next in line try at once

    # ------------------------------------------------------------------ status
    async def check_consumption_status(self, task: str, pid: str) -> bool:
        return self._state.check_consumption_status(task, pid)

    async def check_production_status(self, fields: Sequence[str], pid: str) -> bool:
        return self._state.check_production_status(fields, pid)

    async def get_consumption_status(self, task: str, pid: str) -> list[torch.Tensor]:
        return list(self._state.get_consumption_status(task, pid))

    async def get_production_status(self, fields: Sequence[str], pid: str) -> list[torch.Tensor]:
        return list(self._state.get_production_status(fields, pid))
