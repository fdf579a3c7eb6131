"""The ray transport on a 3-node cluster (``ray.cluster_utils.Cluster``, started here).

One cluster for the module: a head (``node_a``, where this driver runs) and two workers
(``node_b``, ``node_c``), each with one CPU, a custom resource naming it and a small object
store. It cannot share a process with the session's single-node ``ray_cluster`` fixture (one
``ray.init`` per process), so these tests are marked ``multinode``: the normal sessions leave
them out and ``nox -s tests_multinode`` (``pytest -m multinode``) runs them alone.

The node-removal test goes last: it takes ``node_c`` away for good.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict

import transferqueue as tq
from transferqueue.errors import ActorDiedError, RowsLostError
from transferqueue.runtime.loop import runtime_loop

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(120)]

NAMESPACE = "tq-multinode"
NODES = ("node_a", "node_b", "node_c")
ROOT = Path(__file__).resolve().parents[1]
#: the bound of the fault issue: a call to a unit on a removed node fails this fast
DEATH_S = 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    paths = [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    small = 80 * 2**20
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"node_a": 1},
            "object_store_memory": small,
            "include_dashboard": False,
        },
    )
    c.tq_nodes = {
        name: c.add_node(num_cpus=1, resources={name: 1}, object_store_memory=small)
        for name in ("node_b", "node_c")
    }
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = c.address
    yield c
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
    ray.shutdown()
    c.shutdown()


def node_ids() -> dict[str, str]:
    """custom resource name -> node id, for the alive nodes."""
    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            for name in NODES:
                if name in n["Resources"]:
                    out[name] = n["NodeID"]
    return out


@pytest.fixture(scope="module")
def system(cluster: Any) -> Iterator[dict[str, Any]]:
    config = tq.init(
        {
            "transport": "ray",
            "ray": {"namespace": NAMESPACE},
            "storage": {"units_per_node": 1, "nodes": list(NODES)},
            "controller": {"node": "node_a"},
            "runtime": {"call_timeout": 60.0},
        }
    )
    yield dict(config.system or {})
    tq.close()


def unit_of(system: dict[str, Any], node: str) -> int:
    """The index of the (one) storage unit on ``node``."""
    return system["unit_nodes"].index(node_ids()[node])


def rows_of(start: int, n: int) -> TensorDict:
    ids = torch.arange(start, start + n)
    return TensorDict(
        {"id": ids, "x": ids[:, None].float().expand(n, 1024).contiguous()}, batch_size=[n]
    )


def on(node: str) -> dict[str, Any]:
    """Ray options that pin a task to ``node``."""
    return {"num_cpus": 0, "resources": {node: 0.01}}


@ray.remote
def produce(pid: str, start: int, n: int, batches: int) -> dict[str, Any]:
    """Attach by name (tq.init() with no system) and put ``batches`` batches of ``n`` rows."""
    tq.init({"transport": "ray", "ray": {"namespace": NAMESPACE}})
    try:
        client = tq.get_client()
        units: list[int] = []
        for b in range(batches):
            meta = client.put(rows_of(start + b * n, n), partition_id=pid)
            units += list(meta.units or [])
        return {"node": ray.get_runtime_context().get_node_id(), "units": units}
    finally:
        tq.close()


@ray.remote
def consume(pid: str, batch: int) -> list[int]:
    """Read ``pid`` to its end as task "read"; returns the ids seen, in order."""
    tq.init({"transport": "ray", "ray": {"namespace": NAMESPACE}})
    try:
        client = tq.get_client()
        seen: list[int] = []
        while True:
            meta = client.get_meta(["id", "x"], batch, partition_id=pid, task_name="read")
            if not meta.rows:
                return seen
            data = client.get_data(meta)
            assert torch.equal(data["x"][:, 0], data["id"].float())
            seen += data["id"].tolist()
    finally:
        tq.close()


@ray.remote
def stream(pid: str) -> list[int]:
    """Read ``pid`` with the streaming loader (task "loader")."""
    config = tq.init({"transport": "ray", "ray": {"namespace": NAMESPACE}})
    try:
        ds = tq.StreamingDataset(["id"], 4, pid, "loader", config=config)
        return [i for batch, _ in tq.StreamingDataLoader(ds) for i in batch["id"].tolist()]
    finally:
        tq.close()


def test_units_land_on_the_requested_nodes(system: dict[str, Any]) -> None:
    ids = node_ids()
    assert sorted(system["unit_nodes"]) == sorted(ids.values())  # one unit on each node
    units = tq.get_client().async_client._units
    assert len(units) == 3
    # the controller runs where controller.node asked
    controller = ray.get_actor("tq-controller", namespace=NAMESPACE)
    assert ray.get(controller.ready.remote())["node"] == ids["node_a"]


def test_a_producer_on_node_b_writes_only_to_node_b(system: dict[str, Any]) -> None:
    pid = "local-b"
    out = ray.get(produce.options(**on("node_b")).remote(pid, 0, 8, 3))
    assert out["node"] == node_ids()["node_b"]
    assert set(out["units"]) == {unit_of(system, "node_b")}
    info = tq.get_client().partition_info(pid)
    assert info.size == 24
    assert info.cross_node_bytes == 0
    # the driver (node_a) writes to node_a's unit
    meta = tq.get_client().put(rows_of(100, 4), partition_id=pid)
    assert set(meta.units or []) == {unit_of(system, "node_a")}
    tq.get_client().clear_partition(pid)


def test_cross_node_bytes_are_counted_when_a_node_has_no_unit(cluster: Any) -> None:
    """A system whose units are all on node_b: a put from node_a crosses nodes."""
    from transferqueue.config import load_config
    from transferqueue.ops.status import partition_row
    from transferqueue.system import start_system

    config = load_config(
        {
            "transport": "ray",
            "ray": {"namespace": "tq-multinode-remote"},
            "storage": {"nodes": ["node_b"], "units": 2, "stripe_rows": 4},
        }
    )
    started = runtime_loop().run(start_system(config))
    try:
        client = started.client
        data = rows_of(0, 16)
        meta = client.put(data, partition_id="p")
        assert set(meta.units or []) == {0, 1}  # no unit here: round robin over all
        info = client.partition_info("p")
        assert info.cross_node_bytes == data["id"].nbytes + data["x"].nbytes
        assert partition_row(info.to_plain())["cross_node_bytes"] == info.cross_node_bytes
        assert torch.equal(client.get_data(meta)["x"], data["x"])
    finally:
        runtime_loop().run(started.aclose())


def test_consumer_on_node_c_reads_everything_exactly_once(system: dict[str, Any]) -> None:
    pid = "spread"
    client = tq.get_client()
    client.create_partition(pid)
    producers = [
        produce.options(**on(node)).remote(pid, k * 1000, 5, 4) for k, node in enumerate(NODES)
    ]
    outs = ray.get(producers)
    for node, out in zip(NODES, outs):
        assert set(out["units"]) == {unit_of(system, node)}
    client.seal(pid)
    seen = ray.get(consume.options(**on("node_c")).remote(pid, 6))
    expected = sorted(k * 1000 + i for k in range(3) for i in range(20))
    assert sorted(seen) == expected  # every row, none twice
    assert len(seen) == len(set(seen))
    # the streaming loader, across nodes (rows on all three, read on node_b)
    streamed = ray.get(stream.options(**on("node_b")).remote(pid))
    assert sorted(streamed) == expected
    client.clear_partition(pid)


def test_removing_a_node_gives_typed_errors_and_lost_rows(
    cluster: Any, system: dict[str, Any]
) -> None:
    pid = "doomed"
    client = tq.get_client()
    on_c = ray.get(produce.options(**on("node_c")).remote(pid, 0, 6, 1))
    kept = client.put(rows_of(500, 4), partition_id=pid)  # on node_a
    unit_c = unit_of(system, "node_c")
    assert set(on_c["units"]) == {unit_c}
    client.seal(pid)
    meta = client.get_meta(["id", "x"], 10, partition_id=pid, task_name="t")
    assert len(meta.rows) == 10
    ref = client.async_client._units[unit_c]
    loop = runtime_loop()
    loop.run(ref.call("stats"))  # connected before the node goes
    cluster.remove_node(cluster.tq_nodes["node_c"])
    started = time.monotonic()
    with pytest.raises(ActorDiedError):
        loop.run(ref.call("stats", timeout=30))
    took = time.monotonic() - started
    print(f"\na call to a unit on the removed node failed after {took:.3f} s")
    assert took < DEATH_S, took
    with pytest.raises(RowsLostError) as lost:
        client.get_data(meta)
    assert sorted(lost.value.rows) == sorted(
        r for r, u in zip(meta.rows, meta.units) if u == unit_c
    )
    # the client told the controller (which confirmed it) before it raised
    assert client.partition_info(pid).lost == 6
    # the rest keeps serving: the rows on node_a, and new puts (not to the dead unit)
    assert client.get_data(kept)["id"].tolist() == [500, 501, 502, 503]
    again = client.put(rows_of(900, 8), partition_id="after")
    assert unit_c not in set(again.units or [])
    assert client.get_data(again)["id"].tolist() == list(range(900, 908))
