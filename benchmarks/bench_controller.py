"""The controller (issue 3): wake-up latency, get_meta cost vs ready rows, memory, appends.

* commit -> waiter wake-up, inproc and zmq (``tq.init`` systems). A waiter is blocked in
  ``get_meta(wait=True)`` (batch of 1); 2 ms after it called, the producer, which already
  holds a row from ``begin_put``, sends ``commit`` to the controller on a connection of its
  own. Latency = from just before the commit request is sent to the waiter's ``get_meta``
  returning, both ``time.perf_counter()`` in this process:
  - "commit -> waiter" (the target): waiter (async client) and producer both on the
    runtime loop: the controller's wake-up plus one transport hop each way;
  - "... in a thread": the waiter uses the sync client in another thread (adds the
    thread hop back to the caller);
  - "put returned -> waiter in a thread": from the producer's ``client.put`` returning to
    the waiter's ``get_meta`` returning (<= 0 when the waiter is woken before the commit's
    reply reaches the producer).
* ``get_meta`` p50 (batch of 8) with 8 / 4k / 64k ready rows, kept constant by committing 8
  rows before each (untimed) call, sizes interleaved: on :class:`ControllerState` directly,
  and through an inproc :class:`ControllerActor` (timed on the runtime loop, codec on).
* bytes of controller state per row: 1M rows, 8 fields, 4 tasks (``memory_bytes``).
* single-row append (allocate + commit on the state) at 10k and at 1M rows.
* controller throughput (issue 12): 64 concurrent clients (4 spawned processes x 16
  connections of their own, zmq) loop ``begin_put`` -> ``commit`` -> ``get_meta``
  (``wait=False``) for a few seconds; ops/s over all of them, against the same loop from
  one client (the same-run baseline: what one caller's round trips allow); and the CPU
  microseconds per op of the controller process and of the callers, over the timed window.

Also runnable alone: ``python benchmarks/bench_controller.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import Table, p50, pct, zmq_config

import transferqueue as tq
from transferqueue.client.columns import field_spec
from transferqueue.config import Config
from transferqueue.controller.actor import ControllerActor
from transferqueue.controller.state import ControllerState, FieldSpec
from transferqueue.runtime.actor import ActorRef, Address
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports.inproc import InprocTransport

SPEC = FieldSpec("torch.float32", 1)
WIRE_SPEC = {"x": field_spec(torch.zeros(1, 1))}
BATCH = 8
SIZES = (8, 4096, 65536)
#: the public TransferQueue's get_meta on this machine, quoted in issue 3
PUBLIC_GET_META = {8: "1.6 ms", 65536: "13.7 ms"}


# ----------------------------------------------------------------- wake-up latency
def _consumer(client: Any, pid: str, n: int, blocked: threading.Event, out: queue.Queue) -> None:
    try:
        for _ in range(n):
            blocked.set()
            meta = client.get_meta(["x"], 1, pid, "t", wait=True, timeout=60)
            out.put((time.perf_counter(), len(meta)))
    except BaseException as exc:  # surface it to the producer
        out.put((exc, 0))


def _await_consumer(out: queue.Queue) -> float:
    t, rows = out.get(timeout=90)
    if isinstance(t, BaseException):
        raise t
    if rows != 1:
        raise RuntimeError(f"the waiter got {rows} rows, expected 1")
    return t


def wake_latency(transport: str, n: int, warm: int = 20) -> dict[str, list[float]]:
    """Seconds from the commit being sent (or the put returning) to the waiter's get_meta
    returning: ``async`` (waiter and producer on the runtime loop), ``thread`` (waiter in
    another thread, sync client), ``put`` (put returned -> waiter, sync client)."""
    cfg = tq.init(zmq_config() if transport == "zmq" else None)
    loop = runtime_loop()
    client, aclient = tq.get_client(), tq.get_async_client()
    ctrl = ActorRef(Address.from_plain(cfg.system["controller"]), cfg)

    async def waiter(pid: str) -> tuple[int, float]:
        meta = await aclient.get_meta(["x"], 1, pid, "t", wait=True, timeout=60)
        return len(meta), time.perf_counter()

    async def commit_one(pid: str) -> float:
        lease = (await ctrl.call("begin_put", pid, WIRE_SPEC, 1))["lease"]
        t0 = time.perf_counter()
        await ctrl.call("commit", pid, lease)
        return t0

    async def on_loop(pid: str) -> list[float]:
        lat = []
        for i in range(n + warm):
            task = asyncio.ensure_future(waiter(pid))
            await asyncio.sleep(0.002)  # let its get_meta reach the controller and block
            t0 = await commit_one(pid)
            rows, t1 = await task
            if rows != 1:
                raise RuntimeError(f"the waiter got {rows} rows, expected 1")
            if i >= warm:
                lat.append(t1 - t0)
        return lat

    results: dict[str, list[float]] = {"async": [], "thread": [], "put": []}
    try:
        results["async"] = loop.run(on_loop("wake-async"))
        for kind in ("thread", "put"):
            pid = f"wake-{kind}"
            blocked, out = threading.Event(), queue.Queue()
            thread = threading.Thread(
                target=_consumer, args=(client, pid, n + warm, blocked, out), daemon=True
            )
            thread.start()
            for i in range(n + warm):
                if not blocked.wait(60):
                    raise RuntimeError("the consumer thread did not come back")
                blocked.clear()
                time.sleep(0.002)  # let its get_meta reach the controller and block
                if kind == "thread":
                    t0 = loop.run(commit_one(pid))
                else:
                    client.put({"x": torch.zeros(1, 1)}, partition_id=pid)
                    t0 = time.perf_counter()
                t1 = _await_consumer(out)
                if i >= warm:
                    results[kind].append(t1 - t0)
            thread.join(10)
    finally:
        loop.run(ctrl.aclose())
        tq.close()
    return results


# ----------------------------------------------------------------- get_meta cost
def _fill(state: ControllerState, pid: str, n: int, fields: list[str]) -> None:
    rows = state.allocate(pid, n)
    state.commit(pid, rows, dict.fromkeys(fields, SPEC))


def get_meta_state_p50(sizes: tuple[int, ...], calls: int) -> dict[int, float]:
    """p50 seconds of ``ControllerState.get_meta`` (batch 8) per ready-row count, sizes
    interleaved so that machine noise hits every size alike."""
    states = {}
    for ready in sizes:
        states[ready] = ControllerState()
        _fill(states[ready], "p", ready, ["x"])
    times: dict[int, list[float]] = {ready: [] for ready in sizes}
    for _ in range(calls):
        for ready, state in states.items():
            _fill(state, "p", BATCH, ["x"])
            t0 = time.perf_counter()
            meta = state.get_meta("p", "train", ["x"], BATCH)
            times[ready].append(time.perf_counter() - t0)
            if meta is None or len(meta) != BATCH:
                raise RuntimeError("benchmark expected a full batch")
    return {ready: p50(ts) for ready, ts in times.items()}


def get_meta_actor_p50(sizes: tuple[int, ...], calls: int) -> dict[int, float]:
    """The same through an inproc ControllerActor, timed on the runtime loop."""
    loop = runtime_loop()
    transport = InprocTransport(Config())
    handles = {ready: loop.run(transport.spawn(ControllerActor)) for ready in sizes}

    async def commit(ref: Any, n: int) -> None:
        lease = (await ref.call("begin_put", "p", WIRE_SPEC, n))["lease"]
        await ref.call("commit", "p", lease)

    async def measure() -> dict[int, list[float]]:
        times: dict[int, list[float]] = {ready: [] for ready in sizes}
        for ready, h in handles.items():
            await commit(h.ref, ready)
        for _ in range(calls):
            for ready, h in handles.items():
                await commit(h.ref, BATCH)
                t0 = time.perf_counter()
                meta = await h.ref.call("get_meta", ["x"], BATCH, "p", "train", None, False)
                times[ready].append(time.perf_counter() - t0)
                if len(meta) != BATCH:
                    raise RuntimeError("benchmark expected a full batch")
        return times

    try:
        times = loop.run(measure())
    finally:
        for h in handles.values():
            loop.run(h.stop())
    return {ready: p50(ts) for ready, ts in times.items()}


# ----------------------------------------------------------------- memory, appends
def bytes_per_row(rows: int = 1_000_000, fields: int = 8, tasks: int = 4) -> float:
    state = ControllerState()
    names = [f"f{i}" for i in range(fields)]
    _fill(state, "p", rows, names)
    for t in range(tasks):
        state.get_meta("p", f"task{t}", names, 1)
    return state.memory_bytes("p") / rows


def append_times(sizes: tuple[int, ...], appends: int) -> dict[int, float]:
    """Seconds per single-row allocate + commit once a partition holds ``size`` rows,
    sizes interleaved (median of batches of 100 appends)."""
    states = {}
    for size in sizes:
        states[size] = ControllerState()
        _fill(states[size], "p", size, ["x", "y"])
    spec = {"x": SPEC, "y": SPEC}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(appends // 100):
        for size, state in states.items():
            t0 = time.perf_counter()
            for _ in range(100):
                state.commit("p", state.allocate("p", 1), spec)
            times[size].append((time.perf_counter() - t0) / 100)
    return {size: statistics.median(ts) for size, ts in times.items()}


# ----------------------------------------------------------------- throughput
def controller_ops(clients: int, procs: int, seconds: float) -> tuple[float, float, float]:
    """Controller ops/s with ``clients`` concurrent callers spread over ``procs`` spawned
    processes (see :func:`_fleet_workers.hammer`), and the CPU microseconds per op of the
    controller process (its zmq I/O thread included) and of the callers' processes, taken
    over the timed window: on a shared host CPU per op is steadier than ops/s."""
    import multiprocessing as mp

    from _fleet_workers import hammer
    from bench_fleet import cpu_seconds

    cfg = tq.init(zmq_config())
    ctrl = ActorRef(Address.from_plain(cfg.system["controller"]), cfg)
    loop = runtime_loop()
    try:
        ctrl_pid = loop.run(ctrl.call("process_id"))
    finally:
        loop.run(ctrl.aclose())
    ctx = mp.get_context("spawn")
    pid = f"ops-{clients}"
    conns, children = [], []
    try:
        for _ in range(procs):
            conn, child = ctx.Pipe()
            proc = ctx.Process(
                target=hammer, args=(child, cfg, pid, clients // procs, seconds), daemon=True
            )
            proc.start()
            conns.append(conn)
            children.append(proc)
        for conn in conns:
            if not conn.poll(300) or conn.recv()[0] != "ready":
                raise RuntimeError("a client process did not start")
        start = time.perf_counter() + 0.5
        for conn in conns:
            conn.send(start)
        pids = [ctrl_pid] + [p.pid for p in children if p.pid is not None]
        time.sleep(max(0.0, start - time.perf_counter()))
        cpu0 = [cpu_seconds(p) for p in pids]
        time.sleep(seconds)
        cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
        total = 0
        for conn in conns:
            if not conn.poll(300):
                raise RuntimeError("a client process went quiet")
            kind, value = conn.recv()
            if kind != "done":
                raise RuntimeError(f"a client process failed: {value}")
            total += value
        tq.get_client().clear_partition(pid)
        per_op = 1e6 / max(total, 1)
        return total / seconds, cpu[0] * per_op, sum(cpu[1:]) * per_op
    finally:
        for proc in children:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        tq.close()


# ----------------------------------------------------------------- the table
def run(quick: bool = False) -> dict[str, Any]:
    table = Table("controller (issue 3). Latencies in ms/us, medians unless p99")
    figures: dict[str, Any] = {}
    try:
        n = 100 if quick else 300
        targets = {"inproc": 0.2, "zmq": 1.0}
        for transport, target in targets.items():
            lat = wake_latency(transport, n)
            c50, c99 = p50(lat["async"]) * 1e3, pct(lat["async"], 99) * 1e3
            t50, u50 = p50(lat["thread"]) * 1e3, p50(lat["put"]) * 1e3
            tgt = f"<= {target} ms"
            table.add(f"{transport} commit -> waiter p50", c50, "ms", target=tgt, met=c50 <= target)
            table.add(f"{transport} commit -> waiter p99", c99, "ms")
            table.add(
                f"{transport} commit -> waiter in a thread p50",
                t50,
                "ms",
                target=tgt,
                met=t50 <= target,
            )
            table.add(f"{transport} put returned -> waiter in a thread p50", u50, "ms")
            figures.update(
                {
                    f"{transport}_commit_wake_p50_ms": c50,
                    f"{transport}_commit_wake_p99_ms": c99,
                    f"{transport}_commit_wake_thread_p50_ms": t50,
                    f"{transport}_put_return_to_wake_p50_ms": u50,
                }
            )
        for label, fn, calls in (
            ("state", get_meta_state_p50, 1000 if quick else 3000),
            ("inproc actor", get_meta_actor_p50, 300 if quick else 1000),
        ):
            got = fn(SIZES, calls)
            base = got[8]
            for ready in SIZES:
                us = got[ready] * 1e6
                last = ready == SIZES[-1]
                table.add(
                    f"get_meta p50, {label}, {ready} ready",
                    us,
                    "us",
                    "8 ready" if ready != 8 else "",
                    base * 1e6 if ready != 8 else None,
                    "<= 1.5x of 8" if last else "",
                    (got[ready] <= 1.5 * base) if last else None,
                    public=PUBLIC_GET_META.get(ready, "") if label == "state" else "",
                )
                figures[f"get_meta_{label.replace(' ', '_')}_{ready}_us"] = us
        bpr = bytes_per_row()
        table.add("state bytes/row (1M rows, 8 fields, 4 tasks)", bpr, "B")
        figures["state_bytes_per_row_1M_8f_4t"] = bpr
        app = append_times((10_000, 1_000_000), 2000 if quick else 5000)
        small, large = app[10_000] * 1e6, app[1_000_000] * 1e6
        table.add("single-row append at 10k rows", small, "us")
        table.add(
            "single-row append at 1M rows",
            large,
            "us",
            "at 10k",
            small,
            "<= 2x of 10k",
            large <= 2 * small,
        )
        figures.update(append_10k_us=small, append_1M_us=large)
        seconds = 3.0 if quick else 8.0
        one, one_ctl, _ = controller_ops(1, 1, seconds)
        many, many_ctl, many_callers = controller_ops(64, 4, seconds)
        table.add("zmq controller ops/s, 1 client", one, "/s")
        table.add("controller CPU per op, 1 client", one_ctl, "us")
        table.add(
            "zmq controller ops/s, 64 concurrent clients",
            many,
            "/s",
            "1 client",
            one,
            ">= 10000/s",
            many >= 10_000,
        )
        table.add("controller CPU per op, 64 clients", many_ctl, "us", "1 client", one_ctl)
        table.add("64 callers' CPU per op (4 processes)", many_callers, "us")
        figures.update(
            controller_ops_1=one,
            controller_ops_64=many,
            controller_cpu_us_per_op_1=one_ctl,
            controller_cpu_us_per_op_64=many_ctl,
            callers_cpu_us_per_op_64=many_callers,
        )
    finally:
        table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
