"""Streaming latency (issue 5): a producer's put returning -> the consumer holding the batch.

The consumer is blocked in ``client.stream(...)`` (the async client's stream: event-driven
``get_meta(wait=True)`` then ``get_data``; where ``transferqueue.streaming`` is missing,
a plain ``get_meta(wait=True)`` + ``get_data`` loop) when the producer puts the next batch
of 32 rows (``input_ids`` int64 (32, 128) and ``reward`` float32 (32,)): the producer puts
batch k+1 3 ms after the consumer reported holding batch k. Latency = the consumer's
``time.perf_counter()`` once it holds batch k (meta and data) minus the producer's right
after its ``client.put`` returned. The partition has a reservation of exactly the rows
put, so the stream ends by itself after the last batch.

* inproc: the consumer is a thread running its own event loop (``asyncio.run``);
* zmq: the consumer is a spawned process attached with the config ``tq.init`` returned;
  ``perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for both processes.

Also runnable alone: ``python benchmarks/bench_streaming.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import Table, p50, pct, zmq_config

import transferqueue as tq

BATCH = 32
FIELDS = ["input_ids", "reward"]
TARGETS_MS = {"inproc": 1.0, "zmq": 3.0}
PUBLIC = "StreamingDataLoader 463 ms; blocking mode 8.1 s"


def has_stream() -> bool:
    try:
        spec = importlib.util.find_spec("transferqueue.streaming")
    except ImportError:
        return False
    if spec is None:
        return False
    module = importlib.import_module("transferqueue.streaming")
    return hasattr(module, "stream")


def _batch() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.arange(BATCH * 128, dtype=torch.int64).reshape(BATCH, 128),
        "reward": torch.rand(BATCH),
    }


def _produce(client: Any, pid: str, batches: int, recv: Any) -> list[float]:
    """Put ``batches`` batches, each once the consumer holds the previous one and is blocked
    again; returns held-minus-put-returned seconds per batch."""
    kind, _ = recv()
    if kind != "consuming":
        raise RuntimeError(f"unexpected message from the consumer: {kind}")
    lat = []
    batch = _batch()
    for _ in range(batches):
        time.sleep(0.003)  # the consumer is back in the stream, blocked
        client.put(batch, partition_id=pid)
        t_put = time.perf_counter()
        kind, t_held = recv()
        if kind != "held":
            raise RuntimeError(f"unexpected message from the consumer: {kind} {t_held}")
        lat.append(t_held - t_put)
    return lat


def measure_inproc(batches: int, use_stream: bool) -> list[float]:
    from _actors import consume

    tq.init()
    client, aclient = tq.get_client(), tq.get_async_client()
    pid = "stream-inproc"
    client.create_partition(pid, expected_size=batches * BATCH)
    messages: queue.Queue = queue.Queue()
    args = dict(fields=FIELDS, batch_size=BATCH, partition_id=pid, batches=batches)

    def consumer() -> None:
        try:
            asyncio.run(consume(aclient, messages.put, use_stream=use_stream, **args))
        except BaseException as exc:
            messages.put(("error", exc))

    def recv() -> tuple[str, Any]:
        kind, value = messages.get(timeout=60)
        if kind == "error":
            raise value
        return kind, value

    thread = threading.Thread(target=consumer, daemon=True)
    thread.start()
    try:
        return _produce(client, pid, batches, recv)
    finally:
        thread.join(30)
        tq.close()


def measure_zmq(batches: int, use_stream: bool) -> list[float]:
    from _actors import stream_consumer

    cfg = tq.init(zmq_config())
    client = tq.get_client()
    pid = "stream-zmq"
    client.create_partition(pid, expected_size=batches * BATCH)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    args = dict(
        fields=FIELDS, batch_size=BATCH, partition_id=pid, batches=batches, use_stream=use_stream
    )
    proc = ctx.Process(target=stream_consumer, args=(child_conn, cfg, args), daemon=True)
    proc.start()

    def recv() -> tuple[str, Any]:
        if not conn.poll(120):
            raise RuntimeError("the consumer process went quiet")
        return conn.recv()

    try:
        return _produce(client, pid, batches, recv)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        tq.close()


def run(quick: bool = False) -> dict[str, Any]:
    use_stream = has_stream()
    how = "client.stream" if use_stream else "get_meta(wait=True) + get_data"
    table = Table(
        f"streaming (issue 5): put returned -> consumer holds the batch ({how}), batch of {BATCH}"
    )
    figures: dict[str, Any] = {"consumer": how}
    batches, warm = (60, 10) if quick else (250, 20)
    try:
        for transport, fn in (("inproc", measure_inproc), ("zmq", measure_zmq)):
            lat = fn(batches + warm, use_stream)[warm:]
            l50, l99 = p50(lat) * 1e3, pct(lat, 99) * 1e3
            target = TARGETS_MS[transport]
            table.add(
                f"{transport} put -> held p50",
                l50,
                "ms",
                target=f"<= {target} ms",
                met=l50 <= target,
                public=PUBLIC,
            )
            table.add(f"{transport} put -> held p99", l99, "ms")
            figures.update({f"{transport}_p50_ms": l50, f"{transport}_p99_ms": l99})
    finally:
        table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
