"""Store write/read throughput next to a single-thread memcpy of the same bytes.

    python -m benchmarks.storage_store [--mib 128] [--repeat 5] [--threads N]     # from the repo root

A dense batch of 5 fields of shape (B, L) -- 3 int64, 2 float32 -- goes through
:class:`transferqueue.storage.store.Store` directly (no actor, no codec). Rows:

* write new: into a fresh partition (new buffers: page faults included), cleared after;
* overwrite: the same rows again (buffers already touched);
* read: all rows in order (slice copies) and shuffled (one ``index_select`` per field);
* jagged: the same bytes as one jagged field of B rows of varying length (write + read).

The memcpy lines are ``dst.copy_(src)`` with one torch thread, into pre-touched memory (the
ratio column's base) and into freshly allocated memory (page faults: the bound for writes
into new buffers and for reads, whose results are new tensors).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from transferqueue.storage.store import Store

DTYPES = [torch.int64, torch.int64, torch.int64, torch.float32, torch.float32]


def _seconds(
    fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None
) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(mib: int) -> tuple[dict[str, torch.Tensor], int]:
    row_bytes_per_l = sum(torch.empty(0, dtype=d).element_size() for d in DTYPES)
    b = 1024
    length = (mib << 20) // (b * row_bytes_per_l)
    fields = {f"f{i}": torch.ones(b, length, dtype=d) for i, d in enumerate(DTYPES)}
    return fields, sum(t.nbytes for t in fields.values())


def _memcpy(nbytes: int, repeat: int, fresh: bool) -> float:
    """One-thread ``copy_`` of ``nbytes`` into pre-touched (or freshly allocated) memory."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if fresh:
            return _seconds(lambda: torch.empty_like(src).copy_(src), repeat)
        return _seconds(lambda: dst.copy_(src), repeat)
    finally:
        torch.set_num_threads(threads)


def _jagged(nbytes: int, b: int) -> torch.Tensor:
    """``b`` int64 rows of random lengths, ``nbytes`` in total."""
    total = nbytes // 8
    cuts = torch.sort(torch.randint(0, total + 1, (b - 1,))).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    return torch.nested.nested_tensor_from_jagged(torch.ones(total, dtype=torch.int64), offsets)


def run(mib: int, repeat: int) -> list[tuple[str, float]]:
    fields, nbytes = _batch(mib)
    b = next(iter(fields.values())).shape[0]
    rows = list(range(b))
    shuffled = torch.randperm(b).tolist()
    store = Store()
    results = [
        ("memcpy (1 thread, pre-touched)", _memcpy(nbytes, repeat, fresh=False)),
        ("memcpy (1 thread, fresh pages)", _memcpy(nbytes, repeat, fresh=True)),
    ]
    results.append(
        (
            "write new partition",
            _seconds(
                lambda: store.write("p", rows, fields), repeat, lambda: store.clear_partition("p")
            ),
        )
    )
    store.write("p", rows, fields)
    results.append(("overwrite", _seconds(lambda: store.write("p", rows, fields), repeat)))
    names = list(fields)
    results.append(("read in order", _seconds(lambda: store.read("p", rows, names), repeat)))
    results.append(("read shuffled", _seconds(lambda: store.read("p", shuffled, names), repeat)))
    store.clear_partition("p")
    jag = _jagged(nbytes, b)
    results.append(
        (
            "jagged write new",
            _seconds(
                lambda: store.write("j", rows, {"r": jag}),
                repeat,
                lambda: store.clear_partition("j"),
            ),
        )
    )
    store.write("j", rows, {"r": jag})
    results.append(
        ("jagged read shuffled", _seconds(lambda: store.read("j", shuffled, ["r"]), repeat))
    )
    return [(name, nbytes / sec / 1e9) for name, sec in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.mib, args.repeat)
    base = results[0][1]
    print(
        f"Store, {args.mib} MiB dense batch, 5 fields (B=1024, L), torch threads={torch.get_num_threads()}"
    )
    print(f"{'':32} {'GB/s':>8} {'x memcpy':>9}")
    for name, gbps in results:
        print(f"{name:32} {gbps:8.2f} {gbps / base:9.2f}")


if __name__ == "__main__":
    main()
