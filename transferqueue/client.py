"""The client: the one async implementation, and a thin synchronous facade over it.

A put is *write, then publish*: rows are allocated by the controller, every field is
written to the storage units in parallel, and only then is the put committed to the
controller, which makes the rows' fields and tags visible in one step. A failed write
commits nothing and gives its rows back.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from tensordict import TensorDict

from transferqueue.actor import ActorRef
from transferqueue.columns import assemble, field_spec, to_columns
from transferqueue.config import Config
from transferqueue.errors import SchemaError
from transferqueue.loop import background, runtime_loop
from transferqueue.metadata import BatchMeta, PartitionInfo
from transferqueue.storage.routing import runs, split_rows, take
from transferqueue.transports import transport_class

#: seconds added to a waiting get_meta's own timeout to form the call's timeout
_WAIT_MARGIN_S = 30.0


class AsyncTransferQueueClient:
    """Talks to one transferqueue system: a controller and its storage units."""

    def __init__(self, controller: ActorRef, units: Sequence[ActorRef], config: Config) -> None:
        self.config = config
        self._controller = controller
        self._units = list(units)
        self._stripe = config.storage.stripe_rows
        # results made of replies the transport does not hand over are copies
        self._replies_borrowed = bool(units) and not (
            transport_class(units[0].address.transport).replies_owned
        )

    async def __aenter__(self) -> AsyncTransferQueueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close this client's connections (the system keeps running)."""
        for ref in (self._controller, *self._units):
            await ref.aclose()

    # ------------------------------------------------------------------ partitions
    async def create_partition(self, partition_id: str, expected_size: int = 0) -> PartitionInfo:
        return await self._controller.call("create_partition", partition_id, expected_size)

    async def seal(self, partition_id: str) -> PartitionInfo:
        return await self._controller.call("seal", partition_id)

    async def list_partitions(self) -> list[str]:
        return await self._controller.call("list_partitions")

    async def partition_info(self, partition_id: str) -> PartitionInfo:
        return await self._controller.call("partition_info", partition_id)

    async def clear_partition(self, partition_id: str) -> None:
        """Forget the partition and free its bytes. Idempotent."""
        await self._controller.call("clear_partition", partition_id)
        await asyncio.gather(*(u.call("clear_partition", partition_id) for u in self._units))

    async def clear_samples(self, meta: BatchMeta) -> None:
        """Forget the rows of ``meta`` and free their bytes. Idempotent."""
        if not meta.rows:
            return
        await self._controller.call("clear_samples", meta.partition_id, meta.rows)
        await self._per_unit(meta.partition_id, meta.rows, "clear_rows")

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

    # ---------------------------------------------------------------------- put
    async def put(
        self,
        data: Any,
        partition_id: str | None = None,
        metadata: BatchMeta | None = None,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        """Write a batch; returns the BatchMeta of the rows written.

        Without ``metadata`` new rows are allocated in ``partition_id`` (pending slots
        first). With ``metadata`` the fields are written into its rows.
        """
        n, columns = to_columns(data)
        if metadata is not None:
            if partition_id is not None and partition_id != metadata.partition_id:
                raise ValueError(
                    f"partition_id {partition_id!r} differs from metadata's {metadata.partition_id!r}"
                )
            partition_id = metadata.partition_id
            if len(metadata) != n:
                raise SchemaError(f"the batch has {n} rows but metadata names {len(metadata)}")
        elif partition_id is None:
            raise ValueError("put needs a partition_id (or the metadata of existing rows)")
        if tags is not None and len(tags) != n:
            raise SchemaError(f"tags must hold one dict per row: {n} rows, {len(tags)} tags")
        specs = {name: field_spec(col) for name, col in columns.items()}
        rows = metadata.rows if metadata is not None else None
        return await self._write(partition_id, columns, specs, rows=rows, n=n, tags=tags)

    async def _write(
        self,
        partition_id: str,
        columns: dict[str, Any],
        specs: dict[str, Any],
        *,
        rows: list[int] | None = None,
        n: int = 0,
        keys: list[str] | None = None,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        begun = await self._controller.call("begin_put", partition_id, specs, n, rows, keys)
        rows, fresh = begun["rows"], begun["fresh"]
        try:
            if columns:
                await self._per_unit(partition_id, rows, "put", columns)
        except BaseException:
            await self._abort(partition_id, rows, fresh)
            raise
        return await self._controller.call(
            "commit", partition_id, rows, specs, list(tags) if tags is not None else None
        )

    async def _abort(self, partition_id: str, rows: list[int], fresh: list[int]) -> None:
        # bytes already written for fresh rows go; the rows return to pending or are dropped
        cleanup = [self._controller.call("abort_put", partition_id, fresh)]
        if fresh:
            cleanup.append(self._per_unit(partition_id, fresh, "clear_rows"))
        await asyncio.gather(*cleanup, return_exceptions=True)

    async def _per_unit(
        self,
        partition_id: str,
        rows: Sequence[int],
        method: str,
        columns: dict[str, Any] | None = None,
    ) -> list[tuple[Any, Any]]:
        """Call ``method`` on every unit that holds some of ``rows``, in parallel."""
        groups = split_rows(partition_id, rows, len(self._units), self._stripe)
        calls, order = [], []
        for unit, (positions, unit_rows) in groups.items():
            args: list[Any] = [partition_id, unit_rows]
            if columns is not None:
                found = runs(positions)  # the same for every column
                args.append({name: take(col, positions, found) for name, col in columns.items()})
            calls.append(self._units[unit].call(method, *args))
            order.append(positions)
        results = await asyncio.gather(*calls)
        return list(zip(order, results))

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
    ) -> BatchMeta:
        """Rows whose ``data_fields`` are ready, marked consumed for ``task_name``.

        With ``wait`` (the default) it waits -- woken by the controller's commits, never by a
        timer -- until a batch can be filled or the partition is exhausted for the task;
        ``timeout`` (seconds) bounds the wait. An empty BatchMeta means: exhausted (or,
        with ``wait=False``, nothing ready now).
        """
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
            )
        except asyncio.CancelledError:
            if token is not None:
                call = self._controller.call("cancel_wait", token)
                background(call, "withdrawing a cancelled get_meta")
            raise

    async def get_data(
        self,
        meta: BatchMeta,
        fields: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> TensorDict:
        """The data of ``meta``'s rows, in its row order, as a TensorDict."""
        names = list(fields) if fields is not None else list(meta.fields)
        if not meta.rows or not names:
            return TensorDict({}, batch_size=[len(meta.rows)], device=device)
        parts = await self._per_unit_get(meta.partition_id, meta.rows, names)
        return assemble(len(meta.rows), names, parts, device=device, copy=self._replies_borrowed)

    async def _per_unit_get(
        self, partition_id: str, rows: Sequence[int], fields: list[str]
    ) -> list[tuple[Any, Any]]:
        groups = split_rows(partition_id, rows, len(self._units), self._stripe)
        calls = [
            self._units[u].call("get", partition_id, r, fields) for u, (_, r) in groups.items()
        ]
        results = await asyncio.gather(*calls)
        return [(pos, res) for (pos, _), res in zip(groups.values(), results)]

    # ---------------------------------------------------------------- key-value
    async def kv_put(
        self,
        keys: Sequence[str],
        partition_id: str,
        fields: Any = None,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        """Write ``fields`` (one row per key) and/or merge ``tags`` into the keys' rows; new
        keys get new rows. A put with only tags is how frameworks track sample status."""
        keys = list(keys)
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
        return await self._write(partition_id, columns, specs, keys=keys, tags=tags)

    async def kv_get(
        self, keys: Sequence[str], partition_id: str, select_fields: Sequence[str] | None = None
    ) -> TensorDict:
        """The rows of ``keys``, in key order; every key must exist (KeyError otherwise)."""
        found = await self._controller.call("kv_fields", partition_id, list(keys))
        fields = found["fields"]
        if select_fields is not None:
            missing = [f for f in select_fields if f not in fields]
            if missing:
                raise KeyError(
                    f"not every key has field(s) {missing}; fields all keys have: {fields}"
                )
            fields = list(select_fields)
        return await self.get_data(BatchMeta(partition_id, found["rows"], fields))

    async def kv_list(self, partition_id: str | None = None) -> dict[str, dict[str, Any]]:
        """``{partition: {key: tags}}`` (``{}`` for an unknown partition)."""
        return await self._controller.call("kv_list", partition_id)

    async def kv_clear(self, keys: Sequence[str], partition_id: str) -> None:
        rows = await self._controller.call("kv_clear", partition_id, list(keys))
        if rows:
            await self._per_unit(partition_id, rows, "clear_rows")

    # ------------------------------------------------------------------- streaming
    def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[tuple[TensorDict, BatchMeta]]:
        from transferqueue.streaming import stream

        return stream(self, *args, **kwargs)


def _sync(name: str) -> Any:
    method = getattr(AsyncTransferQueueClient, name)

    @functools.wraps(method)
    def call(self: TransferQueueClient, *args: Any, **kwargs: Any) -> Any:
        return self._loop.run(getattr(self._async, name)(*args, **kwargs))

    return call


class TransferQueueClient:
    """The synchronous client: every method runs the async client on the runtime's loop
    thread. Safe from plain code, from several threads, and from inside another running
    event loop's thread."""

    def __init__(self, async_client: AsyncTransferQueueClient) -> None:
        self._async = async_client
        self._loop = runtime_loop()

    @property
    def async_client(self) -> AsyncTransferQueueClient:
        return self._async

    @property
    def config(self) -> Config:
        return self._async.config

    create_partition = _sync("create_partition")
    seal = _sync("seal")
    list_partitions = _sync("list_partitions")
    partition_info = _sync("partition_info")
    clear_partition = _sync("clear_partition")
    clear_samples = _sync("clear_samples")
    reset_consumption = _sync("reset_consumption")
    check_consumption_status = _sync("check_consumption_status")
    check_production_status = _sync("check_production_status")
    get_consumption_status = _sync("get_consumption_status")
    get_production_status = _sync("get_production_status")
    set_tags = _sync("set_tags")
    put = _sync("put")
    get_meta = _sync("get_meta")
    get_data = _sync("get_data")
    kv_put = _sync("kv_put")
    kv_get = _sync("kv_get")
    kv_list = _sync("kv_list")
    kv_clear = _sync("kv_clear")
    close = _sync("close")
