"""Same-host shared memory on the zmq transport (issue 12 item 3): large frames between a
client and a storage unit on one host travel in memfd segments, with the same ownership as
the socket path; across hosts (or when ``zmq.shared_memory`` is off) the socket path runs.
The counters of :mod:`transferqueue.runtime.transports.zmq_shm` prove which path ran; the
segment logic itself (reuse, refusal, SIGKILLed senders and receivers) is tested in
``tests/unit/test_zmq_shm_segments.py``."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fault_procs
import pytest
import torch
from tensordict import TensorDict

from transferqueue.config import load_config
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import zmq_auth, zmq_shm
from transferqueue.system import System, start_system

pytestmark = pytest.mark.timeout(180)
SPAWN = multiprocessing.get_context("spawn")


def _start(**zmq: Any) -> System:
    config = {"transport": "zmq", "runtime": {"call_timeout": 60.0}, "zmq": zmq}
    return runtime_loop().run(start_system(load_config(config)))


@pytest.fixture(scope="module")
def shm_system() -> Iterator[System]:
    started = _start()
    yield started
    runtime_loop().run(started.aclose())


def _batch(seed: int, rows: int = 512) -> tuple[TensorDict, int]:
    """Two fields, each at least 2 MiB per unit of the two: frames that take shared memory."""
    g = torch.Generator().manual_seed(seed)
    td = TensorDict(
        {
            "x": torch.randn(rows, 2048, generator=g),
            "ids": torch.randint(0, 1 << 40, (rows, 1024), generator=g),
        },
        batch_size=[rows],
    )
    return td, sum(t.nbytes for t in td.values())


def _moved(before: dict[str, int]) -> dict[str, int]:
    now = zmq_shm.COUNTERS.snapshot()
    return {k: now[k] - before[k] for k in now}


def _put_and_get(client: Any, pid: str, td: TensorDict) -> tuple[dict[str, int], TensorDict]:
    before = zmq_shm.COUNTERS.snapshot()
    meta = client.put(td, partition_id=pid)
    sent = _moved(before)
    before = zmq_shm.COUNTERS.snapshot()
    got = client.get_data(meta)
    received = _moved(before)
    paths = {"sent_shm": sent["sent_shm"], "sent_socket": sent["sent_socket"]}
    return {**paths, "received_shm": received["received_shm"]}, got


def test_a_large_put_and_get_travel_in_shared_memory(shm_system: System) -> None:
    client = shm_system.client  # its first large request asks each unit's host first
    td, nbytes = _batch(1)
    moved, got = _put_and_get(client, "shm-put", td)
    assert moved == {"sent_shm": nbytes, "sent_socket": 0, "received_shm": nbytes}
    assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
    client.clear_partition("shm-put")


def test_ownership_is_as_on_the_socket(shm_system: System) -> None:
    client = shm_system.client
    td, nbytes = _batch(2)
    expected = td.clone()
    before = zmq_shm.COUNTERS.snapshot()
    meta = client.put(td, partition_id="own")
    td["x"].add_(1.0)  # what you put you may change afterwards
    td["ids"].zero_()
    got = client.get_data(meta)
    assert _moved(before)["received_shm"] == nbytes  # the get came through shared memory
    assert torch.equal(got["x"], expected["x"]) and torch.equal(got["ids"], expected["ids"])
    held = got.clone()
    for seed in (3, 4):  # what you got is yours: further puts, gets and a clear change nothing
        more, _ = _batch(seed)
        again = client.get_data(client.put(more, partition_id="own"))
        assert torch.equal(again["x"], more["x"])
    client.clear_partition("own")
    client.put(_batch(5)[0], partition_id="own2")
    got["x"].mul_(1.0)  # still writable memory of its own
    assert torch.equal(got["x"], held["x"]) and torch.equal(got["ids"], held["ids"])
    client.clear_partition("own2")


async def test_a_peer_of_another_host_gets_the_socket(shm_system: System, monkeypatch) -> None:
    monkeypatch.setattr(zmq_shm, "_host_id", "f" * 32)  # this client names another host
    aclient = shm_system.new_async_client()
    try:
        td, nbytes = _batch(6)
        before = zmq_shm.COUNTERS.snapshot()
        meta = await aclient.put(td, partition_id="far")
        got = await aclient.get_data(meta)
        moved = _moved(before)
        assert moved["sent_shm"] == 0 and moved["received_shm"] == 0
        assert moved["sent_socket"] == nbytes
        assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
        await aclient.clear_partition("far")
    finally:
        await aclient.close()


def _unit_stats(system: System) -> list[dict[str, Any]]:
    return [runtime_loop().run(u.call("stats")) for u in system.async_client._units]


def _kept_copied(system: System) -> tuple[int, int]:
    stats = _unit_stats(system)
    return sum(s["kept_bytes"] for s in stats), sum(s["copied_bytes"] for s in stats)


def test_units_keep_a_puts_frames_and_the_sender_reuses_them_once_cleared(
    shm_system: System,
) -> None:
    client = shm_system.client
    td, nbytes = _batch(11)
    expected = td.clone()
    kept, copied = _kept_copied(shm_system)
    meta = client.put(td, partition_id="keep")
    assert _kept_copied(shm_system) == (kept + nbytes, copied)  # kept: nothing copied
    td["x"].add_(1.0)  # what you put you may change afterwards
    for seed in (12, 13):  # more puts while the units keep the first one's segments
        client.put(_batch(seed)[0], partition_id=f"keep-{seed}")
    got = client.get_data(meta)
    assert torch.equal(got["x"], expected["x"]) and torch.equal(got["ids"], expected["ids"])
    for name in ("keep", "keep-12", "keep-13"):
        client.clear_partition(name)
    assert _kept_copied(shm_system)[0] == kept
    pool = zmq_shm.pool(shm_system.config.zmq.shm_pool_bytes)
    segments = len(pool)
    for seed in (14, 15, 16):  # the cleared puts' segments came back to this sender
        more, _ = _batch(seed)
        again = client.get_data(client.put(more, partition_id="keep-again"))
        assert torch.equal(again["x"], more["x"])
        client.clear_partition("keep-again")
    assert len(pool) == segments


def test_a_put_whose_jagged_frames_are_copied_keeps_nothing(shm_system: System) -> None:
    """Its frames share one segment per unit: keeping the dense ones would hold the copied
    jagged bytes (runs of 128 rows of ~16 KB: 2 MB frames, in shared memory) twice, so
    the units copy those as well."""
    client = shm_system.client
    td, _ = _batch(19)
    g = torch.Generator().manual_seed(19)
    rows = [
        torch.randn(int(n), generator=g) for n in torch.randint(3000, 5000, (512,), generator=g)
    ]
    batch = {"x": td["x"], "responses": torch.nested.nested_tensor(rows, layout=torch.jagged)}
    kept, copied = _kept_copied(shm_system)
    meta = client.put(batch, partition_id="mixed")
    kept_now, copied_now = _kept_copied(shm_system)
    assert kept_now == kept and copied_now - copied >= td["x"].nbytes
    got = client.get_data(meta)
    assert torch.equal(got["x"], td["x"])
    assert all(torch.equal(a, b) for a, b in zip(got["responses"].unbind(), rows, strict=True))
    client.clear_partition("mixed")


def test_shm_keep_off_copies_the_frames() -> None:
    system = _start(shm_keep=False)
    try:
        td, nbytes = _batch(17)
        moved, got = _put_and_get(system.client, "copied", td)
        assert moved["sent_shm"] == nbytes and _kept_copied(system) == (0, nbytes)
        assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
    finally:
        runtime_loop().run(system.aclose())


def test_what_the_units_keep_outlives_its_sigkilled_sender(shm_system: System) -> None:
    parent, child = SPAWN.Pipe()
    args = (shm_system.config, "kept-orphan", 18, child)
    proc = SPAWN.Process(target=fault_procs.producer_of_a_large_batch, args=args, daemon=True)
    kept_before = _kept_copied(shm_system)[0]
    proc.start()
    try:
        assert parent.poll(120), "the producer never reported its put"
        nbytes = parent.recv()
        assert _kept_copied(shm_system)[0] - kept_before == nbytes  # its segments hold them
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
    client = shm_system.client
    meta = client.get_meta(["x", "y"], 512, "kept-orphan", task_name="reader")
    got = client.get_data(meta)
    want = fault_procs.large_batch(18)
    order = meta.global_indexes  # rows in the order the sampler gave them
    assert torch.equal(got["x"], want["x"][order]) and torch.equal(got["y"], want["y"][order])
    client.clear_partition("kept-orphan")
    assert _kept_copied(shm_system)[0] == kept_before


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_shared_memory_off_takes_the_socket() -> None:
    system = _start(shared_memory=False)
    try:
        client = system.client
        td, nbytes = _batch(7)
        moved, got = _put_and_get(client, "off", td)
        assert moved == {"sent_shm": 0, "sent_socket": nbytes, "received_shm": 0}
        assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
        units = [h.pid for h in system.handles[1:]]  # type: ignore[attr-defined]
        assert not any("memfd:tq-shm" in _maps(p) for p in units)  # no segment at all
    finally:
        runtime_loop().run(system.aclose())


def test_segments_are_nameless_and_go_with_their_processes() -> None:
    system = _start()
    pids = [h.pid for h in system.handles]  # type: ignore[attr-defined]
    try:
        client = system.client
        td, nbytes = _batch(8)
        moved, got = _put_and_get(client, "files", td)
        assert moved["sent_shm"] == nbytes and moved["received_shm"] == nbytes
        units = pids[1:]
        assert all("memfd:tq-shm" in _maps(p) for p in units)  # each unit sent from its pool
        for p in [os.getpid(), *pids]:  # segments are memfds: nothing of ours in /dev/shm
            named = [m for m in _maps(p).splitlines() if "/dev/shm/" in m]
            # (this process may map others' files there: multiprocessing's semaphores)
            assert not [m for m in named if "tq" in m.rsplit("/dev/shm/", 1)[1]], named
        # the units' segments this process reads through (its receiving side's mappings)
        theirs = {m.ino for (p, _), m in zmq_shm.RECEIVER._maps.items() if p in units}
        assert theirs and all(_mapped_inode(i) for i in theirs)
        del got
    finally:
        runtime_loop().run(system.aclose())
    zmq_shm.sweep()
    for p in pids:  # the actor processes are gone, and with them every segment they owned
        assert not os.path.exists(f"/proc/{p}")
    assert not any(_mapped_inode(i) for i in theirs)  # and nothing of theirs is mapped here


def _mapped_inode(ino: int) -> bool:
    return any(
        "memfd:tq-shm" in line and line.split()[4] == str(ino)
        for line in _maps(os.getpid()).splitlines()
    )


def test_curve_peers_on_one_host_use_shared_memory(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    _, secret = zmq_auth.write_key_pair(tmp_path, "server")
    zmq_auth.write_key_pair(allowed, "client")
    curve = {"server_key_file": str(secret), "allowed_clients_dir": str(allowed)}
    config = {"transport": "zmq", "storage": {"units": 1}, "zmq": {"curve": curve}}
    system = runtime_loop().run(start_system(load_config(config)))
    try:
        td, nbytes = _batch(10)
        moved, got = _put_and_get(system.client, "curve", td)
        assert moved == {"sent_shm": nbytes, "sent_socket": 0, "received_shm": nbytes}
        assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
    finally:
        runtime_loop().run(system.aclose())


@pytest.mark.timeout(300)
def test_ray_data_path_uses_shared_memory_on_one_node(ray_cluster: None) -> None:
    namespace = f"tq-shm-{os.getpid()}"  # not the session system's (it runs beside it)
    config = {
        "transport": "ray",
        "runtime": {"call_timeout": 60.0},
        "ray": {"namespace": namespace},
    }
    system = runtime_loop().run(start_system(load_config(config)))
    try:
        td, nbytes = _batch(9)
        moved, got = _put_and_get(system.client, "ray-shm", td)
        assert moved == {"sent_shm": nbytes, "sent_socket": 0, "received_shm": nbytes}
        assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
        assert _kept_copied(system) == (nbytes, 0)  # Ray's units keep the frames too
        system.client.clear_partition("ray-shm")
    finally:
        runtime_loop().run(system.aclose())
