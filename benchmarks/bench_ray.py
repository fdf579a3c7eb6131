"""The ray transport across two nodes of a local Ray cluster (issue 11), beside bare Ray.

A ``ray.cluster_utils.Cluster`` of two nodes is started here: ``node_a`` (the head, where this
driver runs, and the controller) and ``node_b`` (the storage units), one CPU each, 512 MiB
object stores. Both nodes are on this host, so "across nodes" means across raylets, object
stores and processes over loopback -- what a second host adds is the network.

* 128 MiB dense put + get (5 fields, 1024 rows): the driver on node_a puts to the units on
  node_b and gets the rows back: 2 x 128 MiB crossed nodes. Throughput = 2 x 128 MiB / (put
  + get). Baselines in the same run: a bare async Ray actor on node_b echoing numpy views of
  the same tensors (2 x 128 MiB / round trip), and ``ray.put`` on node_a + ``ray.get`` in
  that actor on node_b (128 MiB / (put + get)).
  The bound of the zmq data path: a bare pyzmq echo of the same buffers (2 x 128 MiB / round
  trip) to a process on this host.
* small operations, ray vs zmq in the same run: single-sample ``kv_batch_put`` and
  ``kv_batch_get``, single-sample ``get_meta`` (p50 ms), a 16 MiB put; the zmq system is a
  controller and 2 units on this host.
* the ray transport's other data path (``ray.data_path: "ray"``, one Ray task per call) on
  the same cluster, for the decision in docs/architecture.md (not in ``--quick``).

Run: ``python -m transferqueue bench ray [--quick]`` from the checkout.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import torch
from _common import BareZmq, MiB, Table, p50, rate
from tensordict import TensorDict

from transferqueue.config import load_config
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import start_system

DTYPES = [torch.int64, torch.int64, torch.int64, torch.float32, torch.float32]
STORE = 512 * MiB


def dense(mib: int, b: int = 1024) -> TensorDict:
    per_l = sum(torch.empty(0, dtype=d).element_size() for d in DTYPES)
    length = (mib * MiB) // (b * per_l)
    return TensorDict(
        {f"f{i}": torch.ones(b, length, dtype=d) for i, d in enumerate(DTYPES)}, batch_size=[b]
    )


def _nbytes(td: TensorDict) -> int:
    return sum(v.nbytes for v in td.values())


def _put_get(client: Any, td: TensorDict, pid: str) -> tuple[float, float]:
    """Put and get seconds of ``td`` (into a fresh partition)."""
    t0 = time.perf_counter()
    meta = client.put(td, partition_id=pid)
    t1 = time.perf_counter()
    out = client.get_data(meta)
    t2 = time.perf_counter()
    assert out.batch_size == td.batch_size
    del out
    client.clear_partition(pid)
    return t1 - t0, t2 - t1


def _small(client: Any, n: int, tag: str, out: dict[str, list[float]]) -> None:
    """``n`` single-sample kv_put / kv_get / get_meta and one 16 MiB put, appended to ``out``."""
    one = TensorDict({"input_ids": torch.arange(512)[None], "score": torch.ones(1, 1)}, [1])
    pid = f"small-{tag}"
    client.create_partition(pid)
    for i in range(n):
        t0 = time.perf_counter()
        client.kv_put([f"k{i}"], pid, one)  # what tq.kv_batch_put calls
        t1 = time.perf_counter()
        client.kv_get([f"k{i}"], pid)
        t2 = time.perf_counter()
        client.get_meta(["input_ids"], 1, pid, "consume")
        t3 = time.perf_counter()
        out["kv_batch_put_ms"].append((t1 - t0) * 1e3)
        out["kv_batch_get_ms"].append((t2 - t1) * 1e3)
        out["get_meta_ms"].append((t3 - t2) * 1e3)
    client.clear_partition(pid)
    mid = dense(16)
    t0 = time.perf_counter()
    client.put(mid, partition_id=f"mid-{tag}")
    out["put_16MiB_s"].append(time.perf_counter() - t0)
    client.clear_partition(f"mid-{tag}")


def _summary(out: dict[str, list[float]]) -> dict[str, float]:
    return {
        "kv_batch_put_ms": p50(out["kv_batch_put_ms"]),
        "kv_batch_get_ms": p50(out["kv_batch_get_ms"]),
        "get_meta_ms": p50(out["get_meta_ms"]),
        "put_16MiB_GBps": rate(16 * MiB, p50(out["put_16MiB_s"])),
    }


class _RayBaselines:
    """A bare async Ray actor on node_b: echo, and ``ray.get`` of a ``ray.put`` object."""

    def __init__(self, ray: Any) -> None:
        from _actors import RayEcho

        class Fetch(RayEcho):
            async def fetch(self, refs: list[Any]) -> int:
                arrays = await refs[0]
                return sum(a.nbytes for a in arrays)

        self.ray = ray
        self.actor = ray.remote(Fetch).options(num_cpus=0, resources={"node_b": 0.01}).remote()
        ray.get(self.actor.noop.remote())

    def once(self, arrays: list[Any]) -> tuple[float, float]:
        """Seconds of one echo round trip and of one ray.put + remote ray.get."""
        ray = self.ray
        t0 = time.perf_counter()
        out = ray.get(self.actor.echo.remote(arrays))
        echo = time.perf_counter() - t0
        del out
        t0 = time.perf_counter()
        ref = ray.put(arrays)
        got = ray.get(self.actor.fetch.remote([ref]))
        pg = time.perf_counter() - t0
        assert got == sum(a.nbytes for a in arrays)
        del ref
        return echo, pg


def _system(config: dict[str, Any]) -> Any:
    return runtime_loop().run(start_system(load_config(config)))


def run(quick: bool = False) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    _common.setup_path()
    reps = 3 if quick else 7
    small_n = 100 if quick else 300
    figures: dict[str, Any] = {}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"node_a": 1},
            "object_store_memory": STORE,
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    systems = []
    try:
        on_b = {
            "transport": "ray",
            "ray": {"namespace": "bench-ray"},
            "storage": {"nodes": ["node_b"], "units": 2},
            "controller": {"node": "node_a"},
        }
        ray_sys = _system(on_b)
        systems.append(ray_sys)
        zmq_sys = _system({"transport": "zmq"})
        systems.append(zmq_sys)
        td = dense(128)
        nbytes = _nbytes(td)
        arrays = [v.numpy() for v in td.values()]
        frames = [memoryview(a).cast("B") for a in arrays]
        baselines = _RayBaselines(ray)
        bare = BareZmq("echo")  # the bound of the zmq data path: a direct socket
        old = None
        if not quick:
            old = _system({**on_b, "ray": {"namespace": "bench-ray-old", "data_path": "ray"}})
            systems.append(old)
        t: dict[str, list[float]] = defaultdict(list)
        try:
            # interleaved rounds (first: warm-up): the machine's noise hits every figure alike
            for r in range(reps + 1):
                echo, pg = baselines.once(arrays)
                sock = bare.roundtrip(frames)
                rp, rg = _put_get(ray_sys.client, td, f"big-{r}")
                zp, zg = _put_get(zmq_sys.client, td, f"big-{r}")
                op, og = _put_get(old.client, td, f"big-{r}") if old is not None else (0, 0)
                if r:
                    for key, value in (
                        ("echo", echo), ("pg", pg), ("sock", sock), ("rp", rp), ("rg", rg),
                        ("zmq", zp + zg), ("old", op + og),
                    ):  # fmt: skip
                        t[key].append(value)
        finally:
            bare.close()
        ours = rate(2 * nbytes, p50(t["rp"]) + p50(t["rg"]))
        echo_rate = rate(2 * nbytes, p50(t["echo"]))
        figures.update(
            ray_put_get_128MiB_GBps=ours,
            ray_put_128MiB_GBps=rate(nbytes, p50(t["rp"])),
            ray_get_128MiB_GBps=rate(nbytes, p50(t["rg"])),
            bare_ray_echo_128MiB_GBps=echo_rate,
            ray_put_remote_get_128MiB_GBps=rate(nbytes, p50(t["pg"])),
            bare_zmq_echo_128MiB_GBps=rate(2 * nbytes, p50(t["sock"])),
            zmq_put_get_128MiB_GBps=rate(2 * nbytes, p50(t["zmq"])),
            ratio_vs_echo=ours / echo_rate,
        )
        if old is not None:
            figures["ray_tasks_put_get_128MiB_GBps"] = rate(2 * nbytes, p50(t["old"]))
        small: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        chunks = 5
        for c in range(chunks):  # interleaved chunks, as above
            _small(ray_sys.client, small_n // chunks, f"r{c}", small["ray"])
            _small(zmq_sys.client, small_n // chunks, f"z{c}", small["zmq"])
            if old is not None:
                _small(old.client, small_n // chunks, f"o{c}", small["old"])
        small_ray, small_zmq = _summary(small["ray"]), _summary(small["zmq"])
        figures["small_ray"], figures["small_zmq"] = small_ray, small_zmq
        if old is not None:
            figures["small_ray_tasks"] = _summary(small["old"])
    finally:
        for system in reversed(systems):
            runtime_loop().run(system.aclose(), timeout=60)
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous

    table = Table("ray transport across two nodes (local cluster_utils cluster, one host)")
    table.add(
        "128 MiB put+get, node_a <-> units on node_b",
        figures["ray_put_get_128MiB_GBps"],
        "GB/s",
        "bare Ray actor echo",
        figures["bare_ray_echo_128MiB_GBps"],
        target=">= 0.8x",
        met=figures["ratio_vs_echo"] >= 0.8,
    )
    table.add(
        "128 MiB put+get vs ray.put/ray.get",
        figures["ray_put_get_128MiB_GBps"],
        "GB/s",
        "ray.put + remote ray.get",
        figures["ray_put_remote_get_128MiB_GBps"],
    )
    table.add(
        "128 MiB put+get vs a direct socket",
        figures["ray_put_get_128MiB_GBps"],
        "GB/s",
        "bare pyzmq echo",
        figures["bare_zmq_echo_128MiB_GBps"],
    )
    table.add(
        "128 MiB put+get, ray vs zmq",
        figures["ray_put_get_128MiB_GBps"],
        "GB/s",
        "zmq transport",
        figures["zmq_put_get_128MiB_GBps"],
    )
    for key, label in (
        ("kv_batch_put_ms", "single-sample kv_batch_put p50"),
        ("kv_batch_get_ms", "single-sample kv_batch_get p50"),
        ("get_meta_ms", "single-sample get_meta p50"),
    ):
        value, base = small_ray[key], small_zmq[key]
        table.add(label, value, "ms", "zmq", base, target="<= 1.5x", met=value <= 1.5 * base)
    table.add("16 MiB put", small_ray["put_16MiB_GBps"], "GB/s", "zmq", small_zmq["put_16MiB_GBps"])
    if "small_ray_tasks" in figures:
        old_small = figures["small_ray_tasks"]
        table.add(
            "data_path=ray: 128 MiB put+get",
            figures["ray_tasks_put_get_128MiB_GBps"],
            "GB/s",
            "bare Ray actor echo",
            figures["bare_ray_echo_128MiB_GBps"],
        )
        for key, label in (
            ("kv_batch_put_ms", "data_path=ray: kv_batch_put p50"),
            ("kv_batch_get_ms", "data_path=ray: kv_batch_get p50"),
            ("get_meta_ms", "data_path=ray: get_meta p50"),
        ):
            table.add(label, old_small[key], "ms", "zmq", small_zmq[key])
    table.print()
    return figures
