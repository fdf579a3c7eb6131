"""The controller through the client, on every transport: waiting, ending, sharing."""

from __future__ import annotations

import asyncio

import pytest
import torch

from transferqueue.errors import PartitionNotFoundError, SamplerError


async def drain(aclient, pid: str, task: str, batch_size: int, fields=("a",)) -> list[int]:
    rows: list[int] = []
    while True:
        meta = await aclient.get_meta(list(fields), batch_size, pid, task, timeout=60)
        if not meta.rows:
            return rows
        rows += meta.rows


async def test_expected_size_consumer_gets_exactly_n_then_ends(aclient, pid) -> None:
    n = 50
    await aclient.create_partition(pid, expected_size=n)
    consumer = asyncio.ensure_future(drain(aclient, pid, "train", 8))
    for start in range(0, n, 7):  # producers arrive after the consumer started
        k = min(7, n - start)
        await aclient.put({"a": torch.arange(start, start + k)}, partition_id=pid)
    rows = await consumer
    assert sorted(rows) == list(range(n))
    assert await aclient.check_consumption_status("train", pid)


async def test_32_concurrent_consumers_get_disjoint_rows(aclient, pid) -> None:
    n = 640
    await aclient.create_partition(pid, expected_size=n)
    consumers = [asyncio.ensure_future(drain(aclient, pid, "train", 5)) for _ in range(32)]
    for start in range(0, n, 64):
        await aclient.put({"a": torch.arange(start, start + 64)}, partition_id=pid)
    results = await asyncio.gather(*consumers)
    everything = [r for rows in results for r in rows]
    assert len(everything) == n and sorted(everything) == list(range(n))


async def test_rows_waiting_for_a_later_field_keep_the_consumer_waiting(aclient, pid) -> None:
    meta = await aclient.put({"prompt": torch.arange(4)}, partition_id=pid)
    await aclient.seal(pid)
    consumer = asyncio.ensure_future(drain(aclient, pid, "train", 4, ("prompt", "response")))
    first = await aclient.get_meta(["prompt"], 4, pid, "rollout")
    assert not consumer.done()
    await aclient.put({"response": torch.arange(4) * 2}, metadata=first)
    assert sorted(await consumer) == meta.rows


async def test_wait_false_timeout_and_clear_while_waiting(aclient, pid) -> None:
    empty = await aclient.get_meta(["a"], 4, pid, "t", wait=False)
    assert empty.rows == []
    with pytest.raises(TimeoutError):
        await aclient.get_meta(["a"], 4, pid, "t", timeout=0.1)
    waiter = asyncio.ensure_future(aclient.get_meta(["a"], 4, pid, "t", timeout=60))
    await aclient.put({"a": torch.arange(2)}, partition_id=pid)  # not enough: still waiting
    await aclient.clear_partition(pid)
    with pytest.raises(PartitionNotFoundError):
        await waiter
    # a later put creates the partition afresh
    meta = await aclient.put({"a": torch.arange(4)}, partition_id=pid)
    assert meta.rows == [0, 1, 2, 3]


async def test_seal_short_ends_with_final_partial_batch(aclient, pid) -> None:
    await aclient.create_partition(pid, expected_size=10)
    await aclient.put({"a": torch.arange(3)}, partition_id=pid)
    waiter = asyncio.ensure_future(aclient.get_meta(["a"], 8, pid, "t", timeout=60))
    await aclient.seal(pid)
    assert (await waiter).rows == [0, 1, 2]
    assert (await aclient.get_meta(["a"], 8, pid, "t")).rows == []


async def test_reset_consumption_replays(aclient, pid) -> None:
    await aclient.put({"a": torch.arange(4)}, partition_id=pid)
    await aclient.seal(pid)
    assert sorted(await drain(aclient, pid, "t", 3)) == [0, 1, 2, 3]
    await aclient.reset_consumption(pid, "t")
    assert sorted(await drain(aclient, pid, "t", 3)) == [0, 1, 2, 3]


async def test_status_queries_count_pending_slots(aclient, pid) -> None:
    await aclient.create_partition(pid, expected_size=4)
    await aclient.put({"a": torch.arange(2)}, partition_id=pid)
    rows, produced = await aclient.get_production_status(["a"], pid)
    assert rows.tolist() == [0, 1, 2, 3] and produced[:, 0].tolist() == [True, True, False, False]
    assert not await aclient.check_production_status(["a"], pid)
    rows, consumed = await aclient.get_consumption_status("t", pid)
    assert consumed.tolist() == [False] * 4
    info = await aclient.partition_info(pid)
    assert (info.size, info.expected_size, info.sealed, info.produced) == (4, 4, False, {"a": 2})
    assert pid in await aclient.list_partitions()


