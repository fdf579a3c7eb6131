"""Async RL (issue 10): what staleness-bounded admission buys a simulated RL loop, and the
``get_meta`` wake-up latency with and without a ``where`` filter.

**The loop.** One partition per run, ``create_partition(pid, max_staleness=k,
global_batch_size=B)``, B = 32. Per-sample generation time is lognormal (median 40 ms,
sigma 1.0), drawn once per repeat (one seed) and the same for every k. 4 producer threads
claim sample indices in order; each ``reserve``\\ s 1 slot (waiting while the rollout would
run more than k versions ahead), sleeps that sample's generation time and fills the slot
with ``put(metadata=reserved)``. 1 trainer, 8 steps: ``get_meta(B, lease_s=30)`` +
``get_data``, a fixed step time (a sleep), ``ack``, ``advance_version``. The step time is
the median over steps of the time to generate one batch with the 4 producers: measured
first on repeat 0's samples (a k = 0 run with no step time: the trainer's wait per step)
on inproc, and reused for zmq; ``--quick`` computes it from the same samples instead (the
4 producers claiming each batch's samples in order, each as soon as it is free; no
transferqueue calls), which saves that run. One repeat per transport (the full run adds
zmq to inproc; ``--quick`` is inproc only): a repeat of the three k takes ~30 s here.

End-to-end samples/s = 8 x 32 / (the trainer's first ``get_meta`` call to its last
``advance_version``). Ratio = samples/s(k) / samples/s(k = 0). The ideal-overlap bound on
that ratio, from the k = 0 run of the same repeat: with g = its mean per-step generation
time (the trainer's wait in ``get_meta``: nothing overlaps at k = 0) and t = its mean
measured step time, N = 8 steps,

    bound = N (g + t) / (g + t + (N - 1) max(g, t))

(N serial steps against a two-stage pipeline of N batches; -> (g + t) / max(g, t) for
large N). g includes each batch's straggler tail (producers idle while the batch's last
samples finish), which k >= 1 also recovers -- producers move on to the next batch -- so
k >= 1 can beat that bound. The stricter bound replaces the pipeline's generation stage g
by w = the producers' busy time per batch (the measured generation sleeps of the k = 0 run
/ 4 producers / N): bound(w) = N (g + t) / (w + t + (N - 1) max(w, t)). The target
(k = 1 >= 0.85 of the bound) is read against the first. Mean staleness = the mean over consumed rows of (trainer version when it
consumed the row - the row's ``version`` tag).

**Wake-up latency.** A thread blocked in ``get_meta(["x"], 1, ..., wait=True)`` (seen
waiting in ``partition_info(...).waiting``); the clock starts just before the put that
makes one row ready and stops when the waiter's ``get_meta`` returns (the put call's own
time, to its return, is printed too). Without ``where``:
``kv_put`` of a new key with its field. With ``where={"status": "finished"}``: the key
was put with the field and ``status: running`` before the waiter blocked; the timed put is
a tag-only ``kv_put(tags=[{"status": "finished"}])``. Trials alternate; p50 and p99.

zmq: controller + 2 units in processes of their own (the shared system of
``_common.zmq_config()``), client and threads here. Also runnable alone:
``python benchmarks/bench_async.py [--quick]``.
"""

from __future__ import annotations

import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from _common import Table, p50, pct, zmq_config

import transferqueue as tq

B = 32
PRODUCERS = 4
STEPS = 8
MEDIAN_GEN_S = 0.040
SIGMA = 1.0
KS = (0, 1, 2)
TARGET_FRACTION = 0.85  # of the bound, for k = 1


