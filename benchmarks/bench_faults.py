"""Faults (issue 9): per fault, the time from a real SIGKILL to the outcome at the caller.

On zmq systems of their own (controller + 2 storage units in processes of their own, put
lease 1 s), each fault is injected at a point chosen by a barrier (the child reports it got
there), never by a timer, and timed from the kill (or, for a refused commit, from the
moment the commit is let go) to what the caller sees:

* producer killed between ``begin_put`` and ``commit`` -> the consumer's stream ends (the
  put lease expires, its slot is released); the baseline is the lease itself;
* commit refused after the writes (a dtype clash of two first puts) -> ``SchemaError`` at
  the writer, rows released;
* storage unit killed with rows on it -> ``RowsLostError`` at a ``get_data`` of them;
* controller killed under a waiting ``get_meta`` -> ``ActorDiedError`` at the waiter, then
  at a later call, then ``tq.close()`` of the system returns;
* owner process killed -> every one of its actor processes has exited (watched with
  pidfds: woken by the exits, not polling).

``python -m transferqueue bench faults [--quick]`` (quick: 1 repeat, else 3; medians).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fault_workers
import torch
from _common import Table

from transferqueue.config import load_config
from transferqueue.errors import ActorDiedError, RowsLostError, SchemaError
from transferqueue.metadata import BatchMeta
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import System, start_system

LEASE_S = 1.0
SPAWN = multiprocessing.get_context("spawn")


def _system() -> System:
    config = load_config(
        {"transport": "zmq", "controller": {"put_lease_s": LEASE_S}, "storage": {"units": 2}}
    )
    return runtime_loop().run(start_system(config))


def _close(system: System) -> float:
    started = time.monotonic()
    runtime_loop().run(system.aclose())
    return time.monotonic() - started


def _kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def _pid_of(system: System, index: int) -> int:
    loop = runtime_loop()
    if index == 0:
        return int(loop.run(system.async_client._controller.call("process_id")))
    return int(loop.run(system.async_client._units[index - 1].call("stats"))["pid"])


def producer_killed() -> dict[str, float]:
    system = _system()
    try:
        client, pid = system.client, f"f-{uuid.uuid4().hex[:6]}"
        client.create_partition(pid, expected_size=2)
        client.put({"x": torch.ones(1, 16)}, partition_id=pid)
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(
            target=_fault_workers.producer_stopped_after_begin,
            args=(system.config, pid, child),
            daemon=True,
        )
        proc.start()
        if not parent.poll(120) or parent.recv() != "begun":
            raise RuntimeError("the producer never reached begin_put")
        killed = _kill(proc.pid)
        client.seal(pid)
        client.get_meta(["x"], 2, pid, "t", timeout=30)
        if not client.get_meta(["x"], 2, pid, "t", timeout=30).is_empty:
            raise RuntimeError("the stream did not end")
        ended = time.monotonic() - killed
        proc.join(10)
        return {"stream_end_s": ended}
    finally:
        _close(system)


def commit_refused() -> dict[str, float]:
    system = _system()
    try:

        async def scenario() -> float:
            a, b = system.new_async_client(), system.new_async_client()
            written, go = asyncio.Event(), asyncio.Event()

            async def hold(point: str) -> None:
                if point == "written":
                    written.set()
                    await go.wait()

            a.put_hook = hold
            held = asyncio.ensure_future(a.put({"x": torch.ones(1, 16)}, partition_id="c"))
            await written.wait()
            await b.put({"x": torch.ones(1, 16, dtype=torch.int64)}, partition_id="c")
            started = time.monotonic()
            go.set()
            try:
                await held
            except SchemaError:
                took = time.monotonic() - started
            else:
                raise RuntimeError("the clashing commit was accepted")
            if (await b.partition_info("c")).in_flight:
                raise RuntimeError("the refused put's rows stayed in flight")
            await a.close()
            await b.close()
            return took

        return {"typed_error_s": runtime_loop().run(scenario())}
    finally:
        _close(system)


def unit_killed() -> dict[str, float]:
    system = _system()
    try:
        client = system.client
        metas = [client.put({"x": torch.ones(1, 16)}, partition_id="u") for _ in range(8)]
        killed = _kill(_pid_of(system, 2))
        try:
            client.get_data(BatchMeta.concat(metas))
        except RowsLostError:
            took = time.monotonic() - killed
        else:
            raise RuntimeError("a get of lost rows succeeded")
        return {"typed_error_s": took, "lost_rows": float(client.partition_info("u").lost)}
    finally:
        _close(system)


def controller_killed() -> dict[str, float]:
    system = _system()
    closed = False
    try:
        waiter = system.new_async_client()
        system.client.create_partition("w")
        waiting = runtime_loop().submit(waiter.get_meta(["x"], 1, "w", "t", timeout=None))
        while system.client.partition_info("w").waiting.get("t", 0) < 1:
            pass  # until the wait is registered (a few round trips)
        killed = _kill(_pid_of(system, 0))
        try:
            waiting.result(30)
        except ActorDiedError:
            waiter_s = time.monotonic() - killed
        else:
            raise RuntimeError("the waiter returned")
        started = time.monotonic()
        try:
            system.client.partition_info("w")
        except ActorDiedError:
            later_s = time.monotonic() - started
        close_s = _close(system)
        closed = True
        return {"waiter_error_s": waiter_s, "later_call_s": later_s, "close_s": close_s}
    finally:
        if not closed:
            _close(system)


def owner_killed() -> dict[str, float]:
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_fault_workers.owner, args=(child,), daemon=True)
    proc.start()
    if not parent.poll(120):
        raise RuntimeError("the owner never reported its actors")
    pids = parent.recv()
    fds = {os.pidfd_open(p): p for p in pids}
    killed = _kill(proc.pid)
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left = set(fds)
    while left:
        for fd, _ in poller.poll(30_000):
            poller.unregister(fd)
            left.discard(fd)
            os.close(fd)
        if time.monotonic() - killed > 30:
            raise RuntimeError(f"actor processes {[fds[f] for f in left]} outlived their owner")
    took = time.monotonic() - killed
    proc.join(10)
    return {"actors_exited_s": took}


FAULTS = [
    ("producer killed mid-put -> stream ends", producer_killed, "stream_end_s", LEASE_S + 2),
    ("commit refused -> SchemaError", commit_refused, "typed_error_s", 2.0),
    ("storage unit killed -> RowsLostError", unit_killed, "typed_error_s", 2.0),
    ("controller killed -> waiter ActorDiedError", controller_killed, "waiter_error_s", 2.0),
    ("owner killed -> actor processes exit", owner_killed, "actors_exited_s", 5.0),
]


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 1 if quick else 3
    table = Table("faults on zmq: from the kill to what the caller sees (median)")
    out: dict[str, Any] = {}
    for name, fn, key, bound in FAULTS:
        runs = [fn() for _ in range(repeats)]
        value = statistics.median(r[key] for r in runs)
        base = ("put lease", LEASE_S) if key == "stream_end_s" else ("", None)
        table.add(
            name, value * 1000, "ms", base[0], None if base[1] is None else base[1] * 1000,
            target=f"<= {bound * 1000:.0f} ms", met=value <= bound,
        )  # fmt: skip
        for extra in sorted(set(runs[0]) - {key}):
            v = statistics.median(r[extra] for r in runs)
            table.add(f"  {extra}", v if extra == "lost_rows" else v * 1000,
                      "" if extra == "lost_rows" else "ms")  # fmt: skip
        out[fn.__name__] = runs
    table.print()
    return out


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
