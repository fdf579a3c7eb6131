"""The GPU path (issue 12 item 7): put of CUDA tensors -> ``get_data(meta, device="cuda")``,
1 GiB a round, through the pinned staging buffers (client/device.py, docs/gpu.md).

* **same process** (inproc: the controller and storage units on this process's loop
  thread), and **across processes on one host** (zmq: each actor a process of its own;
  this process is the client). One round = ``client.put`` of a batch of 4 float32 CUDA
  fields (1024 rows x 65536, 256 MiB each), then ``client.get_data(meta, device="cuda")``
  and a device sync; the result is checked equal to the input on the device. Rate = 1 GiB /
  (put + get seconds); medians after one warm-up round (which pins the staging buffers).
  Targets: >= 20 GB/s same process, >= 10 GB/s across processes.
* **Baselines, same run, same tensors**: a plain ``tensor.to("cpu")`` + ``.to("cuda")``
  round trip (pageable memory), and a pinned memcpy round trip (``non_blocking`` copies into
  and out of pre-pinned host buffers, one sync each way) -- the link's ceiling. Ratios:
  the queue's rate over each.
* Without CUDA it prints that and returns ``{"skipped": ...}`` (exit 0, no figures).

Run: ``python -m transferqueue bench gpu [--quick]`` from the checkout (on a GPU machine:
``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Table, p50, rate

from transferqueue.config import load_config
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import start_system

ROWS, WIDTH, FIELDS = 1024, 65536, 4  # float32: 256 MiB a field, 1 GiB a batch
TARGETS = {"inproc": 20.0, "zmq": 10.0}  # GB/s


def _batch() -> dict[str, torch.Tensor]:
    return {f"f{i}": torch.full((ROWS, WIDTH), float(i + 1), device="cuda") for i in range(FIELDS)}


def plain_round(batch: dict[str, torch.Tensor]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host = {k: v.to("cpu") for k, v in batch.items()}
    back = {k: v.to("cuda") for k, v in host.items()}
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del host, back
    return elapsed


def pinned_round(batch: dict[str, torch.Tensor], pinned: dict[str, torch.Tensor]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k, v in batch.items():
        pinned[k].copy_(v, non_blocking=True)
    torch.cuda.synchronize()
    back = {k: p.to("cuda", non_blocking=True) for k, p in pinned.items()}
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del back
    return elapsed


def queue_round(client: Any, batch: dict[str, torch.Tensor], pid: str) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    meta = client.put(batch, partition_id=pid)
    t1 = time.perf_counter()
    got = client.get_data(meta, device="cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    for k, v in batch.items():
        if not (got[k].is_cuda and torch.equal(got[k], v)):
            raise RuntimeError(f"field {k} came back different")
    del got
    client.clear_partition(pid)
    return t1 - t0, t2 - t1


def measure(transport: str, reps: int) -> dict[str, float]:
    batch = _batch()
    nbytes = sum(v.nbytes for v in batch.values())
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in batch.items()}
    cfg: dict[str, Any] = {"transport": transport, "storage": {"units": 2}}
    system = runtime_loop().run(start_system(load_config(cfg)))
    rounds: list[tuple[float, float, float, float]] = []
    try:
        for i in range(reps + 1):  # round 0 warms up (pins the staging buffers)
            plain = plain_round(batch)
            pin = pinned_round(batch, pinned)
            put_s, get_s = queue_round(system.client, batch, f"gpu-{transport}-{i}")
            if i:
                rounds.append((put_s, get_s, plain, pin))
    finally:
        runtime_loop().run(system.aclose())
    q = [rate(nbytes, p + g) for p, g, _, _ in rounds]
    return {
        "bytes": nbytes,
        "round_trip_GBps": p50(q),
        "put_GBps": p50([rate(nbytes, p) for p, _, _, _ in rounds]),
        "get_GBps": p50([rate(nbytes, g) for _, g, _, _ in rounds]),
        "plain_to_cpu_to_cuda_GBps": p50([rate(nbytes, r[2]) for r in rounds]),
        "pinned_memcpy_GBps": p50([rate(nbytes, r[3]) for r in rounds]),
        "over_plain": p50([rate(nbytes, p + g) / rate(nbytes, r) for p, g, r, _ in rounds]),
        "over_pinned": p50([rate(nbytes, p + g) / rate(nbytes, r) for p, g, _, r in rounds]),
    }


def run(quick: bool = False) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU benchmark needs one (nothing measured)")
        return {"skipped": "no CUDA device"}
    reps = 2 if quick else 4
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    figures: dict[str, Any] = {}
    for transport, label in (("inproc", "same process"), ("zmq", "across processes (zmq)")):
        f = figures[transport] = measure(transport, reps)
        table = Table(f"{label}: put -> get_data(device='cuda') of 1 GiB, medians of {reps}")
        target = TARGETS[transport]
        table.add(
            "put + get round trip",
            f["round_trip_GBps"],
            "GB/s",
            "pinned memcpy round trip",
            f["pinned_memcpy_GBps"],
            f">= {target:g} GB/s",
            f["round_trip_GBps"] >= target,
        )
        table.add(
            "put + get round trip",
            f["round_trip_GBps"],
            "GB/s",
            ".to('cpu') + .to('cuda')",
            f["plain_to_cpu_to_cuda_GBps"],
        )
        table.add("put (device -> store)", f["put_GBps"], "GB/s")
        table.add("get (store -> device)", f["get_GBps"], "GB/s")
        table.note(
            "per-round ratios, median: over the pinned memcpy "
            f"{f['over_pinned']:.2f}x, over .to('cpu') + .to('cuda') {f['over_plain']:.2f}x"
        )
        table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
