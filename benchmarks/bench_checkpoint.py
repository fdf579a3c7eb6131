"""Checkpoint save and load throughput (issue 13, item 3) beside a plain file of the same bytes.

State: one partition of 1024 rows, 4 dense float32 fields, 1 GiB in all (``--quick``:
128 MiB), in a system with 2 storage units (inproc; the full run also on zmq, whose bytes
cross processes to reach the saving client). Save = ``save_checkpoint`` (snapshot, read from
the units, one file per 64 MiB chunk, fsync, atomic swap); load = ``load_checkpoint`` into
an empty system with 3 units. Baseline, same run, same directory: one file of the same bytes
written with ``write`` + ``fsync``, and read back with ``readinto``. Before every read (a
load, or the baseline read) the files' pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``), so reads come from the disk. Medians of the repeats.

Also runnable alone: ``python benchmarks/bench_checkpoint.py [--quick]``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import MiB, Table, p50, rate, setup_path

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import start_system

setup_path()
ROWS, FIELDS = 1024, 4


def _state(mib: int) -> dict[str, torch.Tensor]:
    per_row = mib * MiB // (ROWS * FIELDS * 4)
    return {f"f{i}": torch.full((ROWS, per_row), float(i)) for i in range(FIELDS)}


def _drop_cache(path: Path) -> None:
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_file(data: dict[str, torch.Tensor], folder: Path) -> tuple[float, float]:
    """Seconds to write (with fsync) and read back the same bytes as one file."""
    path = folder / "plain.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for t in data.values():
            f.write(memoryview(t.numpy()).cast("B"))
        os.fsync(f.fileno())
    wrote = time.perf_counter() - t0
    _drop_cache(path)
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf.numpy()).cast("B"), 0
        while got < size:
            got += f.readinto(view[got:])
    read = time.perf_counter() - t0
    path.unlink()
    return wrote, read


def _system(transport: str, units: int) -> Any:
    cfg = load_config({"transport": transport, "storage": {"units": units}})
    return runtime_loop().run(start_system(cfg))


def measure(transport: str, mib: int, repeats: int, folder: Path) -> dict[str, float]:
    data = _state(mib)
    nbytes = sum(t.nbytes for t in data.values())
    src, dst = _system(transport, 2), _system(transport, 3)
    try:
        src.client.put(data, partition_id="train")
        saves, loads, writes, reads = [], [], [], []
        for i in range(repeats):
            path = folder / f"ck-{transport}"
            t0 = time.perf_counter()
            src.client.save_checkpoint(path, {"step": i}, progress=False)
            saves.append(time.perf_counter() - t0)
            _drop_cache(path)
            for pid in dst.client.list_partitions():
                dst.client.clear_partition(pid)
            t0 = time.perf_counter()
            dst.client.load_checkpoint(path, progress=False)
            loads.append(time.perf_counter() - t0)
            wrote, read = plain_file(data, folder)
            writes.append(wrote)
            reads.append(read)
        assert dst.client.partition_info("train").produced == {f: ROWS for f in data}
    finally:
        runtime_loop().run(src.aclose())
        runtime_loop().run(dst.aclose())
    return {
        "bytes": nbytes,
        "save_GBps": rate(nbytes, p50(saves)),
        "load_GBps": rate(nbytes, p50(loads)),
        "file_write_GBps": rate(nbytes, p50(writes)),
        "file_read_GBps": rate(nbytes, p50(reads)),
    }


def run(quick: bool = False) -> dict[str, Any]:
    mib = 128 if quick else 1024
    repeats = 3
    table = Table(f"checkpoint (issue 13): {mib} MiB state, medians of {repeats}")
    figures: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="tq-bench-ckpt-", dir=os.environ.get("TQ_BENCH_DIR")))
    try:
        for transport in ["inproc"] if quick else ["inproc", "zmq"]:
            got = measure(transport, mib, repeats, folder)
            figures[transport] = got
            wbase, rbase = got["file_write_GBps"], got["file_read_GBps"]
            table.add(f"{transport} save", got["save_GBps"], "GB/s", "file write+fsync", wbase)
            table.add(f"{transport} load", got["load_GBps"], "GB/s", "file read (cold)", rbase)
        table.note(f"files in {folder.parent} (set TQ_BENCH_DIR to measure another disk)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        tq.close()
    table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
