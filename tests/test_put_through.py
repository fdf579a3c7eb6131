"""A small put in one call: the controller writes the batch to the units and commits
(controller/put_through.py). Larger puts, and puts with a client ``put_hook``, go the
three-step way (begin_put, writes, commit)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import torch

from transferqueue.client.async_client import PUT_THROUGH_BYTES
from transferqueue.config import load_config
from transferqueue.errors import PutLeaseExpiredError, StorageFullError
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports._protocol import STATS
from transferqueue.system import System, start_system

pytestmark = pytest.mark.timeout(90)


def calls(system: System) -> dict[str, int]:
    """How many requests of each method the controller served so far."""
    snap = runtime_loop().run(system.async_client._controller.call(STATS))
    return {m: s["calls"] for m, s in snap["methods"].items()}


def delta(before: dict[str, int], after: dict[str, int], *methods: str) -> list[int]:
    return [after.get(m, 0) - before.get(m, 0) for m in methods]


@pytest.fixture
def striped(base_config: dict) -> Any:
    """Two units, rows placed one by one (a 3-row put spans both), a 1 s put lease."""
    config = {
        **base_config,
        "ray": {"namespace": f"tq-through-{uuid.uuid4().hex[:8]}"},
        "controller": {"put_lease_s": 1.0},
        "storage": {"units": 2, "stripe_rows": 1},
    }
    system = runtime_loop().run(start_system(load_config(config)))
    yield system
    runtime_loop().run(system.aclose())


def test_a_small_put_is_one_controller_call_and_a_large_one_three(client, system, pid) -> None:
    before = calls(system)
    small = client.put(
        {"x": torch.arange(8.0).reshape(2, 4)}, partition_id=pid, tags=[{"a": 1}, {}]
    )
    middle = calls(system)
    assert delta(before, middle, "put", "begin_put", "commit") == [1, 0, 0]
    rows = PUT_THROUGH_BYTES // 4096 + 1  # just over the bound
    big = client.put({"x": torch.ones(rows, 1024)}, partition_id=pid)
    assert delta(middle, calls(system), "put", "begin_put", "commit") == [0, 1, 1]
    assert small.rows == [0, 1] and small.tags == [{"a": 1}, {}] and small.fields == ["x"]
    got = client.get_data(small)
    assert got["x"].tolist() == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    assert client.get_data(big)["x"].sum().item() == rows * 1024
    meta = client.get_meta(["x"], 2, pid, "train", wait=False)
    assert meta.rows == [0, 1] and meta.tags == [{"a": 1}, {}]  # published with its tags
    client.clear_partition(pid)


def test_a_small_put_over_two_units_with_a_cast_and_keys(striped, transport_name, pid) -> None:
    client = striped.client
    first = client.put({"x": torch.zeros(1, 2)}, partition_id=pid)  # x is float32 now
    data = {"x": torch.tensor([[1, 2], [3, 4], [5, 6]]), "s": ["a", "b", None]}  # int64
    meta = client.put(data, partition_id=pid)
    assert len(set(meta.units)) == 2  # placed row by row on both units
    got = client.get_data(meta)
    assert got["x"].dtype == torch.float32  # written as the field's one dtype
    assert got["x"].tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert got["s"] == ["a", "b", None]
    kv = client.kv_put(["k1", "k2"], pid + "-kv", {"y": torch.tensor([[7], [8]])})
    assert kv.fields == ["y"] and len(set(kv.units)) == 2
    assert client.kv_get(["k2", "k1"], pid + "-kv")["y"].tolist() == [[8], [7]]
    assert client.kv_put(["k1"], pid + "-kv", tags=[{"done": True}]).tags == [{"done": True}]
    info = client.partition_info(pid)
    assert (info.size, info.in_flight) == (4, 0) and first.rows == [0]


def hosted(ref: Any) -> Any:
    """The inproc actor behind ``ref``'s dispatcher."""
    from transferqueue.runtime.transports import inproc

    return inproc._hosted[ref.address.endpoint].dispatcher


def test_a_unit_refusing_its_share_releases_every_row(striped, transport_name, pid) -> None:
    if transport_name != "inproc":
        pytest.skip("the unit's refusal is injected in-process")
    client = striped.client
    client.create_partition(pid, expected_size=3)
    client.put({"x": torch.zeros(1, 2)}, partition_id=pid)  # row 0
    units = striped.async_client._units
    refusing = hosted(units[1])
    real = refusing._methods["put"]

    async def refuse(*args: Any, **kwargs: Any) -> int:
        raise StorageFullError("unit 1 refuses this write (injected)")

    refusing._methods["put"] = refuse
    try:  # rows 1 and 2 go one to each unit: one share lands, the other is refused
        with pytest.raises(StorageFullError, match="injected"):
            client.put({"x": torch.ones(2, 2)}, partition_id=pid)
    finally:
        refusing._methods["put"] = real
    info = client.partition_info(pid)
    assert (info.size, info.in_flight, info.pending) == (3, 0, 2)  # both slots back
    stats = [runtime_loop().run(u.call("stats")) for u in units]
    assert sum(s["nbytes"] for s in stats) == 2 * 4  # the landed share was cleared
    again = client.put({"x": torch.ones(2, 2)}, partition_id=pid)
    assert sorted(again.rows) == [1, 2]


def test_a_put_whose_lease_ends_before_the_controller_commits_is_released(
    striped, transport_name, pid
) -> None:
    if transport_name != "inproc":
        pytest.skip("the controller's hook is reachable in-process only")
    controller = hosted(striped.async_client._controller).actor
    client = striped.client
    client.create_partition(pid, expected_size=1)
    reached, go = threading.Event(), asyncio.Event()

    async def hold(point: str) -> None:
        if point == "written":
            reached.set()
            await go.wait()

    controller.put_hook = hold
    try:
        held = runtime_loop().submit(
            striped.async_client.put({"x": torch.ones(1, 4)}, partition_id=pid)
        )
        assert reached.wait(30)
        started = time.monotonic()
        assert client.partition_info(pid).in_flight == 1
        client.seal(pid)
        # the lease (1 s) ends while the controller holds the put: the slot goes back, the
        # seal drops it, the bytes are cleared and the stream ends
        assert client.get_meta(["x"], 1, pid, "train", timeout=30).is_empty
        assert time.monotonic() - started < 3.0
        stats = [runtime_loop().run(u.call("stats")) for u in striped.async_client._units]
        assert sum(s["nbytes"] for s in stats) == 0
    finally:
        controller.put_hook = None
        runtime_loop().loop.call_soon_threadsafe(go.set)
    with pytest.raises(PutLeaseExpiredError):
        held.result(30)
    info = client.partition_info(pid)
    assert (info.size, info.in_flight) == (0, 0)
