"""The controller actor: a thin async shell over :class:`ControllerState`.

It translates requests into state calls and owns the waiting: one :class:`_Waiters` per
partition, woken after every change (commit, seal, clear, reset, ...), never by a timer.
Waiters of one (partition, task, rank, batch_index) are served in arrival order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transferqueue.controller.partition import FieldSpec
from transferqueue.controller.state import ControllerState
from transferqueue.errors import PartitionNotFoundError, SchemaError
from transferqueue.metadata import BatchMeta, PartitionInfo

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


class ControllerActor:
    """Remote methods of the control plane (see :class:`AsyncTransferQueueClient`)."""

    def __init__(self, pre_allocate: int = 0, sampler: Any = "sequential") -> None:
        self._state = ControllerState(default_expected_size=pre_allocate, sampler=sampler)
        self._waiters: dict[str, _Waiters] = {}
        self._queues: dict[tuple[Any, ...], deque[object]] = {}
        self._system: dict[str, Any] = {}
        self._waiting: dict[str, str] = {}  # token of a waiting get_meta -> its partition
        self._withdrawn: OrderedDict[str, None] = OrderedDict()  # tokens cancel_wait named

    def _changed(self, pid: str) -> None:
        waiters = self._waiters.get(pid)
        if waiters is not None:
            waiters.changed()

    # ------------------------------------------------------------------ system
    async def set_system(self, info: Mapping[str, Any]) -> None:
        self._system = dict(info)

    async def system_info(self) -> dict[str, Any]:
        return self._system

    # -------------------------------------------------------------- partitions
    async def create_partition(self, pid: str, expected_size: int = 0) -> PartitionInfo:
        self._state.create_partition(pid, expected_size)
        self._changed(pid)
        return self._info(pid)

    async def seal(self, pid: str) -> PartitionInfo:
        self._state.seal(pid)
        self._changed(pid)
        return self._info(pid)

    async def clear_partition(self, pid: str) -> None:
        self._state.clear_partition(pid)
        self._changed(pid)
        self._waiters.pop(pid, None)

    async def clear_samples(self, pid: str, rows: Sequence[int]) -> None:
        self._state.clear_samples(pid, rows)
        self._changed(pid)

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
        return dataclasses.replace(self._state.partition_info(pid), waiting=waiting)

    # ------------------------------------------------------------------ writes
    def _check_specs(self, pid: str, specs: Mapping[str, Any]) -> None:
        if not self._state.has_partition(pid):
            return
        known = self._state.field_specs(pid)
        for name, raw in specs.items():
            spec, old = FieldSpec.from_plain(raw), known.get(name)
            if old is not None and old != spec:
                raise SchemaError(
                    f"field {name!r} of partition {pid!r} holds dtype {old.dtype} with per-row "
                    f"rank {old.ndim}; this put has dtype {spec.dtype} with rank {spec.ndim}"
                )

    async def begin_put(
        self,
        pid: str,
        specs: Mapping[str, Any],
        n: int,
        rows: Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
    ) -> dict[str, list[int]]:
        """Validate a put and give it rows: ``rows`` (existing rows), ``keys`` (rows of those
        keys, new ones allocated) or ``n`` new rows. ``fresh`` lists the rows allocated here."""
        self._check_specs(pid, specs)
        if rows is not None:
            self._state.check_rows(pid, rows)
            return {"rows": list(rows), "fresh": []}
        if keys is not None:
            got, is_new = self._state.upsert_keys(pid, keys)
            return {"rows": got, "fresh": [r for r, new in zip(got, is_new) if new]}
        got = self._state.allocate(pid, n)
        return {"rows": got, "fresh": got}

    async def abort_put(self, pid: str, fresh: Sequence[int]) -> None:
        self._state.release(pid, fresh)
        self._changed(pid)

    async def commit(
        self,
        pid: str,
        rows: Sequence[int],
        specs: Mapping[str, Any],
        tags: Sequence[Mapping[str, Any]] | None = None,
    ) -> BatchMeta:
        self._state.commit(pid, rows, specs, tags)
        self._changed(pid)
        return self._state.meta_of(pid, rows, list(specs))

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
    ) -> BatchMeta:
        """``token``: names a waiting call, so that :meth:`cancel_wait` can withdraw it."""
        if token is not None and token in self._withdrawn:  # withdrawn before it arrived
            del self._withdrawn[token]
            return BatchMeta.empty(pid, list(fields))

        def withdrawn() -> bool:
            return token is not None and token in self._withdrawn

        def attempt() -> BatchMeta | None:
            if withdrawn():
                return BatchMeta.empty(pid, list(fields))  # consume nothing
            return self._state.get_meta(pid, task, fields, batch_size, sampling_config, drop_last)

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

    # ------------------------------------------------------------ key-value
    async def kv_rows(self, pid: str, keys: Sequence[str]) -> list[int]:
        return self._state.rows_for_keys(pid, keys)

    async def kv_list(self, pid: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        return self._state.kv_list(pid)

    async def kv_clear(self, pid: str, keys: Sequence[str]) -> list[int]:
        rows = self._state.rows_for_keys(pid, keys) if self._state.has_partition(pid) else []
        self._state.clear_samples(pid, rows)
        self._changed(pid)
        return rows

    async def kv_fields(self, pid: str, keys: Sequence[str]) -> dict[str, Any]:
        """Rows of ``keys`` and the fields every one of them has."""
        rows = self._state.rows_for_keys(pid, keys)
        return {"rows": rows, "fields": self._state.common_fields(pid, rows)}
