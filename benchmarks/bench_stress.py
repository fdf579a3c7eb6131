"""Stress (issue 9): the load a zmq system holds without losing or duplicating a row.

A zmq system of its own (controller + 2 storage units, ``storage.capacity_bytes`` bounded,
``block_when_full`` so producers get backpressure, ``controller.put_lease_s = 2`` where the
config has it). Producer processes (spawned; default 8, each with 32 async clients on one
event loop, every client with connections of its own: 256 clients) put rows of 1 MiB as kv
keys ``f"{producer}-{seq}"`` into one partition: 10 GiB in all (quick: 4 x 64 clients,
1 GiB). Two consumer processes, one per task (4 async clients each, batches of 8), read
every row and check it (crc32, and that the bytes are the row's own; see
``_stress_workers``). This process counts, per task, how often it received each
``(producer, seq)``: lost = never, duplicated = more than once; it clears a row with
``kv_clear`` once both tasks have it and its producer has reported it committed.

Kills: producers are SIGKILLed when they have reported K committed rows (progress, never a
timer) and restarted at once. Idempotence: a producer reports each row after its put
returned; the restarted one puts every row of its share that was not reported -- rows its
predecessor committed without reporting them are put again under the same key, which
overwrites the same row (a commit does not make a consumed row consumable again). Rows
are cleared only once reported, so a key that is put again still exists. Stream end: when
every producer has reported all its rows this process seals the partition; a consumer ends
when ``get_meta`` returns an empty batch (sealed, and every row consumed by its task).

``python -m transferqueue bench stress [--quick]``; ``TQ_STRESS_GIB`` overrides the volume.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from multiprocessing.connection import wait as wait_conns
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _stress_workers as workers
from _common import GB, MiB, print_grid, setup_path

PARTITION = "stress"
TASKS = ("actor", "critic")
ROW_BYTES = MiB
CONSUMER_CLIENTS = 4
CONSUMER_BATCH = 8
#: no message from any process for this long: the run has stalled (a restart takes ~10 s)
STALL_S = 120.0
#: the whole run (after start-up) may take at most this long
LIMIT_S = float(os.environ.get("TQ_STRESS_LIMIT_S", "1500"))


class Plan:
    """The sizes of a run. ``kills``: (producer, fraction of its share committed) at which
    it is SIGKILLed and restarted; a producer named twice is killed again after its restart.
    (A plain class: ``bench`` loads this module without registering it, which dataclasses
    need.)"""

    def __init__(
        self,
        gib: float,
        producers: int,
        clients: int,
        capacity_bytes: int,
        kills: list[tuple[int, float]],
    ) -> None:
        self.gib, self.producers, self.clients = gib, producers, clients
        self.capacity_bytes, self.kills = capacity_bytes, kills

    @property
    def rows(self) -> int:
        return int(self.gib * (1 << 30)) // ROW_BYTES

    def share_size(self, p: int) -> int:
        """How many rows producer ``p`` puts: rows are dealt round the producers."""
        return self.rows // self.producers + (1 if p < self.rows % self.producers else 0)

    def share(self, p: int) -> list[int]:
        """The seqs of producer ``p``."""
        return list(range(self.share_size(p)))


def plan_for(quick: bool) -> Plan:
    if quick:
        plan = Plan(1.0, 4, 64, 256 * MiB, [(1, 0.3), (2, 0.6)])
    else:
        plan = Plan(10.0, 8, 32, 2 << 30, [(1, 0.25), (3, 0.5), (5, 0.75), (3, 0.9)])
    raw = os.environ.get("TQ_STRESS_GIB")
    if raw is not None:
        plan.gib = float(raw)
    return plan


class Proc:
    """A worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, target: Any, args: tuple[Any, ...], label: str) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=target, args=(child, *args), name=label, daemon=True)
        self.proc.start()
        child.close()
        self.label = label
        self.started = time.perf_counter()
        self.ready = False
        self.open = True
        self.killed = False

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(30)


def _config(plan: Plan) -> dict[str, Any]:
    from transferqueue.config import ControllerConfig

    cfg: dict[str, Any] = {
        "transport": "zmq",
        "storage": {"units": 2, "capacity_bytes": plan.capacity_bytes, "block_when_full": True},
    }
    if "put_lease_s" in {f.name for f in dataclasses.fields(ControllerConfig)}:
        cfg["controller"] = {"put_lease_s": 2.0}
    return cfg