async def test_grpo_groups_by_tag(aclient, pid) -> None:
    tags = [{"uid": u} for u in (0, 1, 0, 1, 2, 2)]
    await aclient.put({"a": torch.arange(6)}, partition_id=pid, tags=tags)
    from transferqueue.controller.samplers import GRPOGroupNSampler  # noqa: F401

    # the session system runs the sequential sampler; a bad sampling_config key is refused
    with pytest.raises((SamplerError, ValueError)):
        await aclient.get_meta(["a"], 4, pid, "t", {"task_name": "x"})
    meta = await aclient.get_meta(["a"], 6, pid, "t")
    assert [t["uid"] for t in meta.tags] == [0, 1, 0, 1, 2, 2]


async def _until_waiting(aclient, pid: str, task: str, n: int) -> None:
    """Return once the controller counts ``n`` waiting get_meta calls of ``task``."""
    while (await aclient.partition_info(pid)).waiting.get(task, 0) != n:
        pass


async def test_waiters_of_one_task_are_served_in_arrival_order(aclient, pid) -> None:
    await aclient.create_partition(pid)
    assert (await aclient.partition_info(pid)).waiting == {}
    waiters = []
    for n in (1, 2, 3):  # concurrent calls may reach a Ray actor in any order: one at a time
        waiters.append(asyncio.ensure_future(aclient.get_meta(["a"], 2, pid, "t", timeout=60)))
        await asyncio.wait_for(_until_waiting(aclient, pid, "t", n), 30)
    for start in (0, 2, 4):
        await aclient.put({"a": torch.arange(start, start + 2)}, partition_id=pid)
    assert [sorted((await w).rows) for w in waiters] == [[0, 1], [2, 3], [4, 5]]
    assert (await aclient.partition_info(pid)).waiting == {}


async def test_a_rank_waiting_for_a_later_step_does_not_block_its_group() -> None:
    from transferqueue.controller.actor import ControllerActor

    controller = ControllerActor(sampler="rank_aware")
    spec = {"a": {"dtype": "torch.int64", "ndim": 0}}

    def cfg(step: int) -> dict:
        return {"dp_rank": 0, "group_size": 2, "num_groups": 1, "batch_index": step}

    lease = (await controller.begin_put("p", spec, 4))["lease"]
    await controller.commit("p", lease)
    first = await controller.get_meta(["a"], 4, "p", "t", cfg(0))  # rank A, step 0
    waiting = asyncio.ensure_future(controller.get_meta(["a"], 4, "p", "t", cfg(1)))
    await asyncio.sleep(0)  # rank A is now queued for step 1 (no rows for it yet)
    assert not waiting.done()
    second = await controller.get_meta(["a"], 4, "p", "t", cfg(0), wait=False)  # rank B
    assert second.rows == first.rows == [0, 1, 2, 3]
    waiting.cancel()


async def test_a_cancelled_waiting_get_meta_is_withdrawn_and_consumes_nothing(aclient, pid) -> None:
    await aclient.create_partition(pid)
    waiter = asyncio.ensure_future(aclient.get_meta(["a"], 2, pid, "t", timeout=60))
    await asyncio.wait_for(_until_waiting(aclient, pid, "t", 1), 30)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # the controller stops waiting for it too (on zmq and ray it runs in another process)
    await asyncio.wait_for(_until_waiting(aclient, pid, "t", 0), 30)
    await aclient.put({"a": torch.arange(2)}, partition_id=pid)
    assert sorted((await aclient.get_meta(["a"], 2, pid, "t", wait=False)).rows) == [0, 1]


async def test_cancel_wait_withdraws_a_queued_call_or_one_that_has_not_arrived() -> None:
    from transferqueue.controller.actor import ControllerActor

    controller = ControllerActor()
    spec = {"a": {"dtype": "torch.int64", "ndim": 0}}
    await controller.create_partition("p")
    first = asyncio.ensure_future(controller.get_meta(["a"], 2, "p", "t", token="first"))
    second = asyncio.ensure_future(controller.get_meta(["a"], 2, "p", "t", token="second"))
    while (await controller.partition_info("p")).waiting.get("t", 0) != 2:
        await asyncio.sleep(0)  # let both calls reach their wait
    await controller.cancel_wait("second")  # queued behind "first": returns at once, empty
    assert (await second).rows == [] and not first.done()
    # calls may overtake each other: a withdrawal that comes first ends its call on arrival
    await controller.cancel_wait("late")
    assert (await controller.get_meta(["a"], 2, "p", "t", token="late")).rows == []
    lease = (await controller.begin_put("p", spec, 2))["lease"]
    await controller.commit("p", lease)
    assert (await first).rows == [0, 1]  # the withdrawn calls consumed nothing
    assert (await controller.partition_info("p")).waiting == {}
    for i in range(5000):  # withdrawals of calls that never come are forgotten, oldest first
        await controller.cancel_wait(f"never-{i}")
    assert len(controller._withdrawn) <= 4096 and "never-4999" in controller._withdrawn


def test_a_sync_call_whose_caller_gives_up_is_cancelled() -> None:
    import threading

    from transferqueue.runtime.loop import runtime_loop

    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        runtime_loop().run(forever(), timeout=0.05)
    assert cancelled.wait(30)  # Ctrl-C in the caller takes the same path
