"""Async RL primitives on every transport: consumer leases (ack / nack / expiry), staleness-
bounded admission (reserve / advance_version), tag-filtered waits and kv_list waits."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from typing import Any

import fault_procs
import pytest
import torch

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import start_system

pytestmark = pytest.mark.timeout(90)
SPAWN = multiprocessing.get_context("spawn")


def rows(n: int, start: int = 0) -> dict[str, Any]:
    return {"x": torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1)}


# --------------------------------------------------------------------- consumer leases


def test_leased_rows_are_consumed_only_when_acked(client, pid) -> None:
    client.create_partition(pid, expected_size=4)
    client.put(rows(4), partition_id=pid)
    meta = client.get_meta(["x"], 2, pid, "train", lease_s=60)
    assert meta.rows == [0, 1] and meta.lease and meta.task_name == "train"
    info = client.partition_info(pid)
    assert info.leased == {"train": 2} and info.consumed == {"train": 0}
    other = client.get_meta(["x"], 2, pid, "train", lease_s=60)  # leased rows are not ready
    assert other.rows == [2, 3]
    assert client.ack(other) == {"acked": 2, "not_leased": 0, "ended": ""}
    assert not client.check_consumption_status("train", pid)  # 0, 1 are leased, not acked
    assert client.ack(meta)["acked"] == 2
    assert client.check_consumption_status("train", pid)
    again = client.ack(meta)  # acking twice is reported, not counted twice
    assert again == {"acked": 0, "not_leased": 2, "ended": "acked"}
    assert client.partition_info(pid).consumed == {"train": 4}
    with pytest.raises(ValueError, match="leased batch"):
        client.ack(tq.BatchMeta(pid, [0], ["x"]))
    client.clear_partition(pid)


def test_a_nacked_batch_is_handed_out_again_before_newer_rows(client, pid) -> None:
    client.create_partition(pid, expected_size=6)
    client.put(rows(6), partition_id=pid)
    first = client.get_meta(["x"], 2, pid, "train", lease_s=60)
    second = client.get_meta(["x"], 2, pid, "train", lease_s=60)
    assert client.nack(second) == 2
    assert client.get_meta(["x"], 2, pid, "train", lease_s=60).rows == second.rows
    assert client.partition_info(pid).redelivered == {"train": 2}
    assert client.ack(first)["acked"] == 2
    client.clear_partition(pid)


async def test_an_expired_lease_redelivers_and_its_late_ack_is_reported(
    aclient, system, pid
) -> None:
    await aclient.create_partition(pid, expected_size=2)
    await aclient.put(rows(2), partition_id=pid)
    held = await aclient.get_meta(["x"], 2, pid, "train", lease_s=0.5)
    # another consumer waits (rows leased to it would not keep its own stream open);
    # it is woken by the lease's expiry (the controller's one timer)
    other = system.new_async_client()
    again = await other.get_meta(["x"], 2, pid, "train", lease_s=60, timeout=30)
    assert again.rows == held.rows and again.lease != held.lease
    late = await aclient.ack(held)
    assert late == {"acked": 0, "not_leased": 2, "ended": "expired"}
    assert (await aclient.ack(again))["acked"] == 2
    info = await aclient.partition_info(pid)
    assert info.consumed == {"train": 2} and info.redelivered == {"train": 2}
    assert (await aclient.get_meta(["x"], 2, pid, "train", timeout=30)).is_empty
    await other.close()
    await aclient.clear_partition(pid)


def test_a_streaming_dataset_acks_each_step_after_it_finished(client, system, pid) -> None:
    client.create_partition(pid, expected_size=6)
    client.put(rows(6), partition_id=pid)
    ds = tq.StreamingDataset(
        ["x"], 2, pid, "train", config=system.config, lease_s=60, prefetch=False
    )
    seen = []
    for _, meta in ds:
        info = client.partition_info(pid)
        # the batch in hand is leased; every earlier one was acked when this was asked for
        assert info.leased == {"train": 2} and info.consumed["train"] == len(seen)
        seen += meta.rows
    assert seen == list(range(6))
    info = client.partition_info(pid)
    assert info.consumed == {"train": 6} and info.leased == {}  # the last acked at the end
    client.clear_partition(pid)


def test_a_consumer_killed_holding_a_leased_batch_is_redelivered_and_acked_once(
    base_config, transport_name, pid
) -> None:
    if transport_name == "inproc":
        pytest.skip("a consumer process needs the zmq or ray transport")
    import uuid

    config = {**base_config, "ray": {"namespace": f"tq-arl-{uuid.uuid4().hex[:8]}"}}
    system = runtime_loop().run(start_system(load_config(config)))
    try:
        client = system.client
        client.create_partition(pid, expected_size=6)
        client.put(rows(6), partition_id=pid)
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(
            target=fault_procs.consumer_holding_a_leased_batch,
            args=(system.config, pid, 1.0, child),
            daemon=True,
        )
        proc.start()
        assert parent.poll(60)
        held = parent.recv()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        acked: list[int] = []
        while True:  # the others stream on; the dead consumer's rows come back, first
            meta = client.get_meta(["x"], 2, pid, "train", lease_s=60, timeout=30)
            if meta.is_empty:
                break
            assert client.ack(meta)["acked"] == len(meta.rows)
            acked += meta.rows
        assert sorted(acked) == list(range(6))  # every row acked exactly once
        assert set(held) <= set(acked)
        info = client.partition_info(pid)
        assert info.consumed == {"train": 6} and info.redelivered == {"train": len(held)}
    finally:
        runtime_loop().run(system.aclose())


# --------------------------------------------------------------------- admission


async def test_reserve_waits_for_the_trainer_and_advance_version_releases_it(aclient, pid) -> None:
    info = await aclient.create_partition(pid, max_staleness=0, global_batch_size=2)
    assert (info.version, info.max_staleness) == (0, 0)
    first = await aclient.reserve(pid, 2)
    assert [t["version"] for t in first.tags] == [0, 0]
    assert (await aclient.reserve(pid, 1, wait=False)).rows == []  # k = 0: nothing more now
    blocked = asyncio.ensure_future(aclient.reserve(pid, 2, timeout=60))
    while (await aclient.partition_info(pid)).reserving < 1:  # it arrived and waits
        assert not blocked.done()
    await aclient.put(rows(2), metadata=first)  # fills the reserved slots
    assert not blocked.done()
    assert await aclient.advance_version(pid) == 1
    second = await blocked
    assert [t["version"] for t in second.tags] == [1, 1]
    assert set(second.rows).isdisjoint(first.rows)
    with pytest.raises(TimeoutError, match="advanced"):
        await aclient.reserve(pid, 1, timeout=0.2)
    meta = await aclient.get_meta(["x"], 2, pid, "train", timeout=30)
    assert meta.rows == first.rows and [t["version"] for t in meta.tags] == [0, 0]
    await aclient.clear_partition(pid)


async def test_rows_too_many_versions_old_are_skipped_or_evicted(aclient, pid) -> None:
    await aclient.create_partition(pid, max_staleness=2, global_batch_size=2)
    old = await aclient.reserve(pid, 2)
    await aclient.put(rows(2), metadata=old)
    await aclient.advance_version(pid)
    await aclient.advance_version(pid)
    new = await aclient.reserve(pid, 2)
    await aclient.put(rows(2, 10), metadata=new)
    fresh = await aclient.get_meta(["x"], 2, pid, "learner", max_version_lag=1, wait=False)
    assert fresh.rows == new.rows  # version 0 is 2 behind: skipped
    await aclient.seal(pid)
    evicted = await aclient.get_meta(
        ["x"], 2, pid, "critic", max_version_lag=1, evict=True, timeout=30
    )
    assert evicted.rows == new.rows
    assert (await aclient.get_meta(["x"], 2, pid, "critic", timeout=30)).is_empty
    assert (await aclient.partition_info(pid)).evicted == {"critic": 2}
    await aclient.clear_partition(pid)


# --------------------------------------------------------------------- tag filters


async def test_a_tag_only_put_wakes_a_where_waiter(aclient, system, pid) -> None:
    other = system.new_async_client()
    await aclient.kv_put(["a", "b"], pid, rows(2), tags=[{"status": "running"}] * 2)
    waiting = asyncio.ensure_future(
        aclient.get_meta(["x"], 1, pid, "train", where={"status": "finished"}, timeout=60)
    )
    while (await other.partition_info(pid)).waiting.get("train", 0) < 1:
        assert not waiting.done()
    await other.kv_put(["b"], pid, tags=[{"status": "finished"}])  # tags only, no data
    meta = await waiting
    assert meta.rows == [1] and meta.tags[0]["status"] == "finished"
    await other.close()
    await aclient.clear_partition(pid)


async def test_kv_list_waits_until_enough_keys_match(aclient, system, pid) -> None:
    other = system.new_async_client()
    await aclient.kv_put(["a", "b", "c"], pid, tags=[{"done": False}] * 3)
    waiting = asyncio.ensure_future(
        aclient.kv_list(pid, where={"done": True}, min_count=2, timeout=60)
    )
    await other.kv_put(["a"], pid, tags=[{"done": True}])
    assert not waiting.done()  # one key matches: it cannot have returned
    await other.kv_put(["c"], pid, tags=[{"done": True}])
    assert sorted((await waiting)[pid]) == ["a", "c"]
    with pytest.raises(TimeoutError):
        await aclient.kv_list(pid, where={"done": True}, min_count=3, timeout=0.2)
    await other.close()
    await aclient.clear_partition(pid)


def test_callable_where_in_the_controllers_process() -> None:
    tq.init({"runtime": {"inproc_codec": False}})  # functions cannot cross a wire
    try:
        client = tq.get_client()
        client.kv_put(["a", "b"], "cw", rows(2), tags=[{"reward": 0.1}, {"reward": 0.9}])
        meta = client.get_meta(
            ["x"], 1, "cw", "t", where=lambda tags: tags.get("reward", 0) > 0.5, timeout=10
        )
        assert meta.rows == [1]
    finally:
        tq.close()
