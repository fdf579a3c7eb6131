"""The one streaming loop: ``stream(client, ...)`` hands out the rows of one partition to one
task as ``(TensorDict, BatchMeta)`` micro-batches, each as soon as its rows are ready.

It stands on the async client alone; ``transferqueue.streaming`` (StreamingDataset,
StreamingDataLoader) drives it from synchronous code. The semantics (how a stream ends,
prefetch, micro-batches, data-parallel ranks, leases) are in that module's docstring and
docs/streaming.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tensordict import TensorDict

from transferqueue.metadata import BatchMeta

if TYPE_CHECKING:
    from transferqueue.client.async_client import AsyncTransferQueueClient

Item = tuple[TensorDict, BatchMeta]


def _filters(
    where: Mapping[str, Any] | None, max_version_lag: int | None, evict: bool
) -> dict[str, Any]:
    """The ``get_meta`` filters a stream passes on (only those that are set)."""
    out: dict[str, Any] = {}
    if where is not None:
        out["where"] = dict(where)
    if max_version_lag is not None:
        out["max_version_lag"] = max_version_lag
        out["evict"] = evict
    return out


def _check_sizes(batch_size: Any, micro_batch_size: Any) -> None:
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size)):
        if value is None and name == "micro_batch_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def split_micro_batches(
    data: TensorDict, meta: BatchMeta, micro_batch_size: int | None
) -> list[Item]:
    """Split a batch into micro-batches of ``micro_batch_size`` rows (the last smaller);
    data and metadata are split at the same boundaries."""
    n = len(meta)
    if data.batch_size[0] != n:
        raise ValueError(f"data has {data.batch_size[0]} rows but its metadata names {n}")
    if micro_batch_size is None or n <= micro_batch_size:
        return [(data, meta)]
    sizes = [micro_batch_size] * (n // micro_batch_size)
    if n % micro_batch_size:
        sizes.append(n % micro_batch_size)
    return list(zip(data.split(sizes, dim=0), meta.split(sizes)))


class _Fetcher:
    """Fetches whole batches of one stream (meta, then data); keeps ``batch_index``."""

    def __init__(
        self,
        client: AsyncTransferQueueClient,
        data_fields: Sequence[str],
        batch_size: int,
        partition_id: str,
        task_name: str,
        sampling_config: Mapping[str, Any] | None = None,
        drop_last: bool = False,
        timeout: float | None = None,
        index_offset: int = 0,
        index_stride: int = 1,
        lease_s: float | None = None,
        lease_group: str | None = None,
        filters: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.lease_s = lease_s
        self.lease_group = lease_group
        self.filters = dict(filters or {})
        self.fields = [data_fields] if isinstance(data_fields, str) else list(data_fields)
        self.batch_size = batch_size
        self.partition_id = partition_id
        self.task_name = task_name
        self.config = dict(sampling_config or {})
        self.drop_last = drop_last
        self.timeout = timeout
        self.ranked = "dp_rank" in self.config
        start = self.config.get("batch_index", 0)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"sampling_config['batch_index'] must be an int >= 0, got {start!r}")
        self.batch_index = start + index_offset
        self.stride = index_stride

    async def fetch(self, wait: bool) -> Item | None:
        """The next batch, or ``None``: exhausted (``wait``) or nothing ready now (no ``wait``)."""
        cfg = {**self.config, "batch_index": self.batch_index} if self.ranked else self.config
        meta = await self.client.get_meta(
            self.fields,
            self.batch_size,
            self.partition_id,
            self.task_name,
            cfg or None,
            wait=wait,
            timeout=self.timeout if wait else None,
            drop_last=self.drop_last,
            lease_s=self.lease_s,
            lease_group=self.lease_group,
            **self.filters,
        )
        if meta.is_empty:
            return None
        self.batch_index += self.stride
        return await self.client.get_data(meta), meta


async def _discard(task: asyncio.Future[Any]) -> None:
    """Cancel a prefetch the consumer will never use, and wait until it is settled."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _stream(
    fetcher: _Fetcher, micro_batch_size: int | None, prefetch: bool
) -> AsyncGenerator[Item, None]:
    """The one implementation of the streaming loop (see the module docstring)."""
    pending: asyncio.Future[Item | None] | None = None
    try:
        while True:
            batch: Item | None = None
            if pending is not None:
                task, pending = pending, None
                batch = await task
            if batch is None:
                batch = await fetcher.fetch(wait=True)
                if batch is None:
                    return  # exhausted for this task
            if prefetch:
                pending = asyncio.ensure_future(fetcher.fetch(wait=False))
            for item in split_micro_batches(batch[0], batch[1], micro_batch_size):
                yield item
    finally:
        if pending is not None:
            await _discard(pending)


async def stream(
    client: AsyncTransferQueueClient,
    data_fields: Sequence[str],
    batch_size: int,
    partition_id: str,
    task_name: str,
    sampling_config: Mapping[str, Any] | None = None,
    micro_batch_size: int | None = None,
    drop_last: bool = False,
    timeout: float | None = None,
    *,
    prefetch: bool = True,
    lease_s: float | None = None,
    where: Mapping[str, Any] | None = None,
    max_version_lag: int | None = None,
    evict: bool = False,
) -> AsyncIterator[Item]:
    """``(TensorDict, BatchMeta)`` micro-batches of ``partition_id`` for ``task_name``, each
    as soon as its rows are ready, until the partition is exhausted for the task.

    ``timeout`` bounds each wait for a batch (``TimeoutError``). ``async for`` it, and
    ``break`` (or ``aclose()``) to stop early; see the module docstring for the prefetch.
    ``lease_s``: rows are leased, and each micro-batch is acked when the next is asked for
    (and the last at the normal end). ``where``, ``max_version_lag``, ``evict``: as in
    ``get_meta``.
    """
    _check_sizes(batch_size, micro_batch_size)
    fetcher = _Fetcher(
        client, data_fields, batch_size, partition_id, task_name, sampling_config,
        drop_last, timeout, lease_s=lease_s, filters=_filters(where, max_version_lag, evict),
    )  # fmt: skip
    inner = _stream(fetcher, micro_batch_size, prefetch)
    previous: BatchMeta | None = None
    try:
        while True:
            if previous is not None:  # before the next fetch: it may wait for these rows
                await client.ack(previous)
                previous = None
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                return
            previous = item[1] if lease_s is not None else None
            yield item
    finally:
        await inner.aclose()
