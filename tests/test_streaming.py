"""Streaming consumption (``stream``, ``StreamingDataset``, ``StreamingDataLoader``) on every
transport; worker processes on zmq and ray."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

import transferqueue as tq
from transferqueue.client.async_client import AsyncTransferQueueClient
from transferqueue.config import Config, load_config
from transferqueue.controller.samplers import BaseSampler, RankAwareSampler, SeqlenBalancedSampler
from transferqueue.errors import TransportUnavailableError
from transferqueue.metadata import BatchMeta
from transferqueue.runtime.loop import runtime_loop
from transferqueue.streaming import split_micro_batches, stream
from transferqueue.system import System, start_system


def rows_of(n: int, start: int = 0) -> dict[str, Any]:
    ids = torch.arange(start, start + n)
    return {
        "id": ids,
        "resp": [torch.arange(int(i) % 5 + 1) + int(i) for i in ids],  # jagged
    }


def check_rows(data: Any, meta: BatchMeta) -> None:
    """The data holds exactly meta's rows (row r carries id r)."""
    assert data.batch_size[0] == len(meta)
    assert data["id"].tolist() == meta.rows
    for r, resp in zip(meta.rows, data["resp"].unbind()):
        assert resp.tolist() == [r + k for k in range(r % 5 + 1)]