def generation_times(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return MEDIAN_GEN_S * np.exp(SIGMA * rng.standard_normal(STEPS * B))


def bound(g: float, t: float, n: int = STEPS, w: float | None = None) -> float:
    """The ideal-overlap bound on samples/s(k >= 1) / samples/s(k = 0): n serial steps of
    g + t against a two-stage pipeline of n batches with stages of w (default g) and t."""
    w = g if w is None else w
    return n * (g + t) / (w + t + (n - 1) * max(w, t))


def scheduled_batch_times(times: np.ndarray) -> list[float]:
    """Per-batch generation times of the k = 0 schedule computed, not measured: the
    producers claim the batch's samples in order, each as soon as it is free (--quick)."""
    out = []
    for b in range(STEPS):
        free = [0.0] * PRODUCERS
        for x in times[b * B : (b + 1) * B]:
            i = free.index(min(free))
            free[i] += float(x)
        out.append(max(free))
    return out


def rl_loop(client: Any, pid: str, k: int, times: np.ndarray, step_s: float) -> dict[str, Any]:
    """One simulated RL run; returns the trainer's timings and the rows' staleness."""
    client.create_partition(pid, max_staleness=k, global_batch_size=B)
    lock = threading.Lock()
    claimed = [0]
    errors: list[BaseException] = []
    slept = [0.0] * len(times)

    def produce() -> None:
        try:
            while True:
                with lock:
                    i = claimed[0]
                    if i >= len(times):
                        return
                    claimed[0] += 1
                meta = client.reserve(pid, 1, timeout=120)
                began = time.perf_counter()
                time.sleep(float(times[i]))  # the simulated generation
                slept[i] = time.perf_counter() - began
                client.put({"x": torch.tensor([[float(i)]])}, metadata=meta)
        except BaseException as exc:
            errors.append(exc)

    producers = [threading.Thread(target=produce, daemon=True) for _ in range(PRODUCERS)]
    waits, steps, staleness = [], [], []
    version = 0
    start = time.perf_counter()
    for p in producers:
        p.start()
    try:
        for _ in range(STEPS):
            asked = time.perf_counter()
            meta = client.get_meta(["x"], B, pid, "train", lease_s=30, timeout=120)
            waits.append(time.perf_counter() - asked)
            if len(meta) != B:
                raise RuntimeError(f"k={k}: got {len(meta)} rows, wanted {B}: {errors}")
            client.get_data(meta)
            staleness += [version - int(t["version"]) for t in meta.tags]
            began = time.perf_counter()
            time.sleep(step_s)  # the simulated training step
            steps.append(time.perf_counter() - began)
            client.ack(meta)
            version = client.advance_version(pid)
        total = time.perf_counter() - start
    finally:
        for p in producers:
            p.join(120)
        client.clear_partition(pid)
    if errors:
        raise errors[0]
    work = sum(slept) / PRODUCERS / STEPS  # producer-busy seconds per batch
    return {"total_s": total, "waits": waits, "steps": steps, "staleness": staleness, "work": work}


def wake_latency(client: Any, trials: int, tag: str) -> dict[str, list[float]]:
    """Seconds from the put that makes a row ready to the blocked waiter's return."""
    pid = f"async-wake-{tag}"
    go: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def waiter() -> None:
        while (where := go.get()) is not None:
            try:
                where = where or None
                meta = client.get_meta(["x"], 1, pid, "wake", where=where, timeout=30)
                done.put((time.perf_counter(), len(meta)))
            except BaseException as exc:
                done.put((exc, 0))

    client.create_partition(pid)
    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    lat: dict[str, list[float]] = {k: [] for k in ("plain", "where", "plain_put", "where_put")}
    field = {"x": torch.zeros(1, 1)}
    try:
        for i in range(2 * trials):
            kind = "where" if i % 2 else "plain"
            key = f"k{i}"
            if kind == "where":
                client.kv_put(key, pid, field, tags=[{"status": "running"}])
            go.put({"status": "finished"} if kind == "where" else {})
            while client.partition_info(pid).waiting.get("wake", 0) < 1:
                time.sleep(0.0002)
            t0 = time.perf_counter()
            if kind == "where":
                client.kv_put(key, pid, tags=[{"status": "finished"}])  # tags only
            else:
                client.kv_put(key, pid, field)
            returned = time.perf_counter()
            t1, n = done.get(timeout=60)
            if isinstance(t1, BaseException):
                raise t1
            if n != 1:
                raise RuntimeError(f"the waiter got {n} rows")
            lat[kind].append(t1 - t0)
            lat[f"{kind}_put"].append(returned - t0)
    finally:
        go.put(None)
        thread.join(30)
        client.clear_partition(pid)
    return lat


def measure(transport: str, reps: int, trials: int, step_s: float | None) -> dict[str, Any]:
    """``step_s=None``: measure the step time first (a k = 0 run without training)."""
    tq.init(zmq_config() if transport == "zmq" else None)
    client = tq.get_client()
    try:
        runs: dict[int, list[dict[str, Any]]] = {k: [] for k in KS}
        if step_s is None:
            cal = rl_loop(client, f"async-{transport}-cal", 0, generation_times(0), 0.0)
            step_s = p50(cal["waits"])
        for rep in range(reps):
            times = generation_times(rep)
            for k in KS:
                runs[k].append(rl_loop(client, f"async-{transport}-{rep}-{k}", k, times, step_s))
        lat = wake_latency(client, trials, transport)
    finally:
        tq.close()
    out: dict[str, Any] = {"median_batch_gen_s": step_s}
    for k in KS:
        out[f"k{k}_sps"] = statistics.median(STEPS * B / r["total_s"] for r in runs[k])
        out[f"k{k}_totals_s"] = [r["total_s"] for r in runs[k]]
        out[f"k{k}_staleness_mean"] = float(np.mean([s for r in runs[k] for s in r["staleness"]]))
        out[f"k{k}_staleness_max"] = int(max(s for r in runs[k] for s in r["staleness"]))
    # per repeat: the ratio to that repeat's k = 0 and the bound from that k = 0 run
    gtw = [(float(np.mean(r["waits"])), float(np.mean(r["steps"])), r["work"]) for r in runs[0]]
    bounds = [bound(g, t) for g, t, _ in gtw]
    strict = [bound(g, t, w=w) for g, t, w in gtw]
    out["g_s"] = float(np.mean([g for g, _, _ in gtw]))
    out["t_s"] = float(np.mean([t for _, t, _ in gtw]))
    out["w_s"] = float(np.mean([w for _, _, w in gtw]))
    out["bound"] = statistics.median(bounds)
    out["bound_work"] = statistics.median(strict)
    for k in KS:
        ratios = [r0["total_s"] / r["total_s"] for r0, r in zip(runs[0], runs[k])]
        out[f"k{k}_ratios"] = ratios
        out[f"k{k}_ratio"] = statistics.median(ratios)
        out[f"k{k}_of_bound"] = statistics.median(r / b for r, b in zip(ratios, bounds))
        out[f"k{k}_of_bound_work"] = statistics.median(r / b for r, b in zip(ratios, strict))
    for kind in ("plain", "where"):
        out[f"wake_{kind}_p50_ms"] = p50(lat[kind]) * 1e3
        out[f"wake_{kind}_p99_ms"] = pct(lat[kind], 99) * 1e3
        out[f"wake_{kind}_put_p50_ms"] = p50(lat[f"{kind}_put"]) * 1e3
    return out


def run(quick: bool = False) -> dict[str, Any]:
    # (transport, repeats): zmq reuses the step time measured on inproc
    plan = [("inproc", 1)] if quick else [("inproc", 1), ("zmq", 1)]
    trials = 100 if quick else 200
    step_s = p50(scheduled_batch_times(generation_times(0))) if quick else None
    reps = max(r for _, r in plan)
    table = Table(
        f"async RL (issue 10): B={B}, {PRODUCERS} producers, {STEPS} steps, lognormal generation "
        f"(median {MEDIAN_GEN_S * 1e3:.0f} ms, sigma {SIGMA}), {reps} repeat(s) per transport"
    )
    figures: dict[str, Any] = {}
    try:
        for transport, n in plan:
            f = measure(transport, n, trials, step_s)
            how = "computed" if quick else "measured on inproc"
            step_s = f["median_batch_gen_s"]
            figures[transport] = f
            table.add(f"{transport} step = median batch generation ({how})", step_s * 1e3, "ms")
            table.add(f"{transport} k=0 per step: g (t beside)", f["g_s"] * 1e3, "ms",
                      "t", f["t_s"] * 1e3)  # fmt: skip
            table.add(f"{transport} k=0 per step: w (g beside)", f["w_s"] * 1e3, "ms",
                      "g", f["g_s"] * 1e3)  # fmt: skip
            for k in KS:
                if k == 0:
                    table.add(f"{transport} k=0 samples/s", f["k0_sps"], "")
                else:
                    met = f["k1_of_bound"] >= TARGET_FRACTION if k == 1 else None
                    table.add(
                        f"{transport} k={k} samples/s", f[f"k{k}_sps"], "", "k=0", f["k0_sps"],
                        target=f"bound {f['bound']:.2f}x; got {f[f'k{k}_of_bound']:.2f} of it"
                        + (f" (>= {TARGET_FRACTION})" if k == 1 else ""),
                        met=met,
                    )  # fmt: skip
                    table.add(
                        f"{transport} k={k} ratio vs the stricter bound", f[f"k{k}_ratio"], "x",
                        target=f"bound(w) {f['bound_work']:.2f}x; got "
                        f"{f[f'k{k}_of_bound_work']:.2f} of it",
                    )  # fmt: skip
            for k in KS:
                table.add(f"{transport} k={k} mean staleness", f[f"k{k}_staleness_mean"], "versions",
                          target=f"max {f[f'k{k}_staleness_max']} (k={k})")  # fmt: skip
            table.add(f"{transport} get_meta wake-up p50, where", f["wake_where_p50_ms"], "ms",
                      "no where", f["wake_plain_p50_ms"])  # fmt: skip
            table.add(f"{transport} get_meta wake-up p99, where", f["wake_where_p99_ms"], "ms",
                      "no where", f["wake_plain_p99_ms"])  # fmt: skip
            table.add(f"{transport} ... the put call itself p50, where", f["wake_where_put_p50_ms"],
                      "ms", "no where", f["wake_plain_put_p50_ms"])  # fmt: skip
        table.note("bound = N(g+t) / (g+t+(N-1)max(g,t)); bound(w) = N(g+t) / (w+t+(N-1)max(w,t))")
        table.note("g, t, w: per-step means of the same repeat's k=0 run (benchmarks/README.md)")
    finally:
        table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
