"""Costs flat in fields and in partition size (issue 12, item 4).

    python -m transferqueue bench fields [--quick] [--transport inproc|zmq]

Per transport (inproc, and zmq: controller + 2 units in processes of their own; this process
puts and gets):

* *get over k fields*: 128 MiB (64 MiB with ``--quick``) of int64 in B=1024 rows, split over
  k = 1, 8, 32, 128 fields of equal width, all four partitions held at once;
  ``get_data`` of all rows and fields (one ``get_meta`` before), the four taking turns,
  median of the repeats. Ratio: the 32-field (and 128-field) rate
  over the 1-field rate of the same run (target: 32 fields >= 0.8x).
* *put latency vs partition size*: single-row puts (2 fields: (1, 4) int64 and (1,)
  float32) into a partition that holds 1k rows and one that holds 1M rows (filled with puts
  of 64k rows first), taking turns; p50 of the single-row puts. Ratio: 1M / 1k (target
  <= 1.2x). The same with the storage unit's :class:`Store` alone (p50 per write, no
  actor): the unit's share.
* *put throughput across the piece limit*: dense puts of 16 KiB rows whose row count
  crosses ``units * stripe_rows * MAX_PIECES`` (2 * 128 * 8 = 2048 rows by default: past it
  a unit's share of a batch no longer goes as views of its runs, see
  ``client/routing.py``), at 0.5x, 1x, 1.25x, 2x and 4x that count, taking turns; GB/s,
  median of the repeats. Ratio: the rate just past the limit (1.25x) over the rate at it (1x), and the
  lowest over the highest (target: no cliff).
* *small writes*: the unit's CPU per single-row write of the fleet's sample (~40 KB in 3
  fields) into a partition whose rows are cleared and reused, with ``Store.write`` and
  with ``StorageUnit.put`` on an event loop (no transport).

Also runnable alone: ``python benchmarks/bench_fields.py [--quick]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import MiB, Table, p50, rate, setup_path, zmq_config
from tensordict import TensorDict

import transferqueue as tq
from transferqueue.client.routing import MAX_PIECES

setup_path()

FIELD_COUNTS = (1, 8, 32, 128)
ROWS = 1024


def _wide(total: int, k: int) -> TensorDict:
    width = total // (k * ROWS * 8)
    cols = {f"f{i:03d}": torch.full((ROWS, width), i, dtype=torch.int64) for i in range(k)}
    return TensorDict(cols, batch_size=[ROWS])


def get_by_fields(client: Any, total: int, repeat: int) -> dict[int, float]:
    """GB/s of a get of ``total`` bytes split over k fields, for each k; the k take turns
    (one get each per round, after a warm-up round), so all see the same load."""
    metas = {}
    for k in FIELD_COUNTS:
        td = _wide(total, k)
        client.put(td, partition_id=f"fields-{k}")
        metas[k] = client.get_meta(
            list(td.keys()), ROWS, f"fields-{k}", "bench", wait=True, timeout=120
        )
        del td
    times: dict[int, list[float]] = {k: [] for k in FIELD_COUNTS}
    for _ in range(repeat + 1):
        for k, meta in metas.items():
            t0 = time.perf_counter()
            got = client.get_data(meta)
            times[k].append(time.perf_counter() - t0)
            del got
    for k in FIELD_COUNTS:
        client.clear_partition(f"fields-{k}")
    return {k: rate(total, p50(t[1:])) for k, t in times.items()}


def _small(n: int) -> TensorDict:
    return TensorDict(
        {"a": torch.ones(n, 4, dtype=torch.int64), "b": torch.ones(n, dtype=torch.float32)},
        batch_size=[n],
    )


def put_latency(client: Any, sizes: tuple[int, ...], n: int) -> dict[int, float]:
    """p50 seconds of a single-row put into a partition holding ``size`` rows; the
    partitions take turns, 25 puts each, so both see the same load."""
    one = _small(1)
    chunk = 1 << 16
    for size in sizes:
        for start in range(0, size, chunk):
            client.put(_small(min(chunk, size - start)), partition_id=f"size-{size}")
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(0, n, 25):
        for size in sizes:
            for _ in range(25):
                t0 = time.perf_counter()
                client.put(one, partition_id=f"size-{size}")
                times[size].append(time.perf_counter() - t0)
    for size in sizes:
        client.clear_partition(f"size-{size}")
    return {size: p50(t) for size, t in times.items()}


def store_put_cpu(sizes: tuple[int, ...], n: int) -> dict[int, float]:
    """p50 seconds of a single-row ``Store.write`` (a new row) into a partition holding
    ``size`` rows; the stores take turns, 100 writes each, so both see the same load."""
    from transferqueue.storage.store import Store

    cols = {"a": torch.ones(1, 4, dtype=torch.int64), "b": torch.ones(1, dtype=torch.float32)}
    stores = {}
    for size in sizes:
        stores[size] = Store()
        full = {k: v.expand(size, *v.shape[1:]) for k, v in cols.items()}
        stores[size].write("p", range(size), full)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for block in range(0, n, 100):
        for size, store in stores.items():
            for i in range(block, min(n, block + 100)):
                t0 = time.perf_counter()
                store.write("p", [size + i], cols)
                times[size].append(time.perf_counter() - t0)
    return {size: p50(t) for size, t in times.items()}


def _fleet_sample() -> dict[str, torch.Tensor]:
    return {
        "prompts": torch.ones(1, 1024, dtype=torch.int64),
        "responses": torch.ones(1, 4096, dtype=torch.int64),
        "reward": torch.ones(1, dtype=torch.float32),
    }


def small_write_cpu(n: int) -> dict[str, float]:
    """CPU seconds per single-row write of the fleet's sample into a partition whose rows
    are cleared and reused: ``Store.write`` alone, and ``StorageUnit.put`` called on an
    event loop (the clear not counted)."""
    import asyncio

    from transferqueue.storage.store import Store
    from transferqueue.storage.unit import StorageUnit

    cols = _fleet_sample()
    store = Store()
    for i in range(64):
        store.write("p", [i], cols)
    spent = 0.0
    for i in range(n):
        store.clear_rows("p", [i % 64])
        t0 = time.process_time()
        store.write("p", [i % 64], cols)
        spent += time.process_time() - t0

    async def unit_puts() -> float:
        unit = StorageUnit(0, 1)
        for i in range(64):
            await unit.put("p", [i], cols)
        spent = 0.0
        for i in range(n):
            await unit.clear_rows("p", [i % 64])
            t0 = time.process_time()
            await unit.put("p", [i % 64], cols)
            spent += time.process_time() - t0
        return spent

    return {"store_write": spent / n, "unit_put": asyncio.run(unit_puts()) / n}


FACTORS = (0.5, 1.0, 1.25, 2.0, 4.0)


def put_throughput(client: Any, limit: int, row_bytes: int, repeat: int) -> dict[float, float]:
    """GB/s of dense puts of ``f * limit`` rows, for each factor f; the sizes take turns
    (one put each per round, after a warm-up round)."""
    width = row_bytes // 8
    batches = {
        f: TensorDict(
            {"x": torch.ones(int(f * limit), width, dtype=torch.int64)},
            batch_size=[int(f * limit)],
        )
        for f in FACTORS
    }
    times: dict[float, list[float]] = {f: [] for f in FACTORS}
    for _ in range(repeat + 1):
        for f, td in batches.items():
            t0 = time.perf_counter()
            client.put(td, partition_id="thr")
            times[f].append(time.perf_counter() - t0)
            client.clear_partition("thr")
    return {f: rate(int(f * limit) * row_bytes, p50(t[1:])) for f, t in times.items()}


def measure(transport: str, quick: bool) -> dict[str, Any]:
    cfg = tq.init(zmq_config() if transport == "zmq" else {"transport": transport})
    client = tq.get_client()
    try:
        limit = cfg.storage.units * cfg.storage.stripe_rows * MAX_PIECES
        return {
            "get_GBps": get_by_fields(client, (64 if quick else 128) * MiB, 5 if quick else 9),
            "put_p50_s": put_latency(client, (1_000, 1_000_000), 100 if quick else 300),
            "limit_rows": limit,
            "put_GBps": put_throughput(client, limit, 16 << 10, 5 if quick else 9),
        }
    finally:
        tq.close()


def run(quick: bool = False, transport: str | None = None) -> dict[str, Any]:
    transports = [transport] if transport else ["inproc", "zmq"]
    figures: dict[str, Any] = {}
    n_store = 2000 if quick else 10000
    figures["store_put_cpu_s"] = store_put_cpu((1_000, 1_000_000), n_store)
    figures["small_write_cpu_s"] = small_write_cpu(n_store)
    table = Table("costs flat in fields and partition size (issue 12, item 4)")
    s = figures["store_put_cpu_s"]
    table.add(
        "Store: 1-row write p50, 1M rows held",
        s[1_000_000] * 1e6,
        "us",
        "1k rows held",
        s[1_000] * 1e6,
        target="<= 1.2x",
        met=s[1_000_000] <= 1.2 * s[1_000],
    )
    w = figures["small_write_cpu_s"]
    table.add("Store.write: CPU per 1-row write of the fleet sample", w["store_write"] * 1e6, "us")
    table.add("StorageUnit.put: CPU per 1-row put of the fleet sample", w["unit_put"] * 1e6, "us")
    for t in transports:
        got = figures[t] = measure(t, quick)
        g = got["get_GBps"]
        for k in FIELD_COUNTS[1:]:
            table.add(
                f"{t}: get over {k} fields",
                g[k],
                "GB/s",
                "1 field",
                g[1],
                target=">= 0.8x" if k == 32 else "",
                met=g[k] >= 0.8 * g[1] if k == 32 else None,
            )
        lat = got["put_p50_s"]
        table.add(
            f"{t}: 1-row put p50, 1M rows in the partition",
            lat[1_000_000] * 1e3,
            "ms",
            "1k rows",
            lat[1_000] * 1e3,
            target="<= 1.2x",
            met=lat[1_000_000] <= 1.2 * lat[1_000],
        )
        thr, limit = got["put_GBps"], got["limit_rows"]
        for f in (f for f in FACTORS if f != 1.0):
            table.add(
                f"{t}: put of {int(f * limit)} rows (16 KiB each)",
                thr[f],
                "GB/s",
                f"{limit} rows",
                thr[1.0],
                target="no cliff" if f == 1.25 else "",
                met=thr[f] >= 0.8 * thr[1.0] if f == 1.25 else None,
            )
    table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