class Run:
    """The parent's bookkeeping: who committed what, who received what, what to clear."""

    def __init__(self, plan: Plan, config: Any, client: Any) -> None:
        self.plan, self.config, self.client = plan, config, client
        self.ctx = mp.get_context("spawn")
        self.committed: list[set[int]] = [set() for _ in range(plan.producers)]
        self.received: dict[str, Counter[tuple[int, int]]] = {t: Counter() for t in TASKS}
        self.bad: list[tuple[str, int, int, str]] = []
        #: rows get_meta handed out whose bytes get_data could not find: (task, row, why)
        self.unreadable: list[tuple[str, int, str]] = []
        self.unknown: Counter[str] = Counter()
        self.to_clear: list[str] = []
        self.cleared = 0
        self.producer: dict[int, Proc] = {}
        self.consumer: dict[str, Proc] = {}
        self.done: dict[int, dict[str, Any]] = {}
        self.ended: dict[str, dict[str, Any]] = {}
        self.killed: list[dict[str, Any]] = []
        self.hwm: dict[str, int | None] = {}
        self.fatal: list[str] = []
        self.kills = list(plan.kills)
        self.incarnation: Counter[int] = Counter()
        self.sealed = False
        self.last_progress = time.perf_counter()
        self.t_go: float | None = None
        self.actors: dict[str, int] = {}  # name -> pid of the controller and the units
        #: (p, seq) -> (the producer process that reported it, kv_put attempts it took)
        self.how: dict[tuple[int, int], tuple[str, int]] = {}

    # ---------------------------------------------------------------- processes
    def start_producer(self, p: int) -> None:
        share = self.plan.share(p)
        todo = [s for s in share if s not in self.committed[p]]
        self.incarnation[p] += 1
        label = f"producer {p}" + (f" #{self.incarnation[p]}" if self.incarnation[p] > 1 else "")
        args = (self.config, p, todo, self.plan.clients, ROW_BYTES, PARTITION)
        self.producer[p] = Proc(self.ctx, workers.producer_main, args, label)

    def start(self) -> None:
        for task in TASKS:
            args = (self.config, task, PARTITION, CONSUMER_CLIENTS, CONSUMER_BATCH)
            self.consumer[task] = Proc(self.ctx, workers.consumer_main, args, f"consumer {task}")
        for p in range(self.plan.producers):
            self.start_producer(p)

    def procs(self) -> list[tuple[Any, Proc]]:
        return [(("p", p), x) for p, x in self.producer.items()] + [
            (("t", t), x) for t, x in self.consumer.items()
        ]

    def wait_ready(self) -> None:
        """Until every process attached (start-up is not counted in the wall time)."""
        deadline = time.perf_counter() + 300
        while not all(x.ready for _, x in self.procs()):
            if time.perf_counter() > deadline:
                raise RuntimeError("stress: worker processes did not start within 300 s")
            self.pump(1.0, go=False)
        self.t_go = time.perf_counter()
        for _, x in self.procs():
            x.conn.send("go")

    # ---------------------------------------------------------------- messages
    def pump(self, timeout: float, go: bool = True) -> None:
        conns = {x.conn: (who, x) for who, x in self.procs() if x.open}
        for conn in wait_conns(list(conns), timeout):
            who, x = conns[conn]  # type: ignore[index]
            self.drain(who, x, go)

    def drain(self, who: tuple[str, Any], x: Proc, go: bool) -> None:
        try:
            while x.conn.poll():
                self.handle(who, x, x.conn.recv(), go)
        except (EOFError, OSError):
            x.open = False
            if who[0] == "t" and who[1] not in self.ended:
                self.fatal.append(f"{x.label} exited before the stream ended")
            if who[0] == "p" and who[1] not in self.done and not x.killed:
                self.fatal.append(f"{x.label} exited before putting all its rows")

    def handle(self, who: tuple[str, Any], x: Proc, msg: tuple[Any, ...], go: bool) -> None:
        self.last_progress = time.perf_counter()
        kind = msg[0]
        if kind == "c":
            p, seq = who[1], msg[1]
            if seq in self.committed[p]:
                self.unknown["reported committed twice"] += 1
                return
            self.committed[p].add(seq)
            self.how[(p, seq)] = (x.label, msg[2])
            key = (p, seq)
            if all(self.received[t][key] for t in TASKS):
                self.to_clear.append(f"{p}-{seq}")
        elif kind == "got":
            task = who[1]
            for p, seq in msg[1]:
                key = (p, seq)
                if not (0 <= p < self.plan.producers) or not 0 <= seq < self.plan.share_size(p):
                    self.unknown[task] += 1
                    continue
                self.received[task][key] += 1
                others = all(self.received[t][key] for t in TASKS if t != task)
                if self.received[task][key] == 1 and others and seq in self.committed[p]:
                    self.to_clear.append(f"{p}-{seq}")
            self.bad += [(task, *b) for b in msg[2]]
            self.unreadable += [(task, *u) for u in msg[3]]
        elif kind == "ready":
            x.ready = True
            if go:  # a restarted producer starts at once
                x.conn.send("go")
        elif kind == "done":
            self.done[who[1]] = msg[1]
            self.hwm[x.label] = msg[1].get("hwm_kib")
        elif kind == "end":
            self.ended[who[1]] = msg[1]
            self.hwm[x.label] = msg[1].get("hwm_kib")
        elif kind == "fatal":
            self.fatal.append(msg[1])

    # ---------------------------------------------------------------- the loop
    def maybe_kill(self) -> None:
        for i, (p, frac) in enumerate(self.kills):
            share = self.plan.share_size(p)
            x = self.producer[p]
            done = len(self.committed[p])
            if done < frac * share or done >= share or not x.ready or p in self.done:
                continue
            if any(q == p for q, _ in self.kills[:i]):
                continue  # its earlier kill comes first
            self.hwm[x.label] = workers.vm_kib(x.proc.pid, "VmHWM")
            before = len(self.committed[p])
            x.killed = True
            x.kill()
            self.drain(("p", p), x, True)  # reports written before the kill still count
            x.open = False
            self.killed.append(
                {
                    "producer": x.label,
                    "at_committed": before,
                    "reported_after_kill": len(self.committed[p]) - before,
                    "share": share,
                }
            )
            print(
                f"  SIGKILL {x.label} after it reported {before}/{share} rows committed; "
                "restarting it",
                flush=True,
            )
            del self.kills[i]
            self.start_producer(p)
            return

    def flush_clears(self) -> None:
        while self.to_clear:
            batch, self.to_clear = self.to_clear[:256], self.to_clear[256:]
            self.client.kv_clear(batch, PARTITION)
            self.cleared += len(batch)

    def loop(self) -> None:
        total = self.plan.rows
        next_print = time.perf_counter() + 10
        assert self.t_go is not None
        while len(self.ended) < len(TASKS):
            self.pump(0.2)
            self.maybe_kill()
            self.flush_clears()
            if self.fatal:
                raise RuntimeError("stress: " + "; ".join(self.fatal) + f"; {self.describe()}")
            if not self.sealed and len(self.done) == self.plan.producers:
                missing = sum(
                    self.plan.share_size(p) - len(c) for p, c in enumerate(self.committed)
                )
                if missing:
                    raise RuntimeError(f"stress: producers done but {missing} rows unreported")
                self.client.seal(PARTITION)
                self.sealed = True
                print(f"  all {total} rows committed; partition sealed", flush=True)
            now = time.perf_counter()
            if now > next_print:
                next_print = now + 10
                put = sum(len(c) for c in self.committed)
                got = {t: sum(1 for _ in self.received[t]) for t in TASKS}
                print(
                    f"  {now - self.t_go:6.0f} s  committed {put}/{total}  "
                    + "  ".join(f"{t} {got[t]}" for t in TASKS)
                    + f"  cleared {self.cleared}",
                    flush=True,
                )
            if now - self.last_progress > STALL_S:
                raise RuntimeError(
                    f"stress: no progress for {STALL_S:.0f} s (a hang): {self.describe()}"
                )
            if now - self.t_go > LIMIT_S:
                raise RuntimeError(f"stress: over {LIMIT_S:.0f} s: {self.describe()}")

    def describe(self) -> str:
        shares = [self.plan.share_size(p) for p in range(self.plan.producers)]
        put = [f"{len(c)}/{n}" for c, n in zip(self.committed, shares)]
        got = {t: len(self.received[t]) for t in TASKS}
        try:
            info = self.client.partition_info(PARTITION)
        except Exception as exc:  # a dead controller is itself the finding
            info = f"partition_info failed: {exc!r}"
        alive = {name: os.path.exists(f"/proc/{pid}") for name, pid in self.actors.items()}
        return (
            f"actor processes alive {alive}; "
            f"committed per producer {put}; received per task {got}; cleared {self.cleared}; "
            f"sealed {self.sealed}; producers done {sorted(self.done)}; partition {info}"
        )

    def stop_all(self) -> None:
        for _, x in self.procs():
            x.kill()
            x.conn.close()