class SpyClient:
    """Delegates to a client; ``asked`` is set once the consumer has asked for a batch."""

    def __init__(self, inner: AsyncTransferQueueClient) -> None:
        self._inner = inner
        self.asked = asyncio.Event()

    async def get_meta(self, *args: Any, **kwargs: Any) -> BatchMeta:
        self.asked.set()
        return await self._inner.get_meta(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def collect(items: AsyncIterator[tuple[Any, BatchMeta]]) -> list[BatchMeta]:
    metas = []
    async for data, meta in items:
        check_rows(data, meta)
        metas.append(meta)
    return metas


def clients_for(system: System, n: int) -> list[AsyncTransferQueueClient]:
    return [system.new_async_client() for _ in range(n)]


# --------------------------------------------------------------- ending exactly


async def test_consumer_started_first_gets_every_row_then_stops(aclient, system, pid) -> None:
    n = 23
    await aclient.create_partition(pid, expected_size=n)
    spy = SpyClient(aclient)

    async def consume() -> list[tuple[list[int], list[int]]]:
        return [(m.rows, d["id"].tolist()) async for d, m in stream(spy, ["id"], 4, pid, "train")]

    consumer = asyncio.ensure_future(consume())
    await spy.asked.wait()  # the consumer waits before any row exists
    producers = clients_for(system, 3)
    order = list(range(n))
    random.Random(5).shuffle(order)
    written: dict[int, int] = {}  # row -> the id put into it

    async def produce(c: AsyncTransferQueueClient, ids: list[int]) -> None:
        for i in ids:  # one row at a time, in random order
            meta = await c.put({"id": torch.tensor([i])}, partition_id=pid)
            written[meta.rows[0]] = i

    try:
        await asyncio.gather(*(produce(c, order[k::3]) for k, c in enumerate(producers)))
    finally:
        for c in producers:
            await c.close()
    batches = await asyncio.wait_for(consumer, 60)
    for rows, ids in batches:
        assert ids == [written[r] for r in rows]
    assert sorted(r for rows, _ in batches for r in rows) == list(range(n))  # no early exit
    assert [len(rows) for rows, _ in batches] == [4, 4, 4, 4, 4, 3]  # the tail, then the end


async def test_seal_short_ends_the_stream_with_what_was_produced(aclient, pid) -> None:
    await aclient.create_partition(pid, expected_size=100)
    spy = SpyClient(aclient)
    consumer = asyncio.ensure_future(collect(stream(spy, ["id", "resp"], 4, pid, "train")))
    dropper = asyncio.ensure_future(
        collect(stream(aclient, ["id", "resp"], 4, pid, "other", drop_last=True))
    )
    await spy.asked.wait()
    await aclient.put(rows_of(7), partition_id=pid)
    await aclient.seal(pid)
    metas = await asyncio.wait_for(consumer, 60)
    assert [m.rows for m in metas] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [m.rows for m in await asyncio.wait_for(dropper, 60)] == [[0, 1, 2, 3]]


async def test_no_seal_no_reservation_streams_until_the_caller_stops(aclient, pid) -> None:
    await aclient.put(rows_of(3), partition_id=pid)
    items = stream(aclient, ["id", "resp"], 2, pid, "train")
    data, meta = await items.__anext__()
    assert meta.rows == [0, 1]
    for start, want in ((3, [2, 3]), (4, [4, 5])):
        # caught up with the producers: the stream does not end, it waits for more rows
        waiting = asyncio.ensure_future(items.__anext__())
        await aclient.put(rows_of(want[-1] - start + 1, start=start), partition_id=pid)
        data, meta = await asyncio.wait_for(waiting, 60)
        check_rows(data, meta)
        assert meta.rows == want
    await items.aclose()  # the caller stops: nothing is left waiting in the controller
    await aclient.put(rows_of(2, start=6), partition_id=pid)
    assert (await aclient.get_meta(["id"], 2, pid, "train", wait=False)).rows == [6, 7]


async def test_timeout_bounds_each_wait(aclient, pid) -> None:
    await aclient.create_partition(pid, expected_size=4)
    with pytest.raises(TimeoutError):
        await collect(stream(aclient, ["id"], 2, pid, "train", timeout=0.2))


# -------------------------------------------------------------- micro-batches


def test_micro_batches_split_data_and_meta_at_the_same_boundaries(client, pid) -> None:
    client.put(rows_of(10), partition_id=pid)
    client.seal(pid)
    ds = tq.StreamingDataset(
        ["id", "resp"], 10, pid, "train", micro_batch_size=4, config=client.config
    )
    items = list(tq.StreamingDataLoader(ds))
    assert [len(meta) for _, meta in items] == [4, 4, 2]
    assert [data.batch_size[0] for data, _ in items] == [4, 4, 2]
    for data, meta in items:
        check_rows(data, meta)
    assert [r for _, m in items for r in m.rows] == list(range(10))


def test_split_micro_batches_rejects_mismatched_data() -> None:
    from tensordict import TensorDict

    with pytest.raises(ValueError, match="rows"):
        split_micro_batches(TensorDict({}, batch_size=[3]), BatchMeta("p", [0, 1]), 1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        tq.StreamingDataset(["a"], 4, "p", "t", micro_batch_size=0, config=_any_config())


def _any_config() -> Config:
    return load_config({"system": {"controller": {}, "units": []}})


# -------------------------------------------------------- dataset: reset, step


def test_reset_replays_and_step_switches_partition(client, pid) -> None:
    other = f"{pid}-next"
    client.put(rows_of(6), partition_id=pid)
    client.put(rows_of(3), partition_id=other)
    client.seal(pid)
    client.seal(other)
    ds = tq.StreamingDataset(["id", "resp"], 4, pid, "train", config=client.config)
    loader = tq.StreamingDataLoader(ds)
    epoch = [r for _, m in loader for r in m.rows]
    assert epoch == list(range(6))
    assert [m for _, m in loader] == []  # consumed: a second pass is empty...
    ds.reset()
    assert [r for _, m in loader for r in m.rows] == epoch  # ...until reset
    ds.step(other)
    assert [r for _, m in loader for r in m.rows] == [0, 1, 2]
    client.clear_partition(other)


def test_breaking_out_of_a_loader_leaves_nothing_behind(client, pid) -> None:
    client.put(rows_of(4), partition_id=pid)  # no seal: the stream would wait forever
    ds = tq.StreamingDataset(["id", "resp"], 2, pid, "train", config=client.config)
    for _, meta in tq.StreamingDataLoader(ds):
        assert meta.rows == [0, 1]
        break  # a batch prefetched meanwhile ([2, 3]) is lost for the task (documented)
    client.put(rows_of(2, start=4), partition_id=pid)
    client.seal(pid)  # so that a short batch can be handed out
    left = client.get_meta(["id"], 8, pid, "train", wait=False).rows
    assert left in ([2, 3, 4, 5], [4, 5])  # nothing left waiting took rows 4 and 5


# ----------------------------------------------------------- DataLoader workers


def _produce_later(client: Any, pid: str, start: int, n: int, chunk: int) -> threading.Thread:
    def run() -> None:
        for s in range(start, start + n, chunk):
            client.put(rows_of(min(chunk, start + n - s), start=s), partition_id=pid)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_deliver_each_row_once(system, client, pid, context) -> None:
    n = 60
    client.create_partition(pid, expected_size=n)
    client.put(rows_of(10), partition_id=pid)
    ds = tq.StreamingDataset(
        ["id", "resp"], 4, pid, "train", micro_batch_size=3, config=system.config
    )
    kwargs = {"multiprocessing_context": context}
    if system.config.transport == "inproc":
        with pytest.raises(TransportUnavailableError, match="zmq"):
            tq.StreamingDataLoader(ds, num_workers=2, **kwargs)
        return
    loader = tq.StreamingDataLoader(ds, num_workers=2, **kwargs)
    producer = _produce_later(client, pid, 10, n - 10, 5)
    try:
        rows: list[int] = []
        for data, meta in loader:
            check_rows(data, meta)
            rows += meta.rows
    finally:
        producer.join()
    assert sorted(rows) == list(range(n))


def test_dataloader_workers_with_leases_are_acked_by_the_loader(system, client, pid) -> None:
    if system.config.transport == "inproc":
        pytest.skip("DataLoader workers need the zmq or ray transport")
    n = 24
    client.create_partition(pid, expected_size=n)
    client.put(rows_of(n), partition_id=pid)
    ds = tq.StreamingDataset(["id"], 4, pid, "train", config=system.config, lease_s=60)
    loader = tq.StreamingDataLoader(ds, num_workers=2, multiprocessing_context="spawn")
    rows: list[int] = []
    for _, meta in loader:  # the workers fetch ahead; this process acks what it finished
        assert meta.lease
        rows += meta.rows
    assert sorted(rows) == list(range(n))
    info = client.partition_info(pid)
    assert info.consumed == {"train": n} and info.leased == {} and info.redelivered == {}
    client.clear_partition(pid)


def test_plain_dataloader_workers_on_inproc_raise_a_clear_error(system, pid) -> None:
    if system.config.transport != "inproc":
        pytest.skip("inproc only")
    ds = tq.StreamingDataset(["id"], 4, pid, "train", config=system.config)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(TransportUnavailableError, match="ray"):
        next(iter(loader))


def _produce_in_process(config: Config, pid: str, n: int) -> None:
    tq.init(config)
    try:
        client = tq.get_client()
        for s in range(0, n, 4):
            client.put(rows_of(min(4, n - s), start=s), partition_id=pid)
    finally:
        tq.close()


async def test_producer_in_another_process(aclient, system, pid) -> None:
    if system.config.transport == "inproc":
        pytest.skip("an inproc system lives in one process")
    n = 18
    await aclient.create_partition(pid, expected_size=n)
    consumer = asyncio.ensure_future(collect(stream(aclient, ["id", "resp"], 5, pid, "train")))
    method = "spawn" if system.config.transport == "ray" else "fork"  # Ray forbids fork
    proc = multiprocessing.get_context(method).Process(
        target=_produce_in_process, args=(system.config, pid, n)
    )
    proc.start()
    try:
        metas = await asyncio.wait_for(consumer, 90)
    finally:
        await asyncio.to_thread(proc.join, 60)
    assert proc.exitcode == 0
    assert sorted(r for m in metas for r in m.rows) == list(range(n))


# ------------------------------------------------------------ data-parallel ranks


class DispatchSampler(BaseSampler):
    """RankAwareSampler, or SeqlenBalancedSampler for a sampling_config with ``dp_size``:
    one test system serves both (importable by actor processes as a module path)."""

    def __init__(self) -> None:
        self.rank_aware = RankAwareSampler()
        self.seqlen = SeqlenBalancedSampler(n_samples_per_prompt=2)

    def _pick(self, cfg: dict[str, Any]) -> BaseSampler:
        return self.seqlen if "dp_size" in cfg else self.rank_aware

    def sample(
        self, ready_rows: list[int], batch_size: int, **cfg: Any
    ) -> tuple[list[int], list[int]]:
        return self._pick(cfg).sample(ready_rows, batch_size, **cfg)

    def candidate_limit(self, batch_size: int, **cfg: Any) -> int | None:
        return self._pick(cfg).candidate_limit(batch_size, **cfg)

    def on_clear(self, partition_id: str) -> None:
        self.rank_aware.on_clear(partition_id)
        self.seqlen.on_clear(partition_id)

    def on_reset(self, partition_id: str, task_name: str | None) -> None:
        self.rank_aware.on_reset(partition_id, task_name)
        self.seqlen.on_reset(partition_id, task_name)


@pytest.fixture(scope="module")
def ranked_system(base_config: dict):
    """A second system whose controller uses the data-parallel samplers."""
    cfg = {**base_config, "storage": {"units": 1}}
    cfg["controller"] = {"sampler": "test_streaming:DispatchSampler"}
    cfg["ray"] = {"namespace": "transferqueue-tests-dp-samplers"}
    started = runtime_loop().run(start_system(load_config(cfg)))
    yield started
    runtime_loop().run(started.aclose())


async def test_rank_aware_groups_get_identical_micro_batches(ranked_system, pid) -> None:
    groups, group_size, n, batch = 2, 2, 40, 4
    consumers = clients_for(ranked_system, groups * group_size)
    producer = clients_for(ranked_system, 1)[0]
    fast_done = asyncio.Event()
    seen: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}

    async def rank(group: int, member: int, client: AsyncTransferQueueClient) -> None:
        if (group, member) == (0, 1):
            await fast_done.wait()  # the slow rank starts after everyone else finished
        cfg = {"dp_rank": group, "group_size": group_size, "num_groups": groups}
        items = stream(client, ["id", "resp"], batch, pid, "train", cfg, micro_batch_size=3)
        seen[group, member] = [(m.rows, d["id"].tolist()) async for d, m in items]

    try:
        await producer.create_partition(pid, expected_size=n)
        fast = [
            asyncio.ensure_future(rank(g, m, consumers[g * group_size + m]))
            for g in range(groups)
            for m in range(group_size)
            if (g, m) != (0, 1)
        ]
        slow = asyncio.ensure_future(rank(0, 1, consumers[1]))
        for s in range(0, n, 4):
            await producer.put(rows_of(4, start=s), partition_id=pid)
        await asyncio.wait_for(asyncio.gather(*fast), 60)
        fast_done.set()
        await asyncio.wait_for(slow, 60)
    finally:
        for c in [*consumers, producer]:
            await c.close()
    for g in range(groups):
        assert seen[g, 0] == seen[g, 1]  # identical micro-batches, in the same order
        assert all(rows == ids for rows, ids in seen[g, 0])
    assert len({len(v) for v in seen.values()}) == 1  # equal step counts
    assert [len(rows) for rows, _ in seen[0, 0]] == [3, 1] * 5
    rows0 = {r for rows, _ in seen[0, 0] for r in rows}
    rows1 = {r for rows, _ in seen[1, 0] for r in rows}
    assert not rows0 & rows1 and rows0 | rows1 == set(range(n))


def test_rank_aware_dataloader_keeps_batch_index(ranked_system, pid) -> None:
    client = ranked_system.client
    client.put(rows_of(16), partition_id=pid)
    client.seal(pid)
    got = []
    for group in range(2):
        cfg = {"dp_rank": group, "group_size": 1, "num_groups": 2}
        ds = tq.StreamingDataset(
            ["id", "resp"], 4, pid, "train", sampling_config=cfg, config=ranked_system.config
        )
        got.append([m.rows for _, m in tq.StreamingDataLoader(ds)])
    assert len(got[0]) == len(got[1]) == 2
    assert sorted(r for g in got for b in g for r in b) == list(range(16))


async def test_seqlen_balanced_ranks_share_every_global_batch(ranked_system, pid) -> None:
    lengths = [9, 1, 4, 4, 7, 2, 3, 3, 8, 8, 1, 1, 5, 6, 2, 2]  # rows 2k, 2k+1: one uid group
    n, dp, batch = len(lengths), 2, 4
    consumers = clients_for(ranked_system, dp)
    seen: dict[int, list[list[int]]] = {}

    async def rank(r: int) -> None:
        cfg = {"dp_rank": r, "dp_size": dp}
        seen[r] = [m.rows async for _, m in stream(consumers[r], ["id"], batch, pid, "train", cfg)]

    try:
        await consumers[0].create_partition(pid, expected_size=n)
        ranks = [asyncio.ensure_future(rank(r)) for r in range(dp)]
        for s in range(0, n, 4):
            tags = [{"uid": i // 2, "total_lengths": lengths[i]} for i in range(s, s + 4)]
            await consumers[0].put(rows_of(4, start=s), partition_id=pid, tags=tags)
        await asyncio.wait_for(asyncio.gather(*ranks), 60)
    finally:
        for c in consumers:
            await c.close()
    assert len(seen[0]) == len(seen[1]) == n // (batch * dp)  # equal steps
    for a, b in zip(seen[0], seen[1]):
        assert len(a) == len(b) == batch and not set(a) & set(b)
        step = set(a) | set(b)
        assert all((r ^ 1) in step for r in step)  # whole uid groups per global batch
    assert sorted(r for v in seen.values() for b in v for r in b) == list(range(n))


def test_a_stream_closed_on_the_loop_thread_logs_its_failure(caplog) -> None:
    from transferqueue.client.sync_facade import finish_on
    from transferqueue.runtime.loop import runtime_loop

    async def failing_close() -> None:
        raise RuntimeError("could not close")

    async def on_the_loop() -> None:  # as when the garbage collector finalises it there
        task = finish_on(runtime_loop(), failing_close())
        assert task is not None
        with contextlib.suppress(RuntimeError):
            await task

    with caplog.at_level("WARNING", logger="transferqueue.loop"):
        runtime_loop().run(on_the_loop())
    assert "closing a stream failed: could not close" in caplog.text
