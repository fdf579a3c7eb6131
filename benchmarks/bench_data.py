"""The data plane (issue 4): put / get / round-trip throughput of real batches.

Workloads (GB = 1e9 bytes; the byte count is the payload: tensor bytes + UTF-8 string bytes):

* dense: 5 fields of shape (B=1024, L) -- 3 int64, 2 float32 -- of 16, 128, 512 MiB in all
  (``--quick``: 16, 128);
* complex, 128 MiB: ``responses`` jagged int64 (B=2048 rows of random length, mean L),
  ``prompts`` a list of B strings (~200 characters), ``reward`` a (B,) float32.

Per transport (default config: 2 storage units):

* zmq: a zmq system (controller and 2 units in processes of their own; started once per
  run and shared by the benchmarks, see ``_common.zmq_config``); this process is the
  producer, the consumer is a spawned process that attaches with the system's config. put = ``client.put`` returning in the
  producer; get = ``get_meta(wait=True)`` + ``get_data`` in the consumer; round trip =
  bytes in and out / (put + get) = 2 x payload / (put + get), the convention of the
  transport benchmark's echo (a payload carried to the actor and back); the JSON also has
  ``roundtrip_once_GBps`` = payload / (put + get). Medians over the repeats, after one
  warm-up.
* inproc: producer and consumer are this one process (inproc cannot span processes);
* ray (full run only, 128 MiB workloads, 2 repeats): as zmq, on a Ray cluster started here
  with ``num_cpus=2`` (the consumer process joins it by address) and shut down after.

Machine limits measured in the same run: a bare pyzmq DEALER -> ROUTER one-way transfer
of the same frames (``codec.encode`` of the batch) to another process, answered by an
empty frame; a single-thread ``copy_`` into pre-touched memory and into fresh pages (page
faults: what any write into new buffers pays); the storage unit's ``Store`` alone
(no actor, no codec) writing a new partition and reading it back shuffled; and the all-core
``copy_`` rate into pre-touched memory: the bound on an inproc round trip, which copies the
batch twice (into the store on put, out of it on get).

Back-to-back puts (zmq, issue 12 item 5): 24 puts of dense 16/64/128 MiB in a row (each
partition cleared after its put), each followed by a bare pyzmq send of the same frames;
p50, p99 and p99 / p50 of both (target: the put's p99 / p50 <= 1.5).

``--curve`` (``python -m transferqueue bench data --transport zmq --curve``) measures the
cost of CURVE instead: two zmq systems (controller + 2 units each) started in the same
run, one plain and one with CURVE keys (``zmq.curve``), each with its consumer process;
the dense 128 MiB put and get as above (5 repeats, 3 with ``--quick``; the systems take
turns, one repeat each) and the empty call (``await ref.call("noop")`` to an echo actor of
each kind, p50 and p99, in alternating blocks of 100). Ratios: CURVE / plain (a rate
below 1 and a time above 1 is CURVE's cost).

Also runnable alone: ``python benchmarks/bench_data.py [--quick] [--curve]``.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import BareZmq, MiB, Table, fmt, p50, pct, print_grid, rate, setup_path, zmq_config
from tensordict import TensorDict

import transferqueue as tq
from transferqueue.runtime import codec

DTYPES = [torch.int64, torch.int64, torch.int64, torch.float32, torch.float32]
#: the public TransferQueue 0.1.11 on this machine (single storage unit), quoted in issue 4
BOUND = "memcpy all cores, pre-touched, 128 MiB (bound on an inproc round trip: 2 copies)"
PUBLIC = {("dense 128 MiB", "zmq"): (1.5, 0.6), ("complex 128 MiB", "zmq"): (0.45, 0.45)}


# ----------------------------------------------------------------- workloads
def dense(mib: int) -> tuple[Any, int, int]:
    """(batch, payload bytes, rows)."""
    b = 1024
    per_l = sum(torch.empty(0, dtype=d).element_size() for d in DTYPES)
    length = (mib * MiB) // (b * per_l)
    td = TensorDict(
        {f"f{i}": torch.ones(b, length, dtype=d) for i, d in enumerate(DTYPES)}, batch_size=[b]
    )
    return td, sum(t.nbytes for t in td.values()), b


def complex_batch(mib: int, b: int = 2048) -> tuple[Any, int, int]:
    gen = torch.Generator().manual_seed(0)
    prompts = [f"prompt {i}: " + "lorem ipsum " * 16 for i in range(b)]
    text_bytes = sum(len(p.encode()) for p in prompts)
    mean = max(1, (mib * MiB - text_bytes - 4 * b) // (8 * b))
    lengths = torch.randint(mean // 2, mean * 3 // 2 + 1, (b,), generator=gen)
    offsets = torch.zeros(b + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    values = torch.ones(int(offsets[-1]), dtype=torch.int64)
    responses = torch.nested.nested_tensor_from_jagged(values, offsets)
    reward = torch.rand(b, generator=gen)
    batch = {"responses": responses, "prompts": prompts, "reward": reward}
    return batch, values.nbytes + reward.nbytes + text_bytes, b


def workloads(quick: bool) -> list[tuple[str, Any, int, int, int]]:
    """(name, batch, payload bytes, rows, repeats)."""
    out = []
    # a shared VM stalls now and then: medians of 5 for the workloads that have targets
    for mib, reps in ((16, 5), (128, 5), (512, 2)):
        if quick and mib > 128:
            continue
        batch, nbytes, rows = dense(mib)
        out.append((f"dense {mib} MiB", batch, nbytes, rows, 3 if quick else reps))
    batch, nbytes, rows = complex_batch(128)
    out.append(("complex 128 MiB", batch, nbytes, rows, 3 if quick else 5))
    return out


def _fields(batch: Any) -> list[str]:
    return list(batch.keys())


# ----------------------------------------------------------------- machine limits
def memcpy_gbps(nbytes: int, repeat: int, fresh: bool, threads: int = 1) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            if fresh:
                torch.empty_like(src).copy_(src)
            else:
                dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return rate(nbytes, p50(times[1:]))
    finally:
        torch.set_num_threads(before)


def store_gbps(batch: Any, nbytes: int, rows: int, repeat: int) -> tuple[float, float]:
    """The Store alone: write into a new partition, read all rows back shuffled."""
    from transferqueue.storage.store import Store

    store = Store()
    cols = dict(batch.items())
    idx = list(range(rows))
    shuffled = torch.randperm(rows).tolist()
    w, r = [], []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        store.write("p", idx, cols)
        t1 = time.perf_counter()
        out = store.read("p", shuffled, list(cols))
        t2 = time.perf_counter()
        del out
        store.clear_partition("p")
        w.append(t1 - t0)
        r.append(t2 - t1)
    return rate(nbytes, p50(w[1:])), rate(nbytes, p50(r[1:]))


# ----------------------------------------------------------------- transports
def _measure(
    client: Any, get: Any, bare: BareZmq | None, tag: str, work: list[tuple[Any, ...]]
) -> dict[str, dict[str, float]]:
    """Per workload: median put / get / bare seconds (first repeat is a warm-up)."""
    out = {}
    for name, batch, nbytes, rows, reps in work:
        frames = codec.encode(dict(batch.items())) if bare is not None else None
        puts, gets, bares = [], [], []
        for i in range(reps + 1):
            pid = f"{tag}-{name}-{i}"
            t0 = time.perf_counter()
            client.put(batch, partition_id=pid)
            t_put = time.perf_counter() - t0
            t_get, got = get(pid, _fields(batch), rows)
            if got != rows:
                raise RuntimeError(f"{name}: the consumer got {got} rows, expected {rows}")
            client.clear_partition(pid)
            t_bare = bare.roundtrip(frames) if bare is not None else 0.0
            if i:
                puts.append(t_put)
                gets.append(t_get)
                bares.append(t_bare)
        put, get_s = p50(puts), p50(gets)
        out[name] = {
            "put_GBps": rate(nbytes, put),
            "get_GBps": rate(nbytes, get_s),
            "roundtrip_GBps": rate(2 * nbytes, put + get_s),
            "roundtrip_once_GBps": rate(nbytes, put + get_s),
        }
        if bare is not None:
            out[name]["bare_pyzmq_GBps"] = rate(nbytes, p50(bares))
    return out


def run_remote(transport: str, work: list[tuple[Any, ...]]) -> dict[str, dict[str, float]]:
    """zmq or ray: producer here, consumer in a spawned process attached to the system."""
    from _actors import data_consumer

    ray_address = None
    if transport == "ray":
        import ray

        setup_path()  # PYTHONPATH for the Ray workers
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_address = ray.get_runtime_context().gcs_address
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = None
    bare = None
    try:
        cfg = tq.init(zmq_config() if transport == "zmq" else {"transport": transport})
        proc = ctx.Process(target=data_consumer, args=(child_conn, cfg, ray_address), daemon=True)
        proc.start()
        if not conn.poll(180) or conn.recv() != "ready":
            raise RuntimeError("the consumer process did not attach")
        bare = BareZmq("ack") if transport == "zmq" else None

        def get(pid: str, fields: list[str], rows: int) -> tuple[float, int]:
            conn.send(("get", pid, fields, rows))
            t_meta, t_data, got = conn.recv()
            return t_meta + t_data, got

        return _measure(tq.get_client(), get, bare, transport, work)
    finally:
        if bare is not None:
            bare.close()
        if proc is not None:
            if proc.is_alive():
                conn.send(("stop",))
                proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        tq.close()
        if ray_address is not None:
            import ray

            ray.shutdown()


def run_inproc(work: list[tuple[Any, ...]]) -> dict[str, dict[str, float]]:
    tq.init()
    client = tq.get_client()

    def get(pid: str, fields: list[str], rows: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        td = client.get_data(client.get_meta(fields, rows, pid, "bench", wait=True, timeout=120))
        return time.perf_counter() - t0, td.batch_size[0]

    try:
        return _measure(client, get, None, "inproc", work)
    finally:
        tq.close()


# ----------------------------------------------------------------- the table
# ----------------------------------------------------------------- the cost of CURVE
def _start_consumer(config: Any) -> tuple[Any, Any]:
    from _actors import data_consumer

    conn, child_conn = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=data_consumer, args=(child_conn, config), daemon=True
    )
    proc.start()
    if not conn.poll(180) or conn.recv() != "ready":
        raise RuntimeError("the consumer process did not attach")
    return proc, conn


def _stop_consumer(proc: Any, conn: Any) -> None:
    if proc.is_alive():
        conn.send(("stop",))
        proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _empty_call_times(ref: Any, n: int) -> list[float]:
    from transferqueue.runtime.loop import runtime_loop

    async def calls() -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await ref.call("noop")
            times.append(time.perf_counter() - t0)
        return times

    return runtime_loop().run(calls())


def run_curve(quick: bool) -> dict[str, Any]:
    """put / get of dense 128 MiB and the empty call, without and with CURVE."""
    import tempfile

    from _actors import Echo
    from _common import pct

    from transferqueue.config import load_config
    from transferqueue.runtime.loop import runtime_loop
    from transferqueue.runtime.transports.zmq import ZmqTransport
    from transferqueue.runtime.transports.zmq_auth import write_key_pair
    from transferqueue.system import start_system

    reps = 3 if quick else 5
    n_calls = 1000 if quick else 3000
    _, batch, nbytes, rows, _ = next(w for w in workloads(True) if w[0] == "dense 128 MiB")
    fields = _fields(batch)
    modes = ("plain", "curve")
    out: dict[str, Any] = {m: {} for m in modes}
    with tempfile.TemporaryDirectory() as keys:
        _, secret = write_key_pair(keys, "server")
        configs = {
            "plain": load_config({"transport": "zmq"}),
            "curve": load_config(
                {"transport": "zmq", "zmq": {"curve": {"server_key_file": str(secret)}}}
            ),
        }
        loop = runtime_loop()
        systems: dict[str, Any] = {}
        consumers: dict[str, Any] = {}
        echoes: dict[str, Any] = {}
        try:
            for m in modes:
                systems[m] = loop.run(start_system(configs[m]))
                consumers[m] = _start_consumer(systems[m].config)
                echoes[m] = loop.run(ZmqTransport(configs[m]).spawn(Echo))
            puts: dict[str, list[float]] = {m: [] for m in modes}
            gets: dict[str, list[float]] = {m: [] for m in modes}
            for i in range(reps + 1):  # turns: machine noise hits both alike; 0 = warm-up
                for m in modes:
                    client, (_, conn) = systems[m].client, consumers[m]
                    pid = f"curve-{m}-{i}"
                    t0 = time.perf_counter()
                    client.put(batch, partition_id=pid)
                    t_put = time.perf_counter() - t0
                    conn.send(("get", pid, fields, rows))
                    t_meta, t_data, got = conn.recv()
                    if got != rows:
                        raise RuntimeError(f"{m}: the consumer got {got} rows, expected {rows}")
                    client.clear_partition(pid)
                    if i:
                        puts[m].append(t_put)
                        gets[m].append(t_meta + t_data)
            empty: dict[str, list[float]] = {m: [] for m in modes}
            for m in modes:
                _empty_call_times(echoes[m].ref, 200)  # warm-up
            for _ in range(n_calls // 100):
                for m in modes:
                    empty[m] += _empty_call_times(echoes[m].ref, 100)
            for m in modes:
                out[m] = {
                    "put_GBps": rate(nbytes, p50(puts[m])),
                    "get_GBps": rate(nbytes, p50(gets[m])),
                    "empty_call_p50_ms": p50(empty[m]) * 1e3,
                    "empty_call_p99_ms": pct(empty[m], 99) * 1e3,
                }
        finally:
            for m in modes:
                if m in echoes:
                    loop.run(echoes[m].stop())
                if m in consumers:
                    _stop_consumer(*consumers[m])
                if m in systems:
                    loop.run(systems[m].aclose())
    if all(out[m] for m in modes):
        lines: list[list[str] | str] = []
        for key, label, unit in (
            ("put_GBps", "dense 128 MiB put", "GB/s"),
            ("get_GBps", "dense 128 MiB get (another process)", "GB/s"),
            ("empty_call_p50_ms", "empty call p50 (on the loop)", "ms"),
            ("empty_call_p99_ms", "empty call p99 (on the loop)", "ms"),
        ):
            plain, cost = out["plain"][key], out["curve"][key]
            lines.append([label, fmt(cost, unit), fmt(plain, unit), f"{cost / plain:.2f}x"])
            out.setdefault("ratio", {})[key] = cost / plain
        print_grid(
            "zmq with CURVE (zmq.curve) vs without, same run: medians; ratio = CURVE / plain",
            ["figure", "CURVE", "plain (same run)", "ratio"],
            lines,
            right={1, 2, 3},
        )
    return out


def run(quick: bool = False, transport: str | None = None, curve: bool = False) -> dict[str, Any]:
    """The data-plane table; ``transport`` limits it to one transport (machine limits are
    measured with inproc); ``curve`` measures the cost of CURVE on zmq instead."""
    if curve:
        if transport not in (None, "zmq"):
            raise SystemExit("bench data --curve measures the zmq transport: --transport zmq")
        return {"curve": run_curve(quick)}
    work = workloads(quick)
    figures: dict[str, Any] = {"zmq": {}, "inproc": {}, "ray": {}, "limits": {}}
    lines: list[list[str] | str] = []
    wanted = (transport,) if transport else ("zmq", "inproc", "ray")
    try:
        if "zmq" in wanted:
            figures["zmq"] = run_remote("zmq", work)
            figures["zmq_back_to_back"] = back_to_back()
        if "inproc" in wanted:
            figures["inproc"] = run_inproc(work)
        if not quick and "ray" in wanted:  # the 128 MiB workloads only (start-up: ~30 s)
            try:
                import ray  # noqa: F401
            except ImportError:
                lines.append("ray: not installed, skipped")
            else:
                big = [w for w in work if "128 MiB" in w[0]]
                figures["ray"] = run_remote("ray", [(*w[:4], 2) for w in big])
        limits = figures["limits"]
        for name, _, nbytes, *_ in work:
            limits[f"memcpy pre-touched, {name}"] = memcpy_gbps(nbytes, 3, fresh=False)
        _, batch, nbytes, rows, _ = next(w for w in work if w[0] == "dense 128 MiB")
        limits["memcpy into fresh pages, 128 MiB"] = memcpy_gbps(nbytes, 3, fresh=True)
        # inproc put copies the batch into the store once, get copies it out once
        limits[BOUND] = memcpy_gbps(nbytes, 3, fresh=False, threads=torch.get_num_threads())
        write, read = store_gbps(batch, nbytes, rows, 2 if quick else 3)
        limits["Store alone: write new partition, 128 MiB"] = write
        limits["Store alone: read shuffled, 128 MiB"] = read
    finally:
        for name, *_ in work:
            for transport in ("zmq", "inproc", "ray"):
                f = figures[transport].get(name)
                if f is None:
                    continue
                bare = f.get("bare_pyzmq_GBps")
                memcpy = figures["limits"].get(f"memcpy pre-touched, {name}")
                target, met = _target(name, transport, f)
                pub = PUBLIC.get((name, transport))
                lines.append(
                    [
                        name,
                        transport,
                        fmt(f["put_GBps"]),
                        fmt(f["get_GBps"]),
                        fmt(f["roundtrip_GBps"]),
                        f"bare pyzmq 1-way {fmt(bare)}" if bare else "",
                        f"{f['put_GBps'] / bare:.2f}x" if bare else "",
                        f"{f['get_GBps'] / bare:.2f}x" if bare else "",
                        target,
                        {True: "met", False: "NOT MET", None: ""}[met],
                        f"put {pub[0]} / get {pub[1]}" if pub else "",
                    ]
                )
                if memcpy and transport == "inproc":
                    lines[-1][5] = f"memcpy 1 thread {fmt(memcpy)}"
                    lines[-1][6] = f"{f['put_GBps'] / memcpy:.2f}x"
                    lines[-1][7] = f"{f['get_GBps'] / memcpy:.2f}x"
                bound = figures["limits"].get(BOUND)
                if bound and target.startswith("round trip"):
                    lines[-1][8] += (
                        f" ({f['roundtrip_GBps'] / bound:.2f}x the bound; payload once: "
                        f"{fmt(f['roundtrip_once_GBps'])})"
                    )
        for label, value in figures["limits"].items():
            if not label.startswith("memcpy pre-touched"):
                lines.append(f"machine: {label}: {fmt(value, 'GB/s')}")
        print_grid(
            "data plane (issue 4): GB/s = payload bytes / seconds, medians; get = get_meta + "
            "get_data in another process (zmq); round trip = 2 x payload / (put + get)",
            [
                "workload",
                "transport",
                "put",
                "get",
                "round trip",
                "baseline (same run)",
                "put/base",
                "get/base",
                "target",
                "met",
                "public TQ 0.1.11 (from issue)",
            ],
            lines,
            right={2, 3, 4, 6, 7},
        )
    return figures


# ----------------------------------------------------- back-to-back puts (issue 12, item 5)
STALL_PUTS = 24
STALL_TARGET = 1.5


def back_to_back(puts: int = STALL_PUTS) -> dict[str, dict[str, float]]:
    """``puts`` back-to-back zmq puts of dense 16/64/128 MiB (each partition cleared after
    its put): p50 and p99 in ms, and p99 / p50. Baseline, alternating with them put by put
    so both see the same host: a bare pyzmq DEALER -> ROUTER send of the same frames
    (``codec.encode`` of the batch) to a server process that acks it."""
    tq.init(zmq_config())
    client = tq.get_client()
    bare = BareZmq("ack")
    out: dict[str, dict[str, float]] = {}
    try:
        for mib in (16, 64, 128):
            batch, _, _ = dense(mib)
            frames = codec.encode(dict(batch.items()))
            times: dict[str, list[float]] = {"put": [], "bare": []}
            for i in range(puts + 2):  # two warm-ups
                pid = f"stall-{mib}-{i}"
                t0 = time.perf_counter()
                client.put(batch, partition_id=pid)
                dt = time.perf_counter() - t0
                client.clear_partition(pid)
                t_bare = bare.roundtrip(frames)
                if i >= 2:
                    times["put"].append(dt)
                    times["bare"].append(t_bare)
            for kind, ts in times.items():
                out[f"{kind} {mib} MiB"] = {
                    "p50_ms": p50(ts) * 1e3,
                    "p99_ms": pct(ts, 99) * 1e3,
                    "ratio": pct(ts, 99) / p50(ts),
                }
    finally:
        bare.close()
        tq.close()
    table = Table(f"zmq: {puts} back-to-back puts of a dense batch (1024 rows, 5 fields, 2 units)")
    for mib in (16, 64, 128):
        put, base = out[f"put {mib} MiB"], out[f"bare {mib} MiB"]
        ok = put["ratio"] <= STALL_TARGET
        table.add(f"{mib} MiB: put p99 / p50", put["ratio"], "x", "bare pyzmq", base["ratio"],
                  f"<= {STALL_TARGET}", ok)  # fmt: skip
        table.add(f"{mib} MiB: put p50", put["p50_ms"], "ms", "bare pyzmq", base["p50_ms"])
    table.print()
    return out


def _target(name: str, transport: str, f: dict[str, float]) -> tuple[str, bool | None]:
    bare = f.get("bare_pyzmq_GBps") or 0.0
    if transport == "zmq" and name == "dense 128 MiB":
        ok = all(f[k] >= 1.5 or f[k] >= 0.8 * bare for k in ("put_GBps", "get_GBps"))
        return "put, get >= 1.5 or >= 0.8x bare", ok
    if transport == "zmq" and name.startswith("complex"):
        return "put, get >= 0.9", f["put_GBps"] >= 0.9 and f["get_GBps"] >= 0.9
    if transport == "inproc" and name == "dense 128 MiB":
        return "round trip >= 4", f["roundtrip_GBps"] >= 4
    return "", None


if __name__ == "__main__":
    run(quick="--quick" in sys.argv, curve="--curve" in sys.argv)