def run(quick: bool = False) -> dict[str, Any]:
    import transferqueue as tq
    import transferqueue.system as tq_system
    from transferqueue.runtime.loop import runtime_loop

    setup_path()
    threads = os.environ.get("TQ_STRESS_TORCH_THREADS")
    if threads:  # every process of the run inherits it: the actors and the workers
        os.environ["OMP_NUM_THREADS"] = threads
    plan = plan_for(quick)
    cfg = _config(plan)
    lease = cfg.get("controller", {}).get("put_lease_s")
    config = tq.init(cfg)
    system = tq_system.current()
    actors = {"controller": system.handles[0].pid}  # type: ignore[attr-defined]
    for i, h in enumerate(system.handles[1:]):
        actors[f"unit {i}"] = h.pid  # type: ignore[attr-defined]
    client = tq.get_client()
    client.create_partition(PARTITION)
    clients = plan.producers * plan.clients + len(TASKS) * CONSUMER_CLIENTS
    print(
        f"stress: {plan.rows} rows of {ROW_BYTES // MiB} MiB ({plan.gib:g} GiB), {plan.producers} "
        f"producer processes x {plan.clients} async clients + {len(TASKS)} consumer tasks x "
        f"{CONSUMER_CLIENTS}; capacity {plan.capacity_bytes / (1 << 30):g} GiB, block_when_full; "
        f"put_lease_s {lease if lease is not None else 'not in this version (left out)'}; "
        f"kills at {plan.kills}",
        flush=True,
    )
    r = Run(plan, config, client)
    r.actors = actors
    t_spawn = time.perf_counter()
    try:
        r.start()
        r.wait_ready()
        assert r.t_go is not None
        print(f"  {clients} clients attached in {r.t_go - t_spawn:.0f} s; go", flush=True)
        r.loop()
        wall = time.perf_counter() - r.t_go
        r.flush_clears()
        for name, pid in actors.items():
            r.hwm[name] = workers.vm_kib(pid, "VmHWM")
        r.hwm["parent (clears, seals)"] = workers.vm_kib(os.getpid(), "VmHWM")
        left = client.kv_list(PARTITION).get(PARTITION, {})
        unit_bytes = [runtime_loop().run(h.ref.call("stats"))["nbytes"] for h in system.handles[1:]]
        for _, x in r.procs():
            x.proc.join(30)
    finally:
        r.stop_all()
        tq.close()
    return report(r, plan, wall, clients, lease, left, unit_bytes)


