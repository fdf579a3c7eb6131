"""The client: the one async implementation, and a thin synchronous facade over it.

The put path (*write, then publish*, under a put lease) is :mod:`.writes`, mixed in.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict

from transferqueue.client import streams
from transferqueue.client.columns import (
    assemble,
    field_spec,
    to_columns,
)
from transferqueue.client.device import check_device, on_device
from transferqueue.client.routing import group_by_unit
from transferqueue.client.writes import WriteMethods
from transferqueue.config import Config
from transferqueue.errors import SchemaError
from transferqueue.metadata import BatchMeta, PartitionInfo
from transferqueue.runtime.actor import DEFAULT as DEFAULT_TIMEOUT
from transferqueue.runtime.actor import ActorRef
from transferqueue.runtime.loop import background
from transferqueue.runtime.transports import transport_class

#: seconds added to a waiting get_meta's own timeout to form the call's timeout
_WAIT_MARGIN_S = 30.0


class AsyncTransferQueueClient(WriteMethods):
    """Talks to one transferqueue system: a controller and its storage units."""

    def __init__(self, controller: ActorRef, units: Sequence[ActorRef], config: Config) -> None:
        self.config = config
        self._controller = controller
        self._units = list(units)
        self.client_id = uuid.uuid4().hex
        #: a testing seam: awaited with "begun" after a put got its rows and "written" after
        #: its bytes landed, before the commit (fault tests stop a process there)
        self.put_hook: Callable[[str], Awaitable[None]] | None = None
        self._my_node: str | None = None  # where puts ask for their rows (locality)
        self._node_known = False
        # results made of replies the transport does not hand over are copies
        self._replies_borrowed = bool(units) and not (
            transport_class(units[0].address.transport).replies_owned
        )

    async def __aenter__(self) -> AsyncTransferQueueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close this client's connections (the system keeps running; a later call
        connects again)."""
        for ref in (self._controller, *self._units):
            await ref.aclose()

    async def aclose(self) -> None:
        """Same as :meth:`close` (the name ``async with``-style resources use)."""
        await self.close()

    # ------------------------------------------------------------------ partitions
    async def create_partition(
        self,
        partition_id: str,
        expected_size: int = 0,
        *,
        max_staleness: int | None = None,
        global_batch_size: int | None = None,
    ) -> PartitionInfo:
        """Create a partition with ``expected_size`` pending slots. With ``max_staleness=k``
        and ``global_batch_size=B`` it is under staleness-bounded admission: producers
        :meth:`reserve` slots, admitted while at most k versions ahead of the trainer's
        :meth:`advance_version` (docs/async-rl.md)."""
        return await self._controller.call(
            "create_partition", partition_id, expected_size, max_staleness, global_batch_size
        )

    async def reserve(
        self,
        partition_id: str,
        n: int,
        version: int | None = None,
        *,
        timeout: float | None = None,
        wait: bool = True,
    ) -> BatchMeta:
        """Reserve ``n`` slots to generate into (fill them with ``put(data,
        metadata=reserved)``); waits, woken by :meth:`advance_version`, while they would put
        more than ``max_staleness`` versions of work ahead of the trainer. ``wait=False``
        reserves what fits now (possibly nothing). Each slot's ``version`` tag is the
        version it was reserved under (``version``, default the current one)."""
        call_timeout = None if timeout is None else timeout + _WAIT_MARGIN_S
        if not wait:
            call_timeout = self.config.runtime.call_timeout
        return await self._controller.call(
            "reserve", partition_id, n, version, timeout, wait, timeout=call_timeout
        )

    async def advance_version(self, partition_id: str) -> int:
        """The trainer moved to its next policy version; returns it."""
        return await self._controller.call("advance_version", partition_id)

    async def ack(self, meta: BatchMeta) -> dict[str, Any]:
        """Mark the rows of a leased batch (``get_meta(lease_s=...)``) consumed. Returns
        ``{"acked": n, "not_leased": m, "ended": ...}``: rows whose lease had ended (acked
        before, nacked, expired) are not acked again but counted in ``not_leased``."""
        if not meta.lease:
            raise ValueError("ack needs a leased batch: get it with get_meta(..., lease_s=...)")
        return await self._controller.call("ack", meta.partition_id, meta.lease, meta.rows)

    async def nack(self, meta: BatchMeta) -> int:
        """Give a leased batch back at once: its rows are handed out again, first."""
        if not meta.lease:
            raise ValueError("nack needs a leased batch: get it with get_meta(..., lease_s=...)")
        return await self._controller.call("nack", meta.partition_id, meta.lease)

    async def seal(self, partition_id: str) -> PartitionInfo:
        return await self._controller.call("seal", partition_id)

    async def list_partitions(self) -> list[str]:
        return await self._controller.call("list_partitions")

    async def partition_info(self, partition_id: str) -> PartitionInfo:
        return await self._controller.call("partition_info", partition_id)

    async def clear_partition(self, partition_id: str) -> None:
        """Forget the partition and free its bytes. Idempotent."""
        await self._controller.call("clear_partition", partition_id)

    async def clear_samples(
        self, meta: BatchMeta | None = None, *, metadata: BatchMeta | None = None
    ) -> None:
        """Forget the rows of ``meta`` and free their bytes. Idempotent. (``metadata=`` is
        the public TransferQueue's name for ``meta``.)"""
        meta = _meta_arg(meta, metadata)
        if meta.rows:
            await self._controller.call("clear_samples", meta.partition_id, meta.rows)

    async def reset_consumption(self, partition_id: str, task_name: str | None = None) -> None:
        await self._controller.call("reset_consumption", partition_id, task_name)

    # ---------------------------------------------------------------------- status
    async def check_consumption_status(self, task_name: str, partition_id: str) -> bool:
        return await self._controller.call("check_consumption_status", task_name, partition_id)

    async def check_production_status(self, data_fields: Sequence[str], partition_id: str) -> bool:
        return await self._controller.call(
            "check_production_status", list(data_fields), partition_id
        )

    async def get_consumption_status(
        self, task_name: str, partition_id: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, status = await self._controller.call(
            "get_consumption_status", task_name, partition_id
        )
        return rows, status

    async def get_production_status(
        self, data_fields: Sequence[str], partition_id: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, status = await self._controller.call(
            "get_production_status", list(data_fields), partition_id
        )
        return rows, status

    async def set_tags(self, meta: BatchMeta, tags: Sequence[dict[str, Any]]) -> None:
        """Merge ``tags`` (one dict per row of ``meta``) into the rows' tags."""
        await self._controller.call("set_tags", meta.partition_id, meta.rows, list(tags))

    # ---------------------------------------------------------------------- get
    async def get_meta(
        self,
        data_fields: Sequence[str],
        batch_size: int,
        partition_id: str,
        task_name: str,
        sampling_config: dict[str, Any] | None = None,
        *,
        wait: bool = True,
        timeout: float | None = None,
        drop_last: bool = False,
        where: dict[str, Any] | None = None,
        max_version_lag: int | None = None,
        evict: bool = False,
        lease_s: float | None = None,
        lease_group: str | None = None,
        mode: str = "fetch",
    ) -> BatchMeta:
        """Rows whose ``data_fields`` are ready, marked consumed for ``task_name`` -- or,
        with ``lease_s``, leased to it until :meth:`ack` (handed out again after
        :meth:`nack` or ``lease_s`` seconds). ``where={"tag": value, ...}``: only rows
        whose tags match count as ready (a tag-only put that makes a row match wakes the
        waiters). ``max_version_lag=j``: rows reserved more than j policy versions ago are
        skipped; with ``evict=True`` they are consumed for the task unseen and counted.
        ``lease_group``: consumers that share their leases (a StreamingDataset and its
        DataLoader workers pass one): rows leased to the caller's own group do not keep its
        stream from ending, since they are in its hands.

        With ``wait`` (the default) it waits -- woken by the controller's commits, never by a
        timer -- until a batch can be filled or the partition is exhausted for the task;
        ``timeout`` (seconds) bounds the wait. An empty BatchMeta means: exhausted (or,
        with ``wait=False``, nothing ready now).

        ``mode`` is the public TransferQueue's: only ``"fetch"`` (the default) is served;
        there is no ``"force_fetch"`` (read rows by key with ``kv_get``, or look at
        ``partition_info`` / ``get_production_status``) and puts allocate their own rows.
        """
        if mode != "fetch":
            raise ValueError(
                f"get_meta mode {mode!r} is not supported: only 'fetch' (ready rows, the "
                "default); read rows without consuming them with kv_get, and put without "
                "metadata to allocate rows (docs/migrating.md)"
            )
        call_timeout: float | None
        if wait:
            call_timeout = None if timeout is None else timeout + _WAIT_MARGIN_S
        else:
            call_timeout = self.config.runtime.call_timeout
        # a waiting call has a token: if the caller is cancelled while it waits, the
        # controller withdraws it, so it cannot consume rows for nobody later
        token = uuid.uuid4().hex if wait else None
        try:
            # get_meta's own arguments go positionally: ``timeout=`` is the call's timeout
            return await self._controller.call(
                "get_meta",
                list(data_fields),
                batch_size,
                partition_id,
                task_name,
                sampling_config,
                wait,
                timeout,
                drop_last,
                token,
                timeout=call_timeout,
                where=where,
                max_version_lag=max_version_lag,
                evict=evict,
                lease_s=lease_s,
                client=self.client_id,
                lease_group=lease_group or "",
            )
        except asyncio.CancelledError:
            if token is not None:
                call = self._controller.call("cancel_wait", token)
                background(call, "withdrawing a cancelled get_meta")
            raise

    async def get_data(
        self,
        meta: BatchMeta | None = None,
        *,
        fields: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        metadata: BatchMeta | None = None,
    ) -> TensorDict:
        """The data of ``meta``'s rows, in its row order, as a TensorDict. (``metadata=`` is
        the public TransferQueue's name for ``meta``.)"""
        meta = _meta_arg(meta, metadata)
        device = check_device(device)
        names = list(fields) if fields is not None else list(meta.fields)
        if not meta.rows or not names:
            return TensorDict({}, batch_size=[len(meta.rows)], device=device)
        units = meta.units or await self._controller.call("locate", meta.partition_id, meta.rows)
        parts = await self._per_unit_get(meta.partition_id, meta.rows, units, names)
        return assemble(len(meta.rows), names, parts, device=device, copy=self._replies_borrowed)

    async def _per_unit_get(
        self, partition_id: str, rows: Sequence[int], units: Sequence[int], fields: list[str]
    ) -> list[tuple[Any, Any]]:
        groups = group_by_unit(rows, units)
        calls = [
            self._unit_call(partition_id, u, r, "get", partition_id, r, fields)
            for u, (_, r) in groups.items()
        ]
        results = await asyncio.gather(*calls)
        return [(pos, res) for (pos, _), res in zip(groups.values(), results)]

    # ---------------------------------------------------------------- key-value
    async def kv_put(
        self,
        keys: str | Sequence[str],
        partition_id: str,
        fields: Any = None,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        """Write ``fields`` (one row per key) and/or merge ``tags`` into the keys' rows; new
        keys get new rows. A put with only tags is how frameworks track sample status.
        Returns the keys' metadata: their rows, every field all of them have (not only the
        ones written here) and their tags."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        if fields is None:
            if tags is None:
                raise ValueError("kv put needs fields, tags or both")
            columns: dict[str, Any] = {}
        else:
            n, columns = to_columns(fields)
            if n != len(keys):
                raise SchemaError(f"got {len(keys)} keys for a batch of {n} rows")
        if tags is not None and len(tags) != len(keys):
            raise SchemaError(
                f"tags must hold one dict per key: {len(keys)} keys, {len(tags)} tags"
            )
        specs = {name: field_spec(col) for name, col in columns.items()}
        if on_device(columns):
            return await self._write_staged(partition_id, columns, specs, keys=keys, tags=tags)
        return await self._write(partition_id, columns, specs, keys=keys, tags=tags)

    async def kv_get(
        self,
        keys: str | Sequence[str],
        partition_id: str,
        select_fields: str | Sequence[str] | None = None,
    ) -> TensorDict:
        """The rows of ``keys`` (a key or a list), in key order; every key must exist
        (KeyError otherwise)."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        if isinstance(select_fields, str):
            select_fields = [select_fields]
        found = await self._controller.call("kv_fields", partition_id, keys)
        fields = found["fields"]
        if select_fields is not None:
            missing = [f for f in select_fields if f not in fields]
            if missing:
                raise KeyError(
                    f"not every key has field(s) {missing}; fields all keys have: {fields}"
                )
            fields = list(select_fields)
        meta = BatchMeta(partition_id, found["rows"], fields, units=found["units"])
        return await self.get_data(meta)

    async def kv_list(
        self,
        partition_id: str | None = None,
        *,
        where: dict[str, Any] | None = None,
        min_count: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """``{partition: {key: tags}}`` (``{}`` for an unknown partition); ``where``: only
        keys whose tags match. With ``min_count`` it waits, event-driven, until at least that
        many keys of ``partition_id`` match (``TimeoutError`` after ``timeout``): the
        replacement for a ``kv_list`` polling loop."""
        call_timeout: Any = DEFAULT_TIMEOUT
        if min_count is not None:
            call_timeout = None if timeout is None else timeout + _WAIT_MARGIN_S
        return await self._controller.call(
            "kv_list", partition_id, where, min_count, timeout, timeout=call_timeout
        )

    async def kv_clear(self, keys: str | Sequence[str], partition_id: str) -> None:
        """Forget ``keys`` (a key or a list) and free their bytes; keys (and partitions)
        already gone are ignored, as Redis ``DEL`` does."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        await self._controller.call("kv_clear", partition_id, keys)

    # ------------------------------------------- the public TransferQueue's names
    async def get_partition_list(self) -> list[str]:
        """The partition ids (the public TransferQueue's name for :meth:`list_partitions`)."""
        return await self.list_partitions()

    async def set_custom_meta(self, metadata: BatchMeta) -> None:
        """Send ``metadata``'s tags (``custom_meta``, e.g. set with
        ``metadata.update_custom_meta``) to the controller: merged into the rows' tags, as
        :meth:`set_tags` does."""
        await self.set_tags(metadata, metadata.tags)

    async def async_get_meta(
        self,
        data_fields: Sequence[str],
        batch_size: int,
        partition_id: str,
        mode: str = "fetch",
        task_name: str | None = None,
        sampling_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BatchMeta:
        """:meth:`get_meta` with the public TransferQueue's argument order (``mode`` fourth);
        ``task_name`` is required (consumption is tracked per task)."""
        if task_name is None:
            raise ValueError("get_meta needs a task_name: consumption is tracked per task")
        return await self.get_meta(
            data_fields, batch_size, partition_id, task_name, sampling_config, mode=mode, **kwargs
        )

    async def async_put(
        self,
        data: Any,
        metadata: BatchMeta | None = None,
        partition_id: str | None = None,
        *,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        """:meth:`put` with the public TransferQueue's argument order (``metadata`` second)."""
        return await self.put(data, partition_id=partition_id, metadata=metadata, tags=tags)

    async_get_data = get_data
    async_clear_partition = clear_partition
    async_clear_samples = clear_samples
    async_reset_consumption = reset_consumption
    async_check_consumption_status = check_consumption_status
    async_check_production_status = check_production_status
    async_get_consumption_status = get_consumption_status
    async_get_production_status = get_production_status
    async_get_partition_list = get_partition_list
    async_set_custom_meta = set_custom_meta
    async_kv_list = kv_list

    # ----------------------------------------------------------------- checkpoints
    #: a testing seam: awaited by :meth:`save_checkpoint` with "chunk", "files" and
    #: "renamed" (see :mod:`transferqueue.ops.checkpoint`; fault tests stop a process there)
    checkpoint_hook: Callable[[str], Awaitable[None]] | None = None

    async def save_checkpoint(
        self, path: str | os.PathLike[str], metadata: Any = None, *, progress: bool | None = None
    ) -> dict[str, Any]:
        """Save everything the system holds -- partitions, rows, fields, tags, keys,
        production and consumption state, the bytes -- to the directory ``path``,
        atomically (the previous checkpoint there stays loadable until the new one is
        complete) and consistently (a put committed during the save is all in or all out).
        ``metadata``: JSON-serializable, returned by :meth:`load_checkpoint`. ``progress``:
        a progress bar (default: when stderr is a terminal). Returns a summary."""
        from transferqueue.ops import checkpoint

        hook = self.checkpoint_hook
        return await checkpoint.save(self, path, metadata, progress=progress, hook=hook)

    async def load_checkpoint(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, progress: bool | None = None
    ) -> Any:
        """Load the checkpoint at ``path`` (any number of storage units); returns its
        metadata. A system holding partitions with rows is refused (``SystemNotEmptyError``)
        unless ``overwrite=True``, which clears them first."""
        from transferqueue.ops import checkpoint

        return await checkpoint.load(self, path, overwrite=overwrite, progress=progress)

    # ------------------------------------------------------------------- streaming
    def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[tuple[TensorDict, BatchMeta]]:
        return streams.stream(self, *args, **kwargs)


def _meta_arg(meta: BatchMeta | None, metadata: BatchMeta | None) -> BatchMeta:
    """``meta`` (ours) or ``metadata=`` (the public TransferQueue's keyword): exactly one."""
    if metadata is not None:
        if meta is not None:
            raise TypeError("got both meta and metadata= (they are the same argument)")
        return metadata
    if meta is None:
        raise TypeError("missing the BatchMeta argument (meta, or metadata=)")
    return meta
