"""Micro-benchmarks of the controller's partition state (no actors, no I/O).

Prints:
- ``get_meta`` p50 with 8 / 4k / 64k ready rows (batch of 8; target: 64k <= 1.5x of 8);
- bytes of controller state per row for a 1M-row, 8-field, 4-task partition;
- time per single-row append (allocate + commit) at 10k and at 1M rows (target: within 2x).

Run from the repository root: ``python -m benchmarks.controller_state``
"""

from __future__ import annotations

import statistics
import time

from transferqueue.controller.state import ControllerState, FieldSpec

SPEC = FieldSpec("torch.float32", 1)
BATCH = 8


def _fill(state: ControllerState, pid: str, n: int, fields: list[str]) -> None:
    rows = state.allocate(pid, n)
    state.commit(pid, rows, dict.fromkeys(fields, SPEC))


def get_meta_p50(sizes: tuple[int, ...], calls: int = 3000) -> dict[int, float]:
    """p50 seconds of get_meta(batch 8) per ready-row count, measured interleaved so that
    machine noise hits every size alike; the ready count is kept constant."""
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
    return {ready: statistics.median(ts) for ready, ts in times.items()}


def bytes_per_row(rows: int = 1_000_000, fields: int = 8, tasks: int = 4) -> float:
    state = ControllerState()
    names = [f"f{i}" for i in range(fields)]
    _fill(state, "p", rows, names)
    for t in range(tasks):
        state.get_meta("p", f"task{t}", names, 1)
    return state.memory_bytes("p") / rows


def append_times(sizes: tuple[int, ...], appends: int = 5000) -> dict[int, float]:
    """Seconds per single-row allocate + commit once a partition holds ``size`` rows,
    measured interleaved across sizes (median of batches of 100 appends)."""
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


def main() -> None:
    p50 = get_meta_p50((8, 4096, 65536))
    print("get_meta p50 (batch 8):")
    for ready, t in p50.items():
        print(f"  {ready:>6} ready rows: {t * 1e6:7.1f} us  ({t / p50[8]:.2f}x of 8)")
    print(f"controller state, 1M rows x 8 fields x 4 tasks: {bytes_per_row():.1f} bytes/row")
    per_append = append_times((10_000, 1_000_000))
    small, large = per_append[10_000], per_append[1_000_000]
    print(
        f"single-row append: {small * 1e6:.1f} us at 10k rows, {large * 1e6:.1f} us at 1M rows "
        f"({large / small:.2f}x)"
    )


if __name__ == "__main__":
    main()