def report(
    r: Run,
    plan: Plan,
    wall: float,
    clients: int,
    lease: float | None,
    left: dict[str, Any],
    unit_bytes: list[int],
) -> dict[str, Any]:
    universe = [(p, s) for p in range(plan.producers) for s in plan.share(p)]
    lost = {t: sum(1 for k in universe if r.received[t][k] == 0) for t in TASKS}
    dup = {t: sum(max(0, c - 1) for c in r.received[t].values()) for t in TASKS}
    nbytes = plan.rows * ROW_BYTES
    errors: Counter[str] = Counter()
    put_calls = 0
    for stats in r.done.values():
        errors.update(stats.get("errors", {}))
        put_calls += stats.get("put_calls", 0)
    rows_out: list[list[str] | str] = []

    def add(name: str, value: str, target: str = "", met: bool | None = None) -> None:
        rows_out.append([name, value, target, {True: "met", False: "NOT MET", None: ""}[met]])

    add("clients", str(clients), ">= 256", clients >= 256)
    add("GiB put (unique rows)", f"{nbytes / (1 << 30):.2f}", f">= {plan.gib:g}", True)
    add("rows", str(plan.rows))
    for t in TASKS:
        add(f"lost, task {t}", str(lost[t]), "0", lost[t] == 0)
        add(f"duplicated, task {t}", str(dup[t]), "0", dup[t] == 0)
    add("rows failing crc32 / identity", str(len(r.bad)), "0", not r.bad)
    for t in TASKS:
        n = sum(1 for u in r.unreadable if u[0] == t)
        add(f"rows handed out but unreadable, task {t}", str(n), "0", n == 0)
    add("rows of unknown (producer, seq)", str(sum(r.unknown.values())), "0", not r.unknown)
    add("SIGKILLed producers (restarted)", str(len(r.killed)))
    add("put calls of producers that finished", str(put_calls))
    add("keys left after the last clear", str(len(left)), "0", not left)
    add("bytes left in the units", str(sum(unit_bytes)), "0", sum(unit_bytes) == 0)
    add("wall time (after start-up)", f"{wall:.1f} s", "full run <= ~600 s")
    add("throughput put", f"{nbytes / wall / GB:.3f} GB/s")
    add("throughput read (2 tasks)", f"{2 * nbytes / wall / GB:.3f} GB/s")
    for k in r.killed:
        rows_out.append(
            f"killed {k['producer']} at {k['at_committed']}/{k['share']} rows reported "
            f"({k['reported_after_kill']} more reports read after the kill)"
        )
    if errors:
        rows_out.append(f"put errors retried (by type): {dict(errors)}")
    for task, stats in r.ended.items():
        rows_out.append(f"consumer {task}: {stats.get('counts')}")
    for b in r.bad[:10]:
        rows_out.append(f"BAD ROW task {b[0]} producer {b[1]} seq {b[2]}: {b[3]}")
    for t in TASKS:
        missing = [k for k in universe if r.received[t][k] == 0]
        for p, seq in missing[:8]:
            label, tries = r.how.get((p, seq), ("?", 0))
            rows_out.append(
                f"LOST for {t}: key {p}-{seq}, reported committed by {label} after {tries} "
                f"kv_put attempt(s)"
            )
    for u in r.unreadable[:5]:
        rows_out.append(f"UNREADABLE task {u[0]} row {u[1]}: {u[2]}")
    if any(lost.values()) or any(dup.values()) or r.bad or r.unreadable:
        rows_out.append("DATA WAS LOST, DUPLICATED OR CORRUPTED: see the rows above")
    threads = os.environ.get("OMP_NUM_THREADS")
    print_grid(
        f"stress (issue 9): {plan.producers} producer processes x {plan.clients} async clients, "
        f"2 consumer tasks x {CONSUMER_CLIENTS} (batches of {CONSUMER_BATCH}), rows of "
        f"{ROW_BYTES // MiB} MiB, capacity {plan.capacity_bytes / (1 << 30):g} GiB "
        f"(block_when_full), put_lease_s {lease if lease is not None else '(not in config)'}"
        + (f", OMP_NUM_THREADS={threads}" if threads else ""),
        ["figure", "value", "target", "met"],
        rows_out,
        right={1},
    )
    hwm = {k: (None if v is None else v / 1024) for k, v in r.hwm.items()}
    print_grid(
        "stress: peak RSS (VmHWM) per process, MiB (a killed producer: read just before the kill)",
        ["process", "VmHWM MiB"],
        [[k, "-" if v is None else f"{v:.0f}"] for k, v in hwm.items()],
        right={1},
    )
    return {
        "clients": clients,
        "gib": nbytes / (1 << 30),
        "rows": plan.rows,
        "lost": lost,
        "duplicated": dup,
        "bad_rows": len(r.bad),
        "unreadable_rows": {t: sum(1 for u in r.unreadable if u[0] == t) for t in TASKS},
        "unknown_rows": dict(r.unknown),
        "killed": r.killed,
        "put_calls": put_calls,
        "put_errors": dict(errors),
        "keys_left": len(left),
        "unit_bytes_left": unit_bytes,
        "wall_s": wall,
        "put_GBps": nbytes / wall / GB,
        "read_GBps": 2 * nbytes / wall / GB,
        "peak_rss_mib": hwm,
        "put_lease_s": lease,
        "capacity_bytes": plan.capacity_bytes,
    }


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
