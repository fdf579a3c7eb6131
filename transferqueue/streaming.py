"""Streaming consumption: ``stream`` (async), ``StreamingDataset`` and ``StreamingDataLoader``.

A stream hands out the rows of one partition to one task, batch by batch, as soon as the
fields it reads are ready. Each step awaits ``get_meta(wait=True)`` -- woken by the
controller's commits, never by a timer -- then ``get_data``.

How a stream ends
    Exactly when the partition is *exhausted* for the task: it is sealed, or its
    reservation (``expected_size``) is filled, and the task has consumed every row. The last
    batch may be short; ``drop_last=True`` drops it. A partition with neither a seal nor a
    reservation streams until the caller stops iterating (or ``timeout`` expires).

Prefetch (the choice made here)
    While the consumer holds batch *k*, the stream asks for batch *k+1* **without
    waiting** (``get_meta(wait=False)``) and, when rows are ready, fetches their data too. If
    nothing is ready, the next step does the blocking, event-driven ``get_meta`` (which the
    controller withdraws if the consumer is cancelled while it waits). The price of
    prefetching: ``get_meta`` marks rows consumed, so when the consumer stops before the stream's
    end, the one batch already prefetched (at most ``batch_size`` rows) is lost for the task
    (``reset_consumption`` gives every row back). Pass ``prefetch=False`` to lose nothing.

Micro-batches
    A fetched batch of B rows is split into ``micro_batch_size`` pieces, the last one
    smaller (B=10 by 4 gives 4, 4, 2); data and metadata are always split at the same
    boundaries.

Data-parallel ranks
    When ``sampling_config`` holds ``dp_rank`` (``RankAwareSampler``,
    ``SeqlenBalancedSampler``), the stream keeps ``batch_index`` itself: it starts at
    ``sampling_config.get("batch_index", 0)`` and grows by one per fetched batch.

Leases (``lease_s``)
    Rows are handed out leased instead of consumed (docs/async-rl.md): ``StreamingDataset(...,
    lease_s=30)`` acks micro-batch *i* when micro-batch *i+1* is requested -- the training
    step in between finished -- and the last one when the stream ends normally; a consumer
    that dies or stops early leaves its batch unacked, and it is handed out again when the
    lease expires. With DataLoader workers the acks are sent by the process iterating the
    loader (not by the workers, which fetch ahead). ``ack="manual"`` leaves acking to you
    (``client.ack(meta)``).

See docs/streaming.md for DataLoader workers, ``reset`` and ``step``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tensordict import TensorDict
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from transferqueue.config import Config, load_config
from transferqueue.errors import ConfigError, NotInitializedError, TransportUnavailableError
from transferqueue.metadata import BatchMeta
from transferqueue.runtime.loop import LoopThread, background, runtime_loop

if TYPE_CHECKING:
    from transferqueue.client.async_client import AsyncTransferQueueClient
    from transferqueue.system import System

__all__ = ["StreamingDataLoader", "StreamingDataset", "split_micro_batches", "stream"]

Item = tuple[TensorDict, BatchMeta]
T = TypeVar("T")

_INPROC_WORKERS = (
    "DataLoader workers are separate processes and cannot reach an inproc transferqueue "
    "system; start it with tq.init({'transport': 'zmq'}) or tq.init({'transport': 'ray'}), "
    "or use num_workers=0"
)


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


# ------------------------------------------------------------------- torch facade


def _passthrough(item: Any) -> Any:
    """The DataLoader's collate: items are already batches."""
    return item


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _aclose(agen: AsyncGenerator[Any, None], owned: System | None) -> None:
    try:
        await agen.aclose()
    finally:
        if owned is not None:
            await owned.aclose()


def _finish(loop: LoopThread, coro: Coroutine[Any, Any, None]) -> asyncio.Future[Any] | None:
    if loop.in_loop_thread():  # finalised by the garbage collector on the loop itself
        # kept alive until done, and a failure is logged rather than lost
        return background(coro, "closing a stream")
    loop.run(coro)
    return None


