"""Soak (issue 9): does a long kv put -> get -> clear loop keep every process's RSS flat?

On a zmq system of its own (controller + 2 storage units, each in a process of its own) this
process runs N cycles of ``kv_batch_put`` of 64 new keys (a small TensorDict: two fields of
256 bytes per row) -> ``kv_batch_get`` of those keys (checked against what was put: a wrong
value raises at once) -> ``kv_clear`` of those keys, all on one partition. Every 10,000
cycles (quick: 1,000) it prints the RSS (``VmRSS`` of ``/proc/<pid>/status``) of the
controller, of each unit and of this (client) process, and the cycles/s since the last
print; at the end, per process, RSS(last) / RSS(after the first 1,000 cycles), target <= 1.2.

N: 100,000 (quick: 5,000), or ``TQ_SOAK_CYCLES``. Run with
``python -m transferqueue bench soak [--quick]``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import Table, print_grid, vm_kib
from tensordict import TensorDict

#: keys per cycle
KEYS = 64
#: the RSS baseline: after this many cycles (allocator pools, caches and the like are warm)
BASELINE_CYCLES = 1_000
TARGET_RATIO = 1.2
PARTITION = "soak"


def rss_mib(pid: int) -> float:
    kib = vm_kib(pid, "VmRSS")
    return float("nan") if kib is None else kib / 1024


def _batch(cycle: int) -> tuple[list[str], TensorDict]:
    """The keys and values of one cycle; the values are derived from ``cycle``."""
    keys = [f"c{cycle}-{i}" for i in range(KEYS)]
    base = torch.arange(KEYS, dtype=torch.int64).unsqueeze(1) * 1000 + cycle
    td = TensorDict(
        {
            "ids": base + torch.arange(32, dtype=torch.int64),  # 32 x int64 = 256 B per row
            "score": (base.float() * 0.5).expand(KEYS, 64).contiguous(),  # 64 x f32 = 256 B
        },
        batch_size=[KEYS],
    )
    return keys, td


def _check(cycle: int, got: TensorDict, want: TensorDict) -> None:
    for name in ("ids", "score"):
        if name not in got.keys():
            raise AssertionError(f"soak cycle {cycle}: kv_batch_get lost field {name!r}")
        if not torch.equal(got[name], want[name]):
            bad = (got[name] != want[name]).reshape(KEYS, -1).any(1).nonzero().flatten().tolist()
            raise AssertionError(
                f"soak cycle {cycle}: kv_batch_get returned wrong {name!r} for rows {bad[:8]}"
            )


def cycles_wanted(quick: bool) -> int:
    raw = os.environ.get("TQ_SOAK_CYCLES")
    if raw is None:
        return 5_000 if quick else 100_000
    n = int(raw)
    if n < 1:
        raise SystemExit(f"TQ_SOAK_CYCLES must be >= 1; got {raw!r}")
    return n


def run(quick: bool = False) -> dict[str, Any]:
    import transferqueue as tq
    import transferqueue.system as tq_system

    cycles = cycles_wanted(quick)
    every = 1_000 if quick else 10_000
    tq.init({"transport": "zmq", "storage": {"units": 2}})
    try:
        handles = tq_system.current().handles
        procs = {"controller": handles[0].pid}  # type: ignore[attr-defined]
        for i, h in enumerate(handles[1:]):
            procs[f"unit {i}"] = h.pid  # type: ignore[attr-defined]
        procs["client"] = os.getpid()
        names = list(procs)
        print(
            f"soak: {cycles} cycles of kv_batch_put({KEYS} keys) -> kv_batch_get -> kv_clear on "
            f"one partition; pids {procs}",
            flush=True,
        )
        samples: list[dict[str, Any]] = [
            {"cycles": 0, "rate": None, **{n: rss_mib(p) for n, p in procs.items()}}
        ]
        lines: list[list[str] | str] = []

        def sample(done: int, rate: float | None) -> None:
            row = {"cycles": done, "rate": rate, **{n: rss_mib(p) for n, p in procs.items()}}
            samples.append(row)
            cells = [str(done), "-" if rate is None else f"{rate:.0f}"]
            cells += [f"{row[n]:.1f}" for n in names]
            lines.append(cells)
            print(
                f"  {done:>7} cycles  {cells[1]:>6} cycles/s  "
                + "  ".join(f"{n} {row[n]:.1f} MiB" for n in names),
                flush=True,
            )

        marks = sorted({min(BASELINE_CYCLES, cycles), *range(every, cycles + 1, every), cycles})
        t_start = t_last = time.perf_counter()
        last_done = 0
        for cycle in range(cycles):
            keys, td = _batch(cycle)
            tq.kv_batch_put(keys, PARTITION, fields=td)
            got = tq.kv_batch_get(keys, PARTITION)
            _check(cycle, got, td)
            tq.kv_clear(keys, PARTITION)
            done = cycle + 1
            if done == marks[0]:
                marks.pop(0)
                now = time.perf_counter()
                sample(done, (done - last_done) / (now - t_last))
                t_last, last_done = now, done
        wall = time.perf_counter() - t_start
        left = tq.kv_list(PARTITION).get(PARTITION, {})
        if left:
            raise AssertionError(f"soak: {len(left)} keys left after kv_clear of every key")
    finally:
        tq.close()

    base = next(s for s in samples if s["cycles"] == min(BASELINE_CYCLES, cycles))
    last = samples[-1]
    print_grid(
        f"soak (issue 9): RSS in MiB every {every} cycles, cycles/s since the previous line",
        ["cycles", "cycles/s", *[f"{n} MiB" for n in names]],
        lines,
        right=set(range(len(names) + 2)),
    )
    table = Table(
        f"soak (issue 9): RSS after {cycles} cycles / RSS after {base['cycles']} cycles "
        f"({cycles * KEYS} rows put, read back and checked, cleared; {wall:.0f} s, "
        f"{cycles / wall:.0f} cycles/s)"
    )
    ratios: dict[str, float] = {}
    for n in names:
        ratio = last[n] / base[n]
        ratios[n] = ratio
        table.add(
            f"{n} RSS",
            last[n],
            "MiB",
            base_label=f"at {base['cycles']}",
            base=base[n],
            target=f"<= {TARGET_RATIO}x",
            met=ratio <= TARGET_RATIO,
        )
    if cycles <= BASELINE_CYCLES:
        table.note(f"only {cycles} cycles: the baseline is the last sample, ratios are 1")
    table.print()
    sys.stdout.flush()
    return {
        "cycles": cycles,
        "keys_per_cycle": KEYS,
        "wall_s": wall,
        "cycles_per_s": cycles / wall,
        "baseline_cycles": base["cycles"],
        "rss_ratio": ratios,
        "target_ratio": TARGET_RATIO,
        "samples_mib": samples,
    }


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
