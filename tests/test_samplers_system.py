"""Group filters and token-budget micro-batches in a running system, on every transport.

Each test starts a system of its own with the sampler under test configured in the
controller: by import path (``tests/samplers_for_tests.py``, importable by actor processes)
or by built-in name, so the same body runs on inproc, zmq and ray.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from transferqueue.config import load_config
from transferqueue.controller.samplers import GRPOGroupNSampler
from transferqueue.metadata import BatchMeta
from transferqueue.runtime.loop import runtime_loop
from transferqueue.streaming import stream
from transferqueue.system import System, start_system


def start(base_config: dict, sampler: Any) -> System:
    cfg = {
        **base_config,
        "storage": {"units": 1},
        "controller": {"sampler": sampler},
        "ray": {"namespace": f"tq-test-samplers-{uuid.uuid4().hex[:8]}"},
    }
    return runtime_loop().run(start_system(load_config(cfg)))


@pytest.fixture(scope="module")
def filter_system(base_config: dict) -> Iterator[System]:
    """A system whose controller drops GRPO groups with equal rewards (DAPO)."""
    system = start(base_config, "samplers_for_tests:DistinctRewardGRPOSampler")
    yield system
    runtime_loop().run(system.aclose())


@pytest.fixture(scope="module")
def budget_system(base_config: dict) -> Iterator[System]:
    """A system whose controller packs token-budget micro-batches in lockstep."""
    system = start(base_config, "token_budget")
    yield system
    runtime_loop().run(system.aclose())


# rewards of 8 groups of 2 rows (uid g): groups 1, 4 and 5 have equal rewards
REWARDS = [[0, 1], [1, 1], [1, 0], [0.5, 1], [0, 0], [2, 2], [0, 2], [3, 1]]
DROPPED = {2, 3, 8, 9, 10, 11}


async def consume_grpo(system: System, pid: str) -> None:
    n = sum(map(len, REWARDS))
    producer, consumer = system.new_async_client(), system.new_async_client()
    try:
        await producer.create_partition(pid, expected_size=n)
        # the consumer waits before any row exists, then streams until the partition ends
        items = stream(consumer, ["id"], 4, pid, "train")
        got = asyncio.ensure_future(collect_rows(items))
        tags = [{"uid": g, "reward": r} for g, rs in enumerate(REWARDS) for r in rs]
        for s in range(0, n, 3):  # groups complete across puts
            chunk = tags[s : s + 3]
            ids = torch.arange(s, s + len(chunk))
            await producer.put({"id": ids}, partition_id=pid, tags=chunk)
        batches = await asyncio.wait_for(got, 60)  # the stream ends: no hang
        assert [len(b) for b in batches] == [4, 4, 2]  # whole kept groups, the tail
        delivered = [r for b in batches for r in b]
        assert not DROPPED & set(delivered)  # a dropped group is never delivered
        assert sorted(delivered) == sorted(set(range(n)) - DROPPED)
        assert await producer.check_consumption_status("train", pid)  # dropped = consumed
        info = await producer.partition_info(pid)
        assert info.dropped == {"train": len(DROPPED)}  # counted where operators look
    finally:
        await producer.close()
        await consumer.close()


async def collect_rows(items: Any) -> list[list[int]]:
    out = []
    async for data, meta in items:
        assert data["id"].tolist() == meta.rows
        out.append(meta.rows)
    return out


async def test_group_dropped_by_keep_group_is_never_delivered_and_stream_ends(
    filter_system: System, pid: str
) -> None:
    await consume_grpo(filter_system, pid)


@pytest.fixture
def instance_system(base_config: dict, transport_name: str) -> Iterator[System]:
    """On inproc: a system whose sampler is an instance with a ``keep_group`` function."""
    if transport_name != "inproc":
        pytest.skip("a function cannot travel to another process: zmq and ray use a class")
    sampler = GRPOGroupNSampler(
        n_samples_per_prompt=2, keep_group=lambda tags: len({t["reward"] for t in tags}) > 1
    )
    system = start(base_config, sampler)
    yield system
    runtime_loop().run(system.aclose())


async def test_keep_group_function_of_an_instance_on_inproc(
    instance_system: System, pid: str
) -> None:
    await consume_grpo(instance_system, pid)
    configured = instance_system.config.controller.sampler  # the controller's own instance
    assert isinstance(configured, GRPOGroupNSampler)
    assert configured.dropped(pid, "train") == len(DROPPED)
    assert configured.stats(pid, "train") == {"dropped_groups": 3, "dropped_rows": 6}


# 3 steps of 2 ranks x 4 rows, then a tail of 6 rows; budget 100 tokens (120: over it)
LENGTHS = [30, 70, 10, 90, 50, 40, 20, 60, 100, 5, 5, 5, 80, 15, 25, 35]
LENGTHS += [45, 55, 65, 75, 85, 95, 12, 120, 33, 18, 28, 38, 48, 58]
BUDGET, DP, BATCH = 100, 2, 4


async def test_every_rank_gets_equal_micro_batch_counts_to_the_end(
    budget_system: System, pid: str
) -> None:
    n = len(LENGTHS)
    clients = [budget_system.new_async_client() for _ in range(DP + 1)]
    producer, ranks = clients[0], clients[1:]

    async def rank(r: int) -> list[BatchMeta]:
        cfg = {"dp_rank": r, "dp_size": DP, "max_tokens_per_micro_batch": BUDGET}
        return [m async for _, m in stream(ranks[r], ["id"], BATCH, pid, "train", cfg)]

    try:
        await producer.create_partition(pid, expected_size=n)
        consumers = [asyncio.ensure_future(rank(r)) for r in range(DP)]
        for s in range(0, n, 5):
            chunk = LENGTHS[s : s + 5]
            ids = torch.arange(s, s + len(chunk))
            await producer.put({"id": ids}, partition_id=pid, tags=[{"seq_len": x} for x in chunk])
        got = await asyncio.wait_for(asyncio.gather(*consumers), 60)
    finally:
        for c in clients:
            await c.close()
    assert len(got[0]) == len(got[1]) > 0  # the same number of micro-batches, tail included
    for metas in got:
        for m in metas:
            tokens = sum(LENGTHS[r] for r in m.rows)
            assert len(m) == 1 or tokens <= BUDGET, (m.rows, tokens)
        rows = 0
        for m in metas:  # steps of BATCH rows per rank: a micro-batch never straddles two
            assert rows // BATCH == (rows + len(m) - 1) // BATCH
            rows += len(m)
    delivered = sorted(r for metas in got for m in metas for r in m.rows)
    assert delivered == list(range(n))