def _captured_config(config: Config | Mapping[str, Any] | str | None) -> Config:
    if isinstance(config, str):  # the address `python -m transferqueue serve` prints
        config = {"transport": "zmq", "system": {"controller": config}}
    if config is None:
        from transferqueue.system import current

        try:
            return current().config
        except NotInitializedError:
            raise NotInitializedError(
                "StreamingDataset(config=None) uses the system this process is attached to: "
                "call tq.init() first, or pass the config tq.init returned"
            ) from None
    cfg = load_config(config)
    if cfg.system is None:
        raise ConfigError("the config names no running system: pass the config tq.init() returned")
    return cfg


class StreamingDataset(IterableDataset[Item]):
    """A ``torch`` IterableDataset of ``(TensorDict, BatchMeta)`` micro-batches of one
    partition for one task, streamed as they become ready (see :func:`stream`).

    ``config=None`` captures, at construction, the system this process is attached to, so
    DataLoader workers reach the same system (or pass the config ``tq.init`` returned, or
    the address ``python -m transferqueue serve`` printed). The client is made lazily in the
    process that iterates (fork- and spawn-safe workers). With ``num_workers > 1`` the
    workers share the task's consumption: each row is delivered once. ``drop_last``,
    ``timeout`` and ``prefetch`` are as in :func:`stream`. Example::

        ds = tq.StreamingDataset(["input_ids"], batch_size=8, partition_id="train@0",
                                 task_name="update_actor", micro_batch_size=4)
        for td, meta in tq.StreamingDataLoader(ds):      # ends when train@0 is exhausted
            ...
        ds.reset()                                        # epoch 2: the same rows again
        for td, meta in tq.StreamingDataLoader(ds): ...
        ds.step("train@1")                                # the next partition
    """

    def __init__(
        self,
        data_fields: Sequence[str],
        batch_size: int,
        partition_id: str,
        task_name: str,
        micro_batch_size: int | None = None,
        sampling_config: Mapping[str, Any] | None = None,
        config: Config | Mapping[str, Any] | str | None = None,
        *,
        drop_last: bool = False,
        timeout: float | None = None,
        prefetch: bool = True,
        lease_s: float | None = None,
        ack: str = "after_step",
        where: Mapping[str, Any] | None = None,
        max_version_lag: int | None = None,
        evict: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(batch_size, micro_batch_size)
        if ack not in ("after_step", "manual"):
            raise ValueError(f"ack must be 'after_step' or 'manual', got {ack!r}")
        self.lease_s = lease_s
        self.ack = ack
        #: one lease group for this dataset in every process that iterates it (its pickled
        #: copies in DataLoader workers too): batches the workers fetched ahead are in the
        #: group's hands and do not keep a worker's stream from ending
        self.lease_group = uuid.uuid4().hex
        self.filters = _filters(where, max_version_lag, evict)
        self.data_fields = list(data_fields)
        self.batch_size = batch_size
        self.partition_id = _check_name("partition_id", partition_id)
        self.task_name = _check_name("task_name", task_name)
        self.micro_batch_size = micro_batch_size
        self.sampling_config = dict(sampling_config or {})
        self.drop_last = drop_last
        self.timeout = timeout
        self.prefetch = prefetch
        self.config = _captured_config(config)

    def check_workers(self, num_workers: int) -> None:
        """Raise a clear error when ``num_workers`` DataLoader workers cannot reach the system."""
        if num_workers > 0 and self.config.transport == "inproc":
            raise TransportUnavailableError(f"StreamingDataset: {_INPROC_WORKERS}")

    def step(self, partition_id: str) -> None:
        """Stream ``partition_id`` from the next iteration on (e.g. ``f"train@{step}"``)."""
        self.partition_id = _check_name("partition_id", partition_id)

    def reset(self) -> None:
        """Make every row of the partition consumable again for this task (a new epoch).
        Call it once, from one process, when every rank has finished the epoch."""
        client, owned = self._open()
        loop = runtime_loop()
        try:
            loop.run(client.reset_consumption(self.partition_id, self.task_name))
        finally:
            if owned is not None:
                loop.run(owned.aclose())

    def _open(self) -> tuple[AsyncTransferQueueClient, System | None]:
        """The default client when it talks to our system, else one of our own."""
        from transferqueue import system

        try:
            default: System | None = system.current()
        except NotInitializedError:
            default = None
        if default is not None and default.config.system == self.config.system:
            return default.async_client, None
        owned = system.attach_system(self.config)
        return owned.async_client, owned

    def __iter__(self) -> Iterator[Item]:
        worker = get_worker_info()
        if worker is not None:
            self.check_workers(worker.num_workers)
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        client, owned = self._open()
        fetcher = _Fetcher(
            client, self.data_fields, self.batch_size, self.partition_id, self.task_name,
            self.sampling_config, self.drop_last, self.timeout, offset, stride, self.lease_s,
            self.lease_group, self.filters,
        )  # fmt: skip
        agen = _stream(fetcher, self.micro_batch_size, self.prefetch)
        items = _sync_iter(agen, owned)
        if worker is None and self.acks_after_step:  # in a worker, the loader's process acks
            return _acked(items, client)
        return items

    @property
    def acks_after_step(self) -> bool:
        return self.lease_s is not None and self.ack == "after_step"


def _acked(
    items: Iterator[Item], client: AsyncTransferQueueClient, owned: System | None = None
) -> Iterator[Item]:
    """Ack each leased item when the next one is asked for (the step in between finished),
    and the last one at the normal end; an item the consumer stopped at stays unacked."""
    loop = runtime_loop()
    previous: BatchMeta | None = None
    try:
        while True:
            if previous is not None:  # before the next fetch: it may wait for these rows
                loop.run(client.ack(previous))
                previous = None
            try:
                item = next(items)
            except StopIteration:
                return
            previous = item[1]
            yield item
    finally:
        if owned is not None:
            _finish(loop, owned.aclose())


def _sync_iter(agen: AsyncGenerator[Item, None], owned: System | None) -> Iterator[Item]:
    """Drive ``agen`` on the runtime loop from a synchronous caller."""
    loop = runtime_loop()
    try:
        while True:
            try:
                item = loop.run(_anext(agen))
            except StopAsyncIteration:
                return
            yield item
    finally:
        _finish(loop, _aclose(agen, owned))


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty str, got {value!r}")
    return value


class StreamingDataLoader(DataLoader[Item]):
    """A DataLoader over a :class:`StreamingDataset` that passes its items through as they
    are (``batch_size=None``, no collation). With an inproc system ``num_workers`` must be
    0. Other keyword arguments go to :class:`torch.utils.data.DataLoader`."""

    def __init__(
        self,
        dataset: StreamingDataset,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        **kwargs: Any,
    ) -> None:
        fixed = sorted(
            {"batch_size", "collate_fn", "shuffle", "sampler", "batch_sampler"} & set(kwargs)
        )
        if fixed:
            raise TypeError(f"StreamingDataLoader sets {fixed} itself; do not pass them")
        if isinstance(dataset, StreamingDataset):
            dataset.check_workers(num_workers)
        super().__init__(
            dataset,
            batch_size=None,
            collate_fn=_passthrough,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            **kwargs,
        )

    def __iter__(self) -> Iterator[Item]:  # type: ignore[override]
        items: Iterator[Item] = super().__iter__()
        dataset = self.dataset
        if (
            self.num_workers > 0
            and isinstance(dataset, StreamingDataset)
            and dataset.acks_after_step  # the workers fetch ahead: acks come from here
        ):
            client, owned = dataset._open()
            return _acked(items, client, owned)
        return items
