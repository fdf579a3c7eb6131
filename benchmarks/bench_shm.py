"""Same-host shared memory on the zmq transport (issue 12 item 3): 128 MiB dense put and get
with ``zmq.shared_memory`` on and off, beside a memcpy into touched memory in the same run.

* Three zmq systems (controller + ``storage.units`` units, default 2; the full run adds a
  1-unit set) started in this run (:data:`MODES`): shared memory with the units keeping a
  put's frames as their buffers (``zmq.shm_keep``, the default: one copy per put), shared
  memory with the units copying them (two copies), and the socket; this process is the
  client of all three. put = ``client.put`` of the bench data's dense batch (5 fields of
  (1024, L): 3 int64, 2 float32, 128 MiB in all); get = ``client.get_data`` of the meta the
  put returned (the bytes only: no ``get_meta`` wait). The systems take turns, one repeat
  each, so that a load spike on a shared host hits both; medians after one warm-up.
* Baseline, measured just before every round: a single-thread ``copy_`` of the same byte
  count into a pre-touched buffer (``bench_data.memcpy_gbps``, fresh=False); the ratio
  judged is the median of each round's rate over the copy beside it. Target: put and get
  >= 4 GB/s each and >= 0.5x that copy.
* The transport's counters (``zmq_shm.COUNTERS``) are checked: the shared-memory system's
  large frames all took shared memory, the other's all took the socket.
* Where a put's time goes, load or not: the CPU time each process of the shared-memory
  system (this client, the controller, each unit; ``/proc/<pid>/task/*/schedstat``) spent
  during each put, beside the CPU time of the baseline copy; their sum over the put's wall
  time says how much they ran at once (above 1: they overlapped; 1 or less: one at a
  time, or waiting for a core).

Run: ``python -m transferqueue bench shm [--quick]`` from the checkout.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Table, p50, rate
from bench_data import dense, memcpy_gbps

from transferqueue.config import load_config
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import zmq_shm
from transferqueue.system import start_system

MIB = 128
#: the systems compared: shared memory with the units keeping a put's frames as their
#: buffers (the default), shared memory with the units copying them (two copies per put),
#: and the socket
MODES: dict[str, dict[str, bool]] = {
    "shm": {"shared_memory": True},
    "shm_copy": {"shared_memory": True, "shm_keep": False},
    "socket": {"shared_memory": False},
}
TARGET_GBPS = 4.0
TARGET_RATIO = 0.5


def cpu_ms(pid: int) -> float | None:
    """CPU time (ms) the threads of process ``pid`` ran so far; None without schedstat."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        total = 0
        for t in tasks:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e6


