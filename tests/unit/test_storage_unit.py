"""StorageUnit: the storage actor, its methods called directly on one event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
import torch

from transferqueue.errors import (
    ConfigError,
    PartitionNotFoundError,
    SchemaError,
    StorageFullError,
)
from transferqueue.storage.unit import StorageUnit

pytestmark = pytest.mark.timeout(30)


def _ints(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64)


async def test_put_get_round_trip_all_column_kinds() -> None:
    unit = StorageUnit(0, 2)
    rows = [1, 3, 5]
    columns = {
        "ids": torch.arange(6).view(3, 2),
        "logp": torch.randn(3, 4).to(torch.bfloat16),
        "resp": [torch.arange(n) for n in (2, 5, 1)],
        "text": ["a", "bb", None],
    }
    assert await unit.put("p", rows, columns) == 6 * 8 + 12 * 2 + 8 * 8 + 3 + 16
    got = await unit.get("p", [5, 1], ["ids", "logp", "resp", "text"])
    assert torch.equal(got["ids"], columns["ids"][[2, 0]])
    assert torch.equal(got["logp"], columns["logp"][[2, 0]])
    assert got["resp"].is_nested and [t.tolist() for t in got["resp"].unbind()] == [[0], [0, 1]]
    assert got["text"] == [None, "a"]


async def test_mixed_shapes_come_back_as_nested_for_the_wire() -> None:
    unit = StorageUnit(0, 1)
    await unit.put("p", [0, 1, 2], {"x": torch.zeros(3, 2)})
    await unit.put("p", [1], {"x": torch.ones(1, 4)})
    got = (await unit.get("p", [0, 1, 2], ["x"]))["x"]
    assert got.is_nested and [t.shape[0] for t in got.unbind()] == [2, 4, 2]
    odd = [torch.zeros(2, 2), torch.zeros(3)]
    await unit.put("p", [0, 1], {"odd": odd})
    assert isinstance((await unit.get("p", [0, 1], ["odd"]))["odd"], list)


async def test_errors_are_typed() -> None:
    unit = StorageUnit(0, 1)
    await unit.put("p", [0], {"x": torch.zeros(1)})
    with pytest.raises(PartitionNotFoundError):
        await unit.get("nope", [0], ["x"])
    with pytest.raises(KeyError, match="row 1"):
        await unit.get("p", [1], ["x"])
    with pytest.raises(SchemaError):
        await unit.put("p", [0, 1], {"x": torch.zeros(3)})
    with pytest.raises(SchemaError):
        await unit.get("p", [0], "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StorageUnit(2, 2)
    with pytest.raises(ConfigError):
        StorageUnit(0, 1, capacity_bytes=-1)


async def test_full_unit_raises_and_writes_nothing() -> None:
    unit = StorageUnit(0, 1, capacity_bytes=800)
    await unit.put("p", _ints(50), {"x": _ints(50)})  # 400 bytes
    with pytest.raises(StorageFullError, match="needs 480 more bytes, 400 of 800"):
        await unit.put("p", _ints(60, 50), {"x": _ints(60)})
    stats = await unit.stats()
    assert stats["nbytes"] == 400 and stats["partitions"]["p"]["rows"] == 50


async def test_clear_frees_bytes_and_is_idempotent() -> None:
    unit = StorageUnit(0, 1)
    await unit.put("p", _ints(10), {"x": _ints(10), "s": ["ab"] * 10})
    assert await unit.clear_rows("p", [0, 1]) == 2 * 8 + 2 * 2
    assert await unit.clear_partition("p") == 8 * 8 + 8 * 2
    assert await unit.clear_partition("p") == 0
    assert await unit.clear_rows("p", [3]) == 0
    stats = await unit.stats()
    assert stats["nbytes"] == 0 and stats["partitions"] == {}


async def _started(coro: Coroutine[Any, Any, int]) -> asyncio.Task[int]:
    """Run ``coro`` as a task; return once it has run up to its first suspension.

    The task sets ``entered`` and goes straight on into ``coro`` without yielding, so by the
    time this coroutine is resumed the put is parked on its condition (or finished).
    """
    entered = asyncio.Event()

    async def run() -> int:
        entered.set()
        return await coro

    task = asyncio.ensure_future(run())
    await entered.wait()
    return task


async def test_blocking_put_is_woken_by_a_clear() -> None:
    unit = StorageUnit(0, 1, capacity_bytes=800, block_when_full=True)
    await unit.put("old", _ints(100), {"x": _ints(100)})  # full
    waiter = await _started(unit.put("new", _ints(50), {"x": _ints(50)}, timeout=20))
    assert not waiter.done() and (await unit.stats())["waiting_puts"] == 1
    await unit.clear_rows("old", _ints(30))  # 240 bytes: not enough for 400
    done, _ = await asyncio.wait({waiter}, timeout=0.05)  # a negative check: it must not finish
    assert not done and (await unit.stats())["waiting_puts"] == 1
    await unit.clear_partition("old")
    assert await waiter == 400
    assert (await unit.get("new", [49], ["x"]))["x"].tolist() == [49]


async def test_blocking_put_times_out_with_storage_full_error() -> None:
    unit = StorageUnit(0, 1, capacity_bytes=100, block_when_full=True)
    await unit.put("p", _ints(10), {"x": _ints(10)})
    with pytest.raises(StorageFullError, match="needs 80 more bytes, 80 of 100"):
        await unit.put("p", _ints(10, 10), {"x": _ints(10)}, timeout=0.05)
    assert (await unit.stats())["waiting_puts"] == 0 and (await unit.stats())["nbytes"] == 80


async def test_put_larger_than_capacity_raises_at_once() -> None:
    unit = StorageUnit(0, 1, capacity_bytes=100, block_when_full=True)
    with pytest.raises(StorageFullError, match="needs 160"):
        await unit.put("p", _ints(20), {"x": _ints(20)})  # no timeout: would wait forever


async def test_cancelled_waiter_leaves_no_trace() -> None:
    unit = StorageUnit(0, 1, capacity_bytes=80, block_when_full=True)
    await unit.put("p", _ints(10), {"x": _ints(10)})
    waiter = await _started(unit.put("q", [0], {"x": _ints(1)}))
    assert (await unit.stats())["waiting_puts"] == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await unit.clear_partition("p")
    assert (await unit.stats())["waiting_puts"] == 0 and (await unit.stats())["partitions"] == {}


async def test_waiters_all_proceed_once_space_frees() -> None:
    unit = StorageUnit(0, 1, capacity_bytes=160, block_when_full=True)
    await unit.put("old", _ints(20), {"x": _ints(20)})
    waiters = [await _started(unit.put(f"w{i}", _ints(10), {"x": _ints(10)})) for i in range(2)]
    assert (await unit.stats())["waiting_puts"] == 2
    await unit.clear_partition("old")
    assert await asyncio.gather(*waiters) == [80, 80]
    assert (await unit.stats())["nbytes"] == 160
