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

import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from tensordict import TensorDict
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from transferqueue.client import default
from transferqueue.client.connect import connect, shareable, target_config
from transferqueue.client.streams import (
    _check_sizes,
    _Fetcher,
    _filters,
    _stream,
    split_micro_batches,
    stream,
)
from transferqueue.client.sync_facade import TransferQueueClient
from transferqueue.config import Config
from transferqueue.errors import ConfigError, NotInitializedError, TransportUnavailableError
from transferqueue.metadata import BatchMeta

__all__ = ["StreamingDataLoader", "StreamingDataset", "split_micro_batches", "stream"]

Item = tuple[TensorDict, BatchMeta]
T = TypeVar("T")
#: closes a client a dataset made for itself
_Closer = Callable[[], Coroutine[Any, Any, None]]

_INPROC_WORKERS = (
    "DataLoader workers are separate processes and cannot reach an inproc transferqueue "
    "system; start it with tq.init({'transport': 'zmq'}) or tq.init({'transport': 'ray'}), "
    "or use num_workers=0"
)


# ------------------------------------------------------------------- torch facade


def _passthrough(item: Any) -> Any:
    """The DataLoader's collate: items are already batches."""
    return item


def _captured_config(config: Config | Mapping[str, Any] | str | None) -> Config:
    if config is None:
        try:
            return default.get_client().config
        except NotInitializedError:
            raise NotInitializedError(
                "StreamingDataset(config=None) uses the system this process is attached to: "
                "call tq.init() first, or pass the config tq.init returned"
            ) from None
    cfg = target_config(config)
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
        if num_workers > 0 and not shareable(self.config):
            raise TransportUnavailableError(f"StreamingDataset: {_INPROC_WORKERS}")

    def step(self, partition_id: str) -> None:
        """Stream ``partition_id`` from the next iteration on (e.g. ``f"train@{step}"``)."""
        self.partition_id = _check_name("partition_id", partition_id)

    def reset(self) -> None:
        """Make every row of the partition consumable again for this task (a new epoch).
        Call it once, from one process, when every rank has finished the epoch."""
        client, owned = self._open()
        try:
            client.reset_consumption(self.partition_id, self.task_name)
        finally:
            if owned is not None:
                client.run(owned())

    def _open(self) -> tuple[TransferQueueClient, _Closer | None]:
        """The default client when it talks to our system, else one of our own (and the
        coroutine function that closes it)."""
        try:
            mine: TransferQueueClient | None = default.get_client()
        except NotInitializedError:
            mine = None
        if mine is not None and mine.config.system == self.config.system:
            return mine, None
        owned = connect(self.config)
        return owned, owned.async_client.aclose

    def __iter__(self) -> Iterator[Item]:
        worker = get_worker_info()
        if worker is not None:
            self.check_workers(worker.num_workers)
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        client, owned = self._open()
        fetcher = _Fetcher(
            client.async_client, self.data_fields, self.batch_size, self.partition_id, self.task_name,
            self.sampling_config, self.drop_last, self.timeout, offset, stride, self.lease_s,
            self.lease_group, self.filters,
        )  # fmt: skip
        items = client.iterate(_stream(fetcher, self.micro_batch_size, self.prefetch), owned)
        if worker is None and self.acks_after_step:  # in a worker, the loader's process acks
            return _acked(items, client)
        return items

    @property
    def acks_after_step(self) -> bool:
        return self.lease_s is not None and self.ack == "after_step"


def _acked(
    items: Iterator[Item], client: TransferQueueClient, owned: _Closer | None = None
) -> Iterator[Item]:
    """Ack each leased item when the next one is asked for (the step in between finished),
    and the last one at the normal end; an item the consumer stopped at stays unacked."""
    previous: BatchMeta | None = None
    try:
        while True:
            if previous is not None:  # before the next fetch: it may wait for these rows
                client.ack(previous)
                previous = None
            try:
                item = next(items)
            except StopIteration:
                return
            previous = item[1]
            yield item
    finally:
        if owned is not None:
            client.finish(owned())


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