def copy_cpu_ms(nbytes: int) -> float:
    """CPU time (ms) of a single-thread copy of ``nbytes`` into touched memory."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.copy_(src)
        t0 = time.thread_time()
        dst.copy_(src)
        return (time.thread_time() - t0) * 1e3
    finally:
        torch.set_num_threads(before)


def _pids(system: Any) -> list[int]:
    """This process, then the system's controller and units (the handles' order)."""
    return [os.getpid(), *(h.pid for h in system.handles if h.pid is not None)]


def _round(
    client: Any, batch: Any, pid: str, pids: Sequence[int] = ()
) -> tuple[float, float, list[float] | None]:
    """Seconds of the put and of the get, and the CPU ms each of ``pids`` spent in the put."""
    before = [cpu_ms(p) for p in pids]
    t0 = time.perf_counter()
    meta = client.put(batch, partition_id=pid)
    t1 = time.perf_counter()
    after = [cpu_ms(p) for p in pids]
    spent = None
    if pids and all(a is not None and b is not None for a, b in zip(before, after)):
        spent = [(b or 0.0) - (a or 0.0) for a, b in zip(before, after)]
    got = client.get_data(meta)
    t2 = time.perf_counter()
    if got.batch_size[0] != batch.batch_size[0]:
        raise RuntimeError(f"got {got.batch_size[0]} rows, expected {batch.batch_size[0]}")
    del got
    client.clear_partition(pid)
    return t1 - t0, t2 - t1, spent


def measure(units: int, reps: int) -> dict[str, float]:
    """Medians of put / get rates per mode, of the copy baseline, and of the per-round ratio
    of each rate to the copy measured just before that round (a shared host's load moves
    between rounds; the copy beside each round moves with it)."""
    batch, nbytes, _ = dense(MIB)
    systems = {}
    copied: dict[str, float] = {}
    try:
        for mode, zmq in MODES.items():
            cfg = {"transport": "zmq", "storage": {"units": units}, "zmq": zmq}
            systems[mode] = runtime_loop().run(start_system(load_config(cfg)))
        rounds: dict[str, list[tuple[float, float, float]]] = {m: [] for m in systems}
        moved: dict[str, dict[str, int]] = {m: {} for m in systems}
        cpu: list[list[float]] = []  # per shm put: wall ms, then CPU ms of each process
        copy_cpu: list[float] = []
        for i in range(reps + 1):
            for mode, system in systems.items():
                copy = memcpy_gbps(nbytes, 1, fresh=False)
                pids = _pids(system) if mode == "shm" else ()
                before = zmq_shm.COUNTERS.snapshot()
                put_s, get_s, spent = _round(system.client, batch, f"{mode}-{i}", pids)
                after = zmq_shm.COUNTERS.snapshot()
                if i:
                    rounds[mode].append((rate(nbytes, put_s), rate(nbytes, get_s), copy))
                    if spent is not None:
                        cpu.append([put_s * 1e3, *spent])
                        copy_cpu.append(copy_cpu_ms(nbytes))
                    for k in after:
                        moved[mode][k] = moved[mode].get(k, 0) + after[k] - before[k]
        for mode, system in systems.items():  # what the units' writes copied, per put
            stats = [runtime_loop().run(u.call("stats")) for u in system.async_client._units]
            copied[mode] = sum(st["copied_bytes"] for st in stats) / (reps + 1) / nbytes
    finally:
        for system in systems.values():
            runtime_loop().run(system.aclose())
    for mode in ("shm", "shm_copy"):
        if moved[mode]["sent_socket"] or moved[mode]["sent_shm"] < reps * nbytes:
            raise RuntimeError(f"the {mode} system's bytes took the socket: {moved[mode]}")
    if copied["shm"] or copied["shm_copy"] < 1:
        raise RuntimeError(f"the units copied (share of each put's bytes): {copied}")
    if moved["socket"]["sent_shm"] or moved["socket"]["received_shm"]:
        raise RuntimeError(f"the socket system's bytes took shared memory: {moved['socket']}")
    all_rounds = [r for rs in rounds.values() for r in rs]
    out = {"memcpy_touched_GBps": p50([c for _, _, c in all_rounds])}
    out.update({f"unit_copied_per_put_{mode}": c for mode, c in copied.items()})
    if cpu:
        names = ["put_wall_ms", "cpu_client_ms", "cpu_controller_ms"]
        names += [f"cpu_unit{k}_ms" for k in range(len(cpu[0]) - len(names))]
        for j, name in enumerate(names):
            out[name] = p50([r[j] for r in cpu])
        out["cpu_copy_ms"] = p50(copy_cpu)
        out["cpu_over_wall"] = p50([sum(r[1:]) / r[0] for r in cpu])
    for mode, rs in rounds.items():
        for k, op in enumerate(("put", "get")):
            out[f"{op}_{mode}_GBps"] = p50([r[k] for r in rs])
            out[f"{op}_{mode}_over_memcpy"] = p50([r[k] / r[2] for r in rs])
    return out


def run(quick: bool = False) -> dict[str, Any]:
    reps = 3 if quick else 5
    figures: dict[str, Any] = {}
    for units in (2,) if quick else (2, 1):
        f = figures[f"units_{units}"] = measure(units, reps)
        table = Table(f"zmq, {MIB} MiB dense, {units} storage unit(s), medians of {reps}")
        copy = f["memcpy_touched_GBps"]
        for op in ("put", "get"):
            shm, sock = f[f"{op}_shm_GBps"], f[f"{op}_socket_GBps"]
            ratio = f[f"{op}_shm_over_memcpy"]
            met = shm >= TARGET_GBPS and ratio >= TARGET_RATIO
            table.add(
                f"{op}, shared memory",
                shm,
                "GB/s",
                "memcpy touched",
                copy,
                f">= {TARGET_GBPS:g} GB/s and >= {TARGET_RATIO}x",
                met,
            )
            if op == "put":
                two = f["put_shm_copy_GBps"]
                table.add(
                    "put, shared memory, units copy (shm_keep: false)",
                    two,
                    "GB/s",
                    "memcpy touched",
                    copy,
                )
                f["put_keep_over_copy"] = shm / two
            table.add(f"{op}, socket (shared_memory: false)", sock, "GB/s", "memcpy touched", copy)
            f[f"{op}_shm_over_socket"] = shm / sock
        table.note(
            "ratio column: medians of rates over the median copy; per-round ratio to the copy "
            f"beside it, median: put {f['put_shm_over_memcpy']:.2f}x, "
            f"get {f['get_shm_over_memcpy']:.2f}x (socket: put "
            f"{f['put_socket_over_memcpy']:.2f}x, get {f['get_socket_over_memcpy']:.2f}x)"
        )
        table.note(
            f"shared memory / socket: put {f['put_shm_over_socket']:.2f}x, "
            f"get {f['get_shm_over_socket']:.2f}x; units keeping the frames / copying them: "
            f"put {f['put_keep_over_copy']:.2f}x (per round: {f['put_shm_over_memcpy']:.2f}x "
            f"vs {f['put_shm_copy_over_memcpy']:.2f}x of the copy); the units copied "
            f"{f['unit_copied_per_put_shm']:.2f} / {f['unit_copied_per_put_shm_copy']:.2f} "
            "of a put's bytes"
        )
        if "cpu_client_ms" in f:
            units_cpu = "/".join(f"{f[f'cpu_unit{k}_ms']:.1f}" for k in range(units))
            table.note(
                f"CPU per shm put (medians, ms): client {f['cpu_client_ms']:.1f}, controller "
                f"{f['cpu_controller_ms']:.1f}, unit(s) {units_cpu}; a one-thread copy of "
                f"{MIB} MiB: {f['cpu_copy_ms']:.1f}; wall {f['put_wall_ms']:.1f} (CPU / wall "
                f"{f['cpu_over_wall']:.2f}; above 1: the processes overlapped)"
            )
        table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
