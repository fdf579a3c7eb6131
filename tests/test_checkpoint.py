"""Checkpoint and restore (issue 13, item 3), on every transport: round trip of everything a
resumed job needs, another number of storage units, refusal of a non-empty system,
consistency under concurrent puts and clears, a SIGKILL mid-save, corrupt checkpoints."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import checkpoint_procs
import pytest
import torch

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.errors import CheckpointError, SystemNotEmptyError
from transferqueue.metadata import BatchMeta
from transferqueue.ops import checkpoint
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import System, start_system

pytestmark = pytest.mark.timeout(120)
SPAWN = multiprocessing.get_context("spawn")


def start(base_config: dict, units: int, **storage: Any) -> System:
    config = {
        **base_config,
        "ray": {"namespace": f"tq-ckpt-{uuid.uuid4().hex[:8]}"},
        "storage": {"units": units, **storage},
    }
    return runtime_loop().run(start_system(load_config(config)))


@pytest.fixture(scope="module")
def systems(base_config: dict) -> Iterator[tuple[System, System]]:
    """Two systems of these tests alone (starting one costs seconds on zmq and ray): ``a``
    with 2 storage units, ``b`` with 3 (and stripes of 2 rows, so rows spread)."""
    a, b = start(base_config, 2), start(base_config, 3, stripe_rows=2)
    yield a, b
    for system in (a, b):
        runtime_loop().run(system.aclose())


@pytest.fixture
def pair(systems: tuple[System, System]) -> tuple[System, System]:
    """The two systems, emptied."""
    for system in systems:
        for pid in system.client.list_partitions():
            system.client.clear_partition(pid)
    return systems


def fill(c: Any) -> None:
    """A bit of everything: dense, jagged and string fields, a field on some rows only,
    tags, pending slots, keys, consumption, a sealed partition, admission versions."""
    c.create_partition("train", expected_size=8)
    meta = c.put(
        {
            "ids": torch.arange(12).reshape(6, 2),
            "resp": [torch.arange(i + 1) for i in range(6)],
            "text": [f"sample {i}" for i in range(6)],
        },
        partition_id="train",
        tags=[{"uid": i // 2} for i in range(6)],
    )
    c.put({"score": torch.tensor([0.5, 1.5, 2.5])}, metadata=meta.select_samples([0, 1, 2]))
    assert c.get_meta(["ids"], 4, "train", "actor").rows == [0, 1, 2, 3]
    c.kv_put(["a", "b"], "kv", fields={"v": torch.tensor([[1.0], [2.0]])})
    c.kv_put(["a", "b"], "kv", tags=[{"status": "done"}, {"status": "new"}])
    c.put({"ids": torch.zeros(2, 2, dtype=torch.int64)}, partition_id="sealed")
    c.seal("sealed")
    c.create_partition("adm", max_staleness=1, global_batch_size=2)
    c.reserve("adm", 2)
    c.advance_version("adm")


def rows_of(c: Any, pid: str) -> list[int]:
    rows, _ = c.get_consumption_status("nobody", pid)
    return rows.tolist()


def state_of(c: Any) -> dict[str, Any]:
    """Everything observable, data included, per partition."""
    out: dict[str, Any] = {}
    for pid in sorted(c.list_partitions()):
        info = c.partition_info(pid)
        fields = sorted(info.produced)
        rows, prod = c.get_production_status(fields, pid)
        data = {}
        for j, f in enumerate(fields):
            have = rows[prod[:, j]].tolist()
            if have:
                td = c.get_data(BatchMeta(pid, have, [f]))
                col = td[f]
                data[f] = [v.tolist() if isinstance(v, torch.Tensor) else v for v in col.unbind(0)] if isinstance(col, torch.Tensor) else list(col.tolist())  # fmt: skip
        out[pid] = {
            "info": (info.size, info.expected_size, info.sealed, info.produced,
                     {t: n for t, n in info.consumed.items() if n},
                     info.pending, info.lost, info.version, info.admitted),
            "rows": rows.tolist(),
            "data": data,
            "consumed": c.get_consumption_status("actor", pid)[1].tolist(),
            "keys": c.kv_list(pid)[pid],
        }  # fmt: skip
    return out


def test_round_trip_into_another_number_of_units(pair, tmp_path) -> None:
    a, b = pair
    fill(a.client)
    before = state_of(a.client)
    summary = a.client.save_checkpoint(tmp_path / "ck", {"step": 12, "note": "x"})
    assert summary["bytes"] > 0 and (tmp_path / "ck" / "CURRENT").exists()
    # a consumer waiting for a partition the load brings (before or while it runs) is
    # served by it: a partition without rows does not make the system non-empty
    waiting = runtime_loop().submit(b.async_client.get_meta(["ids"], 2, "train", "late"))
    assert b.client.load_checkpoint(tmp_path / "ck") == {"step": 12, "note": "x"}
    assert waiting.result(timeout=30).rows == [0, 1]
    b.client.reset_consumption("train", "late")
    assert state_of(b.client) == before
    c = b.client
    # rows are spread over the new system's units
    assert set(c.get_meta(["ids"], 6, "train", "eval").units) == {0, 1, 2}
    # the resumed consumer reads only what it had not consumed, with its tags
    resumed = c.get_meta(["ids", "resp", "text"], 2, "train", "actor")
    assert resumed.rows == [4, 5] and resumed.tags == [{"uid": 2}, {"uid": 2}]
    td = c.get_data(resumed)
    assert td["ids"].tolist() == [[8, 9], [10, 11]] and td["text"].tolist() == ["sample 4", "sample 5"]  # fmt: skip
    assert [t.tolist() for t in td["resp"].unbind(0)] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    # pending slots are still coming; the sealed stream ends; keys and admission work
    c.put({"ids": torch.ones(2, 2, dtype=torch.int64)}, partition_id="train")
    assert c.get_meta(["ids"], 2, "train", "actor").rows == [6, 7]
    assert c.get_meta(["ids"], 2, "sealed", "actor").rows == [0, 1]
    assert c.get_meta(["ids"], 2, "sealed", "actor").is_empty
    assert c.kv_get(["b", "a"], "kv")["v"].tolist() == [[2.0], [1.0]]
    assert c.kv_list("kv", where={"status": "done"}) == {"kv": {"a": {"status": "done"}}}
    assert c.advance_version("adm") == 2


def test_a_non_empty_system_is_refused_unless_overwrite(pair, tmp_path) -> None:
    a, _ = pair
    a.client.put({"x": torch.ones(2, 1)}, partition_id="old")
    a.client.save_checkpoint(tmp_path / "ck", {"v": 1})
    a.client.put({"x": torch.zeros(3, 1)}, partition_id="newer")
    with pytest.raises(SystemNotEmptyError, match="overwrite=True"):
        a.client.load_checkpoint(tmp_path / "ck")
    assert a.client.partition_info("newer").size == 3  # refused: nothing changed
    assert a.client.load_checkpoint(tmp_path / "ck", overwrite=True) == {"v": 1}
    assert a.client.list_partitions() == ["old"]
    assert a.client.get_data(a.client.get_meta(["x"], 2, "old", "t"))["x"].tolist() == [[1.0]] * 2


async def test_puts_and_clears_during_a_save_are_all_in_or_all_out(pair, tmp_path) -> None:
    a, b = pair
    c = a.new_async_client()
    for i in range(4):  # batches 0..3: 4 rows each, every row's x and y hold its batch id
        await c.put({"x": torch.full((4, 256), i), "y": torch.full((4, 1), -i)}, "p")
    await c.put({"x": torch.full((4, 256), 99)}, "q")
    events: list[str] = []
    producing = asyncio.Event()

    async def produce() -> None:  # commits batches 100, 101, ... while the save runs
        i = 100
        while not producing.is_set():
            await c.put({"x": torch.full((4, 256), i), "y": torch.full((4, 1), -i)}, "p")
            i += 1

    async def during(point: str) -> None:
        if point != "chunk" or events:
            return
        events.append(point)
        # after the snapshot, before most bytes are read: clear rows and a partition it
        # holds, then put new rows that would reuse their ids and bytes
        await c.clear_samples(BatchMeta("p", [0, 1, 2, 3, 12, 13, 14, 15], []))
        await c.clear_partition("q")
        await c.put({"x": torch.full((12, 256), -7), "y": torch.full((12, 1), 7)}, "p")
        # a put into the partition being cleared, and one rewriting rows the save holds,
        # wait for the save to end
        pending.append(asyncio.ensure_future(c.put({"x": torch.full((4, 256), -8)}, "q")))
        rewrite = c.put({"x": torch.full((2, 256), -9)}, metadata=BatchMeta("p", [4, 5], []))
        pending.append(asyncio.ensure_future(rewrite))
        for _ in range(2):  # the second answer comes after both puts reached the controller
            await c.partition_info("p")
        events.append(f"done during the save: {[f.done() for f in pending]}")

    pending: list[asyncio.Future[Any]] = []
    producer = asyncio.ensure_future(produce())
    await checkpoint.save(c, tmp_path / "ck", chunk_bytes=4096, hook=during)
    producing.set()
    await producer
    assert events == ["chunk", "done during the save: [False, False]"]
    await asyncio.wait_for(asyncio.gather(*pending), 30)  # they went on once the save ended
    loader = b.new_async_client()
    await loader.load_checkpoint(tmp_path / "ck")
    await loader.close()
    got = b.client.get_data(BatchMeta("p", rows_of(b.client, "p"), ["x", "y"]))
    batches: dict[int, int] = {}
    for x, y in zip(got["x"], got["y"]):
        assert bool((x == x[0]).all()) and int(y[0]) == -int(x[0])  # no torn row
        batches[int(x[0])] = batches.get(int(x[0]), 0) + 1
    assert all(count == 4 for count in batches.values()), batches  # all in or all out
    assert {0, 1, 2, 3} <= set(batches) and -7 not in batches and -9 not in batches
    assert b.client.get_data(BatchMeta("q", [0, 1, 2, 3], ["x"]))["x"][:, 0].tolist() == [99] * 4
    await c.close()


@pytest.mark.parametrize("stage", ["chunk", "files", "renamed"])
def test_a_save_killed_midway_leaves_the_previous_checkpoint(
    pair, tmp_path, transport_name, stage
) -> None:
    a, b = pair
    path = tmp_path / "ck"
    own = transport_name == "inproc"  # inproc cannot be reached from the child
    hold_s = 1.0
    if own:
        config: Any = {"transport": "inproc"}
    else:
        checkpoint_procs.fill(a.client, "a", 8)
        a.client.save_checkpoint(path, {"step": 1})
        checkpoint_procs.fill(a.client, "b", 8)
        config = a.config
    parent, child = SPAWN.Pipe()
    args = (config, str(path), stage, own, hold_s, child)
    proc = SPAWN.Process(target=checkpoint_procs.saver_killed_at, args=args, daemon=True)
    proc.start()
    assert parent.poll(90), "the saver never reached its hook"
    assert parent.recv() == stage
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert b.client.load_checkpoint(path) == {"step": 1}
    assert b.client.list_partitions() == ["a"]
    got = b.client.get_data(BatchMeta("a", list(range(8)), ["x"]))
    assert got["x"][:, 0].tolist() == list(range(8))
    if not own:
        # the dead saver's hold expires: a clear deferred by it completes, puts go on
        a.client.clear_partition("b")
        put = runtime_loop().submit(a.async_client.put({"x": torch.ones(1, 64)}, "b"))
        assert put.result(timeout=hold_s + 20).rows == [0]
        a.client.save_checkpoint(path, {"step": 3})  # the lock is free, leftovers go
        assert sorted(p.name.split("-")[0] for p in path.iterdir()) == ["CURRENT", "LOCK", "snap"]  # fmt: skip
        assert b.client.load_checkpoint(path, overwrite=True) == {"step": 3}


def test_corrupt_or_unknown_checkpoints_give_clear_errors(pair, tmp_path) -> None:
    a, b = pair
    a.client.put({"x": torch.arange(4096).reshape(64, 64)}, partition_id="p")
    ok = checkpoint.save  # saved in small chunks so that a load fails half way
    runtime_loop().run(ok(a.async_client, tmp_path / "ck", chunk_bytes=4096))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        b.client.load_checkpoint(tmp_path / "nothing")
    snap = next(p for p in (tmp_path / "ck").iterdir() if p.name.startswith("snap-"))
    manifest = snap / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good.replace('"version": 1', '"version": 99'))
    with pytest.raises(CheckpointError, match="version 99"):
        b.client.load_checkpoint(tmp_path / "ck")
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        b.client.load_checkpoint(tmp_path / "ck")
    manifest.write_text(good)
    chunks = json.loads(good)["chunks"]
    assert len(chunks) > 2
    last = snap / chunks[-1]["file"]
    data = last.read_bytes()
    last.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        b.client.load_checkpoint(tmp_path / "ck")
    last.write_bytes(b"\0" * len(data))  # right size, garbage: found after some chunks
    with pytest.raises(CheckpointError, match="not a transferqueue frame file"):
        b.client.load_checkpoint(tmp_path / "ck")
    assert b.client.list_partitions() == []  # the failed load left nothing behind
    stats = [runtime_loop().run(u.call("stats")) for u in b.async_client._units]
    assert sum(s["nbytes"] for s in stats) == 0
    with pytest.raises(TypeError, match="JSON"):
        a.client.save_checkpoint(tmp_path / "ck2", {"t": torch.ones(1)})
    assert not (tmp_path / "ck2" / "CURRENT").exists()


def test_module_level_calls(tmp_path: Path) -> None:
    tq.init()
    try:
        tq.get_client().put({"x": torch.ones(2, 1)}, partition_id="p")
        tq.save_checkpoint(tmp_path / "ck", {"epoch": 1})
        with pytest.raises(SystemNotEmptyError):
            tq.load_checkpoint(tmp_path / "ck")
        assert tq.load_checkpoint(tmp_path / "ck", overwrite=True) == {"epoch": 1}

        async def twice() -> Any:
            await tq.async_save_checkpoint(tmp_path / "ck", {"epoch": 2})
            return await tq.async_load_checkpoint(tmp_path / "ck", overwrite=True)

        assert runtime_loop().run(twice()) == {"epoch": 2}
    finally:
        tq.close()


async def test_a_rewrite_in_flight_when_a_save_begins_is_all_in_or_all_out(pair, tmp_path) -> None:
    a, b = pair
    c, writer = a.new_async_client(), a.new_async_client()
    await c.put({"x": torch.zeros(4, 8)}, "p")
    reached, release = asyncio.Event(), asyncio.Event()

    async def stop(point: str) -> None:
        if point == "written":  # its bytes landed, not committed
            reached.set()
            await release.wait()

    writer.put_hook = stop
    rewrite = BatchMeta("p", [0, 1], [])
    put = asyncio.ensure_future(
        writer.put({"x": torch.full((2, 8), -5.0), "z": torch.ones(2, 1)}, metadata=rewrite)
    )
    await asyncio.wait_for(reached.wait(), 30)
    save = asyncio.ensure_future(checkpoint.save(c, tmp_path / "ck"))
    for _ in range(4):  # the save (units stats, then checkpoint_begin) reached the controller
        await c.partition_info("p")
    release.set()
    await asyncio.wait_for(asyncio.gather(put, save), 60)
    loader = b.new_async_client()
    await loader.load_checkpoint(tmp_path / "ck")
    info = await loader.partition_info("p")
    x = (await loader.get_data(BatchMeta("p", [0, 1, 2, 3], ["x"])))["x"][:, 0].tolist()
    # the snapshot waited for the rewrite: it is in, whole (new x and z)
    assert info.produced == {"x": 4, "z": 2} and x == [-5.0, -5.0, 0.0, 0.0]
    for client in (c, writer, loader):
        await client.close()
