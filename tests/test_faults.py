"""The fault-injection suite: real processes, real SIGKILL, at points chosen by a barrier.

Each test kills (or on inproc: abandons) one piece -- a producer between ``begin_put`` and
``commit``, a consumer holding a batch, a storage unit holding rows, the controller under
waiting consumers -- and asserts the promised outcome within the promised time, then that the
rest of the system keeps serving. Systems here are the test's own, with a 1 s put lease.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import fault_procs
import pytest
import torch

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.errors import ActorDiedError, RowsLostError, SchemaError
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import System, start_system

pytestmark = pytest.mark.timeout(90)

LEASE_S = 1.0
SPAWN = multiprocessing.get_context("spawn")


def own_system(base_config: dict, **storage: Any) -> System:
    import uuid

    config = {
        **base_config,
        "ray": {"namespace": f"tq-faults-{uuid.uuid4().hex[:8]}"},
        "controller": {"put_lease_s": LEASE_S},
        "storage": {"units": 2, **storage},
    }
    return runtime_loop().run(start_system(load_config(config)))


@pytest.fixture
def fresh(base_config: dict) -> Iterator[System]:
    """A system of this test alone (it may kill parts of it)."""
    system = own_system(base_config)
    yield system
    started = time.monotonic()
    runtime_loop().run(system.aclose())
    assert time.monotonic() - started < 5.0, "closing a system whose actors died took > 5 s"


@pytest.fixture(scope="module")
def leased(base_config: dict) -> Iterator[System]:
    """A system shared by the tests that kill only clients."""
    system = own_system(base_config)
    yield system
    runtime_loop().run(system.aclose())


def unit_bytes(system: System) -> int:
    stats = [runtime_loop().run(u.call("stats")) for u in system.async_client._units]
    return sum(s["nbytes"] for s in stats)


def kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def start(target: Any, *args: Any) -> tuple[Any, Any]:
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def recv(conn: Any, timeout: float = 60.0) -> Any:
    assert conn.poll(timeout), "the child never reached its barrier"
    return conn.recv()


# --------------------------------------------------------------------- producers


@pytest.mark.parametrize("stage", ["begun", "written"])
def test_a_producer_dead_mid_put_is_released_and_the_stream_ends(
    leased, transport_name, pid, stage
) -> None:
    client = leased.client
    client.create_partition(pid, expected_size=2)
    client.put({"x": torch.zeros(1, 4)}, partition_id=pid)  # row 0
    before = unit_bytes(leased)
    if transport_name == "inproc":  # no process to kill: a writer that hangs forever
        writer = leased.new_async_client()
        reached = threading.Event()

        async def hang(point: str) -> None:
            if point == stage:
                reached.set()
                await asyncio.Event().wait()

        writer.put_hook = hang
        hung = runtime_loop().submit(writer.put({"x": torch.ones(1, 4)}, partition_id=pid))
        assert reached.wait(30)
        killed = time.monotonic()
    else:
        proc, conn = start(fault_procs.producer_stopped_at, leased.config, pid, stage)
        assert recv(conn) == stage
        killed = kill(proc.pid)
        proc.join(10)
    assert client.partition_info(pid).in_flight == 1
    if stage == "written":
        assert unit_bytes(leased) > before  # its bytes landed, unpublished
    client.seal(pid)  # row 1 will never be produced by it
    meta = client.get_meta(["x"], 2, pid, "train", timeout=30)
    assert meta.rows == [0]  # the lease expired: the slot went back, the seal dropped it
    assert client.get_meta(["x"], 2, pid, "train", timeout=30).is_empty  # the stream ends
    assert time.monotonic() - killed < LEASE_S + 2.0
    info = client.partition_info(pid)
    assert (info.in_flight, info.size) == (0, 1)
    assert unit_bytes(leased) == before  # the dead put's bytes were freed
    client.clear_partition(pid)
    if transport_name == "inproc":
        hung.cancel()  # the writer wakes up at last: its abort finds the lease gone
        runtime_loop().run(writer.close())


def test_a_restarted_producer_is_served_while_the_dead_one_is_released(
    leased, transport_name, pid
) -> None:
    if transport_name == "inproc":
        pytest.skip("no producer process on inproc (the abandoned-writer case is above)")
    client = leased.client
    client.create_partition(pid, expected_size=1)
    proc, conn = start(fault_procs.producer_stopped_at, leased.config, pid, "written")
    assert recv(conn) == "written"
    kill(proc.pid)
    proc.join(10)
    # the restarted producer puts the sample again at once: the dead put still holds the
    # slot, so it appends; then the job says no more rows will come
    again = client.put({"x": torch.full((1, 4), 3.0)}, partition_id=pid)
    client.seal(pid)
    meta = client.get_meta(["x"], 1, pid, "train", timeout=30)
    assert meta.rows == again.rows == [1]
    assert client.get_data(meta)["x"].tolist() == [[3.0] * 4]
    # the stream ends once the dead put's lease expired (its slot is dropped: sealed)
    assert client.get_meta(["x"], 1, pid, "train", timeout=30).is_empty
    client.clear_partition(pid)


async def test_a_commit_refused_after_the_writes_releases_its_rows(leased, pid) -> None:
    first, second = leased.new_async_client(), leased.new_async_client()
    await first.create_partition(pid, expected_size=2)
    written, go = asyncio.Event(), asyncio.Event()

    async def hold(point: str) -> None:
        if point == "written":
            written.set()
            await go.wait()

    first.put_hook = hold
    held = asyncio.ensure_future(first.put({"x": torch.ones(1, 4)}, partition_id=pid))
    await written.wait()  # both are first puts of x: begin_put cannot refuse either
    await second.put({"x": torch.ones(1, 4, 2)}, partition_id=pid)  # another per-row rank
    go.set()
    with pytest.raises(SchemaError, match=r"holds dtype torch\.float32 with per-row rank 2"):
        await held
    info = await second.partition_info(pid)
    assert (info.in_flight, info.size, info.produced) == (0, 2, {"x": 1})
    await second.seal(pid)  # the released slot is dropped: the stream can end
    metas = [m async for _, m in second.stream(["x"], 2, pid, "train", timeout=30)]
    assert [m.rows for m in metas] == [[1]]  # the second put's row; the first's was released
    await second.clear_partition(pid)
    await first.close()
    await second.close()


def test_tags_the_controller_refuses_are_refused_before_anything_is_written(leased, pid) -> None:
    client = leased.client
    client.create_partition(pid)
    before = unit_bytes(leased)
    with pytest.raises(TypeError, match="tag names must be strings"):
        client.put({"x": torch.ones(2, 4)}, partition_id=pid, tags=[{1: "a"}, {}])
    info = client.partition_info(pid)
    assert (info.size, info.in_flight) == (0, 0)
    assert unit_bytes(leased) == before
    client.clear_partition(pid)


# --------------------------------------------------------------------- consumers


def test_a_consumer_killed_holding_a_batch_does_not_stop_the_others(
    leased, transport_name, pid
) -> None:
    if transport_name == "inproc":
        pytest.skip("a consumer process needs the zmq or ray transport")
    client = leased.client
    client.create_partition(pid, expected_size=6)
    client.put({"x": torch.arange(24.0).reshape(6, 4)}, partition_id=pid)
    proc, conn = start(fault_procs.consumer_holding_a_batch, leased.config, pid)
    held = recv(conn)
    kill(proc.pid)
    proc.join(10)
    # without consumer leases (opt-in, see docs/async-rl) the dead consumer's batch is
    # consumed; the others get the rest and their stream ends
    rest = client.get_meta(["x"], 2, pid, "train", timeout=30).rows
    rest += client.get_meta(["x"], 2, pid, "train", timeout=30).rows
    assert sorted(held + rest) == list(range(6))
    assert client.get_meta(["x"], 2, pid, "train", timeout=30).is_empty
    client.clear_partition(pid)


# --------------------------------------------------------------------- actors


def _actor_pid(system: System, index: int) -> int:
    if index == 0:
        return runtime_loop().run(system.async_client._controller.call("process_id"))
    unit = system.async_client._units[index - 1]
    return int(runtime_loop().run(unit.call("stats"))["pid"])


def test_a_unit_reported_dead_that_answers_is_kept(leased, pid) -> None:
    ctrl = leased.async_client._controller
    assert runtime_loop().run(ctrl.call("unit_died", 0)) is False  # it answered the check
    client = leased.client
    metas = [client.put({"x": torch.ones(1, 4)}, partition_id=pid) for _ in range(4)]
    assert {m.units[0] for m in metas} == {0, 1}  # still placed on both units
    assert client.partition_info(pid).lost == 0
    client.clear_partition(pid)


def test_a_dead_storage_unit_loses_its_rows_visibly_and_the_rest_serves(
    fresh, transport_name, pid
) -> None:
    if transport_name == "inproc":
        pytest.skip("an inproc storage unit has no process of its own")
    client = fresh.client
    client.create_partition(pid, expected_size=8)
    metas = [client.put({"x": torch.full((1, 4), float(i))}, partition_id=pid) for i in range(8)]
    on_unit = {m.rows[0]: m.units[0] for m in metas}
    assert set(on_unit.values()) == {0, 1}  # single-row puts spread over both units
    lost_rows = sorted(r for r, u in on_unit.items() if u == 1)
    killed = kill(_actor_pid(fresh, 2))
    everything = tq.BatchMeta.concat(metas)
    with pytest.raises(RowsLostError, match=re.escape(pid)) as caught:
        client.get_data(everything)
    assert time.monotonic() - killed < 2.0
    assert str(lost_rows[0]) in str(caught.value)
    assert client.partition_info(pid).lost == len(lost_rows)
    with pytest.raises(RowsLostError) as told:  # the controller knows: a meta without units
        client.get_data(tq.BatchMeta(pid, lost_rows, ["x"]))
    assert (told.value.partition_id, told.value.rows) == (pid, lost_rows)
    # the rows of the surviving unit still stream, and the stream ends
    got = []
    for _ in range(8):
        meta = client.get_meta(["x"], 8, pid, "train", timeout=30)
        if meta.is_empty:
            break
        got += meta.rows
        assert client.get_data(meta)["x"][:, 0].tolist() == [float(r) for r in meta.rows]
    assert sorted(got) == sorted(set(range(8)) - set(lost_rows))
    # new puts go to the unit that lives
    again = client.put({"x": torch.ones(3, 4)}, partition_id=pid + "-after")
    assert set(again.units) == {0}
    assert client.get_data(again)["x"].sum().item() == 12.0


def test_a_dead_controller_wakes_its_waiters_with_a_typed_error(fresh, transport_name, pid) -> None:
    if transport_name == "inproc":
        pytest.skip("an inproc controller has no process of its own")
    waiter = fresh.new_async_client()
    fresh.client.create_partition(pid)
    waiting = runtime_loop().submit(waiter.get_meta(["x"], 1, pid, "train", timeout=None))
    # the waiter is registered before the kill: partition_info counts it
    while fresh.client.partition_info(pid).waiting.get("train", 0) < 1:
        assert not waiting.done()
    killed = kill(_actor_pid(fresh, 0))
    with pytest.raises(ActorDiedError):
        waiting.result(10)
    assert time.monotonic() - killed < 2.0
    with pytest.raises(ActorDiedError):  # later calls too, without waiting for a timeout
        fresh.client.partition_info(pid)
    assert time.monotonic() - killed < 4.0
