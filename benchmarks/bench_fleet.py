"""A rollout fleet (issue 12): many producers putting one finished trajectory at a time.

On a zmq system (controller + 2 units, ``_common.zmq_config``):

* baselines in the same run: an empty controller call (``process_id``) on the runtime loop
  and through the sync facade (``loop.run``), and a bare pyzmq round trip of 40 KB (a
  DEALER/ROUTER pair, no transferqueue) -- a single-row put is at best one of those per
  round trip it makes;
* where a put's CPU goes, from the loop: the controller's CPU for ``begin_put`` +
  ``commit`` of one sample next to two empty calls, a unit's for one ``put`` of the sample
  next to one empty call;
* a single-row ``client.put`` and ``kv_batch_put`` from the sync client, one at a time
  (p50, p99);
* the fleet: P spawned producer processes (P = 1, 8, 32; quick: 1, 8) each put S
  single-sample batches (~40 KB in 3 fields: ``prompts`` int64 (1, 1024), ``responses``
  int64 (1, 4096), ``reward`` float32 (1,), and a tag naming the sample) with
  ``client.put`` (and, at P = 8, ``kv_batch_put``) while one consumer process streams them
  (``get_meta(batch_size=1, wait=True)`` + ``get_data``). Figures: aggregate samples/s
  (samples put / wall time from the start signal to the last put returned), put p50/p99,
  put returned -> consumer holds it p50/p99 (both ``perf_counter``, CLOCK_MONOTONIC), and
  the CPU share of the controller and of the units (CPU seconds / wall seconds over the run;
  1.0 = one core busy);
* reading back: ``kv_batch_get`` of 64 keys per call, samples/s.

Also runnable alone: ``python benchmarks/bench_fleet.py [--quick]``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BareZmq, Table, p50, pct, zmq_config
from _fleet_workers import consumer, producer, sample

import transferqueue as tq
from transferqueue.client.columns import field_spec, payload_bytes
from transferqueue.runtime.actor import ActorRef, Address
from transferqueue.runtime.loop import runtime_loop

TARGET_PUT_MS = 1.0
TARGET_FLEET8 = 1800.0
TARGET_FLEET8_P99_MS = 10.0
TARGET_READ64 = 20_000.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- baselines
def empty_calls(cfg: Any, n: int) -> dict[str, list[float]]:
    """Seconds of an empty controller call on the loop and through the sync facade."""
    loop = runtime_loop()
    ref = ActorRef(Address.from_plain(cfg.system["controller"]), cfg)

    async def on_loop() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await ref.call("process_id")
            out.append(time.perf_counter() - t0)
        return out

    try:
        loop.run(ref.call("process_id"))
        looped = loop.run(on_loop())
        sync = []
        for _ in range(n):
            t0 = time.perf_counter()
            loop.run(ref.call("process_id"))
            sync.append(time.perf_counter() - t0)
    finally:
        loop.run(ref.aclose())
    return {"loop": looped, "sync": sync}


def bare_zmq_40k(n: int) -> list[float]:
    bare = BareZmq("ack")
    try:
        payload = os.urandom(40 * 1024)
        for _ in range(20):
            bare.roundtrip([payload])
        return [bare.roundtrip([payload]) for _ in range(n)]
    finally:
        bare.close()


def call_costs(cfg: Any, n: int, pids: list[int]) -> dict[str, float]:
    """Where a put's CPU goes, call by call, from the runtime loop (no sync facade): CPU
    microseconds in the controller for ``begin_put`` + ``commit`` of one sample against two
    empty calls (``process_id``), and in a unit for one ``put`` of the sample against an
    empty call (``stats``; the puts rewrite rows written once before, so no buffer grows);
    each pair measured back to back."""
    loop = runtime_loop()
    ctrl = ActorRef(Address.from_plain(cfg.system["controller"]), cfg)
    unit = ActorRef(Address.from_plain(cfg.system["units"][0]), cfg)
    columns = sample()
    specs = {k: field_spec(c) for k, c in columns.items()}
    nbytes = payload_bytes(columns)

    async def puts() -> None:
        for i in range(n):
            begun = await ctrl.call(
                "begin_put", "fleet-calls", specs, 1, None, None, [{"s": i}], nbytes, "bench"
            )
            await ctrl.call("commit", "fleet-calls", begun["lease"], nbytes)

    async def empty(ref: ActorRef, method: str, times: int) -> None:
        for _ in range(n * times):
            await ref.call(method)

    async def unit_puts() -> None:
        for i in range(n):
            await unit.call("put", "fleet-calls-unit", [i], columns)

    def cost(pid: int, work: Any) -> float:
        before = cpu_seconds(pid)
        loop.run(work)
        return (cpu_seconds(pid) - before) / n * 1e6

    out: dict[str, float] = {}
    try:
        loop.run(puts())  # warm
        loop.run(unit_puts())
        out["controller_put_us"] = cost(pids[0], puts())
        out["controller_empty2_us"] = cost(pids[0], empty(ctrl, "process_id", 2))
        out["unit_put_us"] = cost(pids[1], unit_puts())
        out["unit_empty_us"] = cost(pids[1], empty(unit, "stats", 1))
        loop.run(ctrl.call("clear_partition", "fleet-calls"))
        loop.run(unit.call("clear_partition", "fleet-calls-unit"))
    finally:
        loop.run(ctrl.aclose())
        loop.run(unit.aclose())
    return out


def single_puts(n: int, pids: list[int]) -> dict[str, Any]:
    """Latencies of single-row puts, and the CPU microseconds one costs in this process (the
    client), the controller and the units together: on a loaded host CPU time is steadier
    than wall time."""
    client = tq.get_client()
    data = sample()
    out: dict[str, Any] = {"put": [], "kv": []}
    for j in range(20):
        client.put(data, partition_id="fleet-single", tags=[{"s": j}])
    mine, theirs = time.process_time(), [cpu_seconds(p) for p in pids]
    for j in range(n):
        client.put(data, partition_id="fleet-single", tags=[{"s": j}])
    out["cpu_us"] = [(time.process_time() - mine) / n * 1e6] + [
        (cpu_seconds(p) - c) / n * 1e6 for p, c in zip(pids, theirs)
    ]
    for j in range(n + 20):
        t0 = time.perf_counter()
        client.put(data, partition_id="fleet-single", tags=[{"s": j}])
        dt = time.perf_counter() - t0
        if j >= 20:
            out["put"].append(dt)
    for j in range(n + 20):
        t0 = time.perf_counter()
        tq.kv_batch_put([f"k{j}"], "fleet-single-kv", fields=data, tags=[{"s": j}])
        dt = time.perf_counter() - t0
        if j >= 20:
            out["kv"].append(dt)
    client.clear_partition("fleet-single")
    client.clear_partition("fleet-single-kv")
    return out


# ----------------------------------------------------------------- the fleet
def fleet(cfg: Any, producers: int, samples: int, mode: str, pids: list[int]) -> dict[str, Any]:
    """P producer processes and one consumer; see the module docstring."""
    ctx = mp.get_context("spawn")
    pid = f"fleet-{mode}-{producers}"
    total = producers * samples
    procs, conns = [], []
    c_conn, c_child = ctx.Pipe()
    cons = ctx.Process(target=consumer, args=(c_child, cfg, pid, total), daemon=True)
    cons.start()
    for i in range(producers):
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=producer, args=(child, cfg, pid, i, samples, mode), daemon=True)
        proc.start()
        procs.append(proc)
        conns.append(conn)

    def recv(conn: Any, timeout: float = 300) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError("a fleet process went quiet")
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"a fleet process failed: {value}")
        return value

    try:
        for conn in (c_conn, *conns):
            recv(conn)
        cpu0 = [cpu_seconds(p) for p in pids]
        t0 = time.perf_counter()
        for conn in conns:
            conn.send("go")
        results = [recv(conn) for conn in conns]
        wall = max(max(done) for _, done in results) - t0
        cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
        held = recv(c_conn)
    finally:
        for proc in (cons, *procs):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    lat = [x for lats, _ in results for x in lats]
    delay = [held[(i, j)] - results[i][1][j] for i in range(producers) for j in range(samples)]
    tq.get_client().clear_partition(f"{pid}-warm")
    return {
        "pid": pid,
        "rate": total / wall,
        "put_p50_ms": p50(lat) * 1e3,
        "put_p99_ms": pct(lat, 99) * 1e3,
        "held_p50_ms": p50(delay) * 1e3,
        "held_p99_ms": pct(delay, 99) * 1e3,
        "controller_cpu": cpu[0] / wall,
        "units_cpu": sum(cpu[1:]) / wall,
    }


def read_back(pid: str, keys: list[str], per_call: int, rounds: int) -> float:
    """Samples/s of ``kv_batch_get`` of ``per_call`` keys per call."""
    calls = [keys[i : i + per_call] for i in range(0, len(keys) - per_call + 1, per_call)]
    tq.kv_batch_get(calls[0], pid)
    t0 = time.perf_counter()
    got = 0
    for _ in range(rounds):
        for batch in calls:
            got += len(tq.kv_batch_get(batch, pid))
    return got / (time.perf_counter() - t0)


# ----------------------------------------------------------------- the table
def run(quick: bool = False) -> dict[str, Any]:
    table = Table("fleet (issue 12), zmq: single-sample puts (~40 KB, 3 fields, a tag)")
    figures: dict[str, Any] = {}
    try:
        cfg = tq.init(zmq_config())
        client = tq.get_client()
        ctrl = ActorRef(Address.from_plain(cfg.system["controller"]), cfg)
        loop = runtime_loop()
        pids = [loop.run(ctrl.call("process_id"))]
        for u in cfg.system["units"]:
            ref = ActorRef(Address.from_plain(u), cfg)
            pids.append(loop.run(ref.call("stats"))["pid"])
            loop.run(ref.aclose())
        loop.run(ctrl.aclose())

        n = 200 if quick else 1000
        empty = empty_calls(cfg, n)
        bare = bare_zmq_40k(n)
        e_loop, e_sync, b50 = p50(empty["loop"]) * 1e3, p50(empty["sync"]) * 1e3, p50(bare) * 1e3
        table.add("baseline: empty call on the loop p50", e_loop, "ms")
        table.add("baseline: empty call, sync facade p50", e_sync, "ms")
        table.add("baseline: bare pyzmq 40 KB round trip p50", b50, "ms")
        figures.update(empty_loop_p50_ms=e_loop, empty_sync_p50_ms=e_sync, bare_zmq_40k_p50_ms=b50)

        costs = call_costs(cfg, max(n, 1000), pids)  # /proc counts CPU in 10 ms ticks
        table.add(
            "controller CPU: begin_put + commit",
            costs["controller_put_us"],
            "us",
            "2 empty calls",
            costs["controller_empty2_us"],
        )
        table.add(
            "unit CPU: one put of the sample",
            costs["unit_put_us"],
            "us",
            "1 empty call",
            costs["unit_empty_us"],
        )
        figures.update(calls=costs)

        single = single_puts(n, pids)
        cpu = single["cpu_us"]
        table.add("CPU per single-row put: client", cpu[0], "us")
        table.add("CPU per single-row put: controller", cpu[1], "us")
        table.add("CPU per single-row put: units", sum(cpu[2:]), "us")
        figures.update(
            put_cpu_client_us=cpu[0], put_cpu_controller_us=cpu[1], put_cpu_units_us=sum(cpu[2:])
        )
        for kind, label in (("put", "client.put"), ("kv", "kv_batch_put")):
            s50, s99 = p50(single[kind]) * 1e3, pct(single[kind], 99) * 1e3
            table.add(
                f"single-row {label} p50 (sync client)",
                s50,
                "ms",
                "empty sync call",
                e_sync,
                f"<= {TARGET_PUT_MS} ms",
                s50 <= TARGET_PUT_MS,
            )
            table.add(f"single-row {label} p99", s99, "ms")
            figures.update({f"single_{kind}_p50_ms": s50, f"single_{kind}_p99_ms": s99})

        samples = 150 if quick else 400
        runs = [(1, "put"), (8, "put"), (8, "kv")] + ([] if quick else [(32, "put")])
        base_rate = None
        for producers, mode in runs:
            got = fleet(cfg, producers, samples if producers < 32 else samples // 2, mode, pids)
            label = f"P={producers} {'client.put' if mode == 'put' else 'kv_batch_put'}"
            if base_rate is None:
                base_rate = got["rate"]
            is8 = producers == 8
            table.add(
                f"{label}: samples/s",
                got["rate"],
                "/s",
                "P=1" if producers > 1 else "",
                base_rate if producers > 1 else None,
                f">= {TARGET_FLEET8:.0f}/s" if is8 else "",
                got["rate"] >= TARGET_FLEET8 if is8 else None,
            )
            table.add(
                f"{label}: put p50 / p99",
                got["put_p99_ms"],
                "ms",
                "p50",
                got["put_p50_ms"],
                f"p99 <= {TARGET_FLEET8_P99_MS} ms" if is8 else "",
                got["put_p99_ms"] <= TARGET_FLEET8_P99_MS if is8 else None,
            )
            table.add(
                f"{label}: put -> consumer p99", got["held_p99_ms"], "ms", "p50", got["held_p50_ms"]
            )
            table.add(f"{label}: controller CPU share", got["controller_cpu"], "cores")
            table.add(f"{label}: units CPU share", got["units_cpu"], "cores")
            figures[f"fleet_{mode}_{producers}"] = got
            if mode == "kv":
                keys = [f"{i}-{j}" for i in range(producers) for j in range(samples)]
                rate = read_back(got["pid"], keys, 64, 3 if quick else 10)
                one = read_back(got["pid"], keys[:200], 1, 1)
                table.add(
                    "kv_batch_get, 64 keys per call",
                    rate,
                    "/s",
                    "1 key per call",
                    one,
                    f">= {TARGET_READ64:.0f}/s",
                    rate >= TARGET_READ64,
                )
                figures.update(read64_per_s=rate, read1_per_s=one)
            client.clear_partition(got["pid"])
        table.note("ratios: value / baseline; the put p99 row shows p50 as its baseline")
    finally:
        table.print()
        tq.close()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
