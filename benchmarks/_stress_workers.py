"""What ``bench_stress`` runs in its producer and consumer processes (spawned: this module
must be importable by name there; ``benchmarks/`` is on ``sys.path``).

Every process talks to the parent through a duplex ``multiprocessing`` pipe of its own
(never a shared queue: a SIGKILLed producer could die holding a shared queue's lock). It
sends ``("ready", pid)`` once attached, waits for ``"go"``, then reports as it goes; each
report is one small message (well under ``PIPE_BUF``: one ``write``, so a kill never leaves
half a message in the pipe).

A row of producer ``p``, sequence number ``s`` is the kv key ``f"{p}-{s}"`` with two fields:
``data`` -- ``row_bytes`` uint8 derived from ``(p, s)``, its first 16 bytes the int64 pair
``(p, s)`` -- and ``info`` = int64 ``(p, s, crc32(data))``. A consumer checks both: the
header names the row the ``info`` field names, and the crc32 of what it read is the one the
producer computed.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections import Counter
from typing import Any

from _common import vm_kib

FIELDS = ["data", "info"]


def row_of(base: Any, producer: int, seq: int, row_bytes: int) -> tuple[Any, int]:
    """The ``(1, row_bytes)`` uint8 row of ``(producer, seq)`` and its crc32."""
    import torch

    off = (producer * 7919 + seq * 104729) % row_bytes
    data = base[off : off + row_bytes].clone()
    data[:16].view(torch.int64).copy_(torch.tensor([producer, seq], dtype=torch.int64))
    return data.unsqueeze(0), zlib.crc32(data.numpy())


def _base(row_bytes: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(20261201)
    return torch.randint(0, 256, (2 * row_bytes,), dtype=torch.uint8, generator=gen)


def _attach(conn: Any, config: Any) -> Any:
    import transferqueue as tq
    import transferqueue.system as tq_system

    tq.init(config)
    conn.send(("ready", os.getpid()))
    if conn.recv() != "go":
        raise SystemExit(0)
    return tq_system.current()


# ------------------------------------------------------------------------ producer
def producer_main(
    conn: Any,
    config: Any,
    producer: int,
    seqs: list[int],
    clients: int,
    row_bytes: int,
    partition: str,
) -> None:
    """Put the rows ``seqs`` of ``producer`` with ``clients`` async clients (each with
    connections of its own) on one event loop; ``("c", seq, attempts)`` after each put
    returned (committed), ``("done", stats)`` at the end."""
    import transferqueue as tq

    try:
        system = _attach(conn, config)
        stats = asyncio.run(_produce(conn, system, producer, seqs, clients, row_bytes, partition))
        stats["hwm_kib"] = vm_kib(os.getpid(), "VmHWM")
        conn.send(("done", stats))
    except BaseException as exc:
        conn.send(("fatal", f"producer {producer}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        tq.close()
        conn.close()


async def _produce(
    conn: Any,
    system: Any,
    producer: int,
    seqs: list[int],
    clients: int,
    row_bytes: int,
    partition: str,
) -> dict[str, Any]:
    import torch
    from tensordict import TensorDict

    base = _base(row_bytes)
    todo = iter(seqs)
    errors: Counter[str] = Counter()
    attempts = [0]

    async def worker(client: Any) -> None:
        for seq in todo:  # one iterator shared by the workers of this (single) loop
            data, crc = row_of(base, producer, seq, row_bytes)
            info = torch.tensor([[producer, seq, crc]], dtype=torch.int64)
            td = TensorDict({"data": data, "info": info}, batch_size=[1])
            attempt = 0
            while True:  # retried until it succeeds: the parent's stall check ends a hang
                attempt += 1
                attempts[0] += 1
                try:
                    await client.kv_put([f"{producer}-{seq}"], partition, td)
                    break
                except Exception as exc:  # counted and retried: the key makes it idempotent
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(min(1.0, 0.02 * attempt))
            conn.send(("c", seq, attempt))

    pool = [system.new_async_client() for _ in range(clients)]
    try:
        await asyncio.gather(*(worker(c) for c in pool))
    finally:
        for c in pool:
            await c.close()
    return {"rows": len(seqs), "put_calls": attempts[0], "errors": dict(errors)}


# ------------------------------------------------------------------------ consumer
def consumer_main(
    conn: Any,
    config: Any,
    task: str,
    partition: str,
    clients: int,
    batch_size: int,
) -> None:
    """Consume every row of ``partition`` for ``task`` with ``clients`` async clients;
    ``("got", [(p, s), ...], [bad (p, s, why), ...], [unreadable (row, why), ...])`` per
    batch (unreadable: ``get_data`` raised KeyError for a row ``get_meta`` handed out), ``("end", stats)`` when
    the (sealed) partition is exhausted for the task."""
    import transferqueue as tq

    try:
        system = _attach(conn, config)
        stats = asyncio.run(_consume(conn, system, task, partition, clients, batch_size))
        stats["hwm_kib"] = vm_kib(os.getpid(), "VmHWM")
        conn.send(("end", stats))
    except BaseException as exc:
        conn.send(("fatal", f"consumer {task}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        tq.close()
        conn.close()


def check_batch(td: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int, str]]]:
    """The ``(p, s)`` of each row of ``td`` and the rows that fail their checks."""
    import torch

    data, info = td["data"], td["info"]
    head = data[:, :16].contiguous().view(torch.int64)
    got, bad = [], []
    for i in range(data.shape[0]):
        p, s, crc = (int(x) for x in info[i].tolist())
        got.append((p, s))
        hp, hs = (int(x) for x in head[i].tolist())
        if (hp, hs) != (p, s):
            bad.append((p, s, f"data of row ({hp}, {hs})"))
        elif zlib.crc32(data[i].numpy()) != crc:
            bad.append((p, s, "crc32 mismatch"))
    return got, bad


async def _consume(
    conn: Any, system: Any, task: str, partition: str, clients: int, batch_size: int
) -> dict[str, Any]:
    from transferqueue.metadata import BatchMeta

    counts = Counter[str]()
    busy = [0.0]

    async def worker(client: Any) -> None:
        while True:
            try:
                meta = await client.get_meta(FIELDS, batch_size, partition, task, timeout=60)
            except TimeoutError:
                counts["get_meta timeouts (60 s)"] += 1
                continue
            if len(meta) == 0:
                return  # exhausted: sealed and every row consumed
            t0 = time.perf_counter()
            unreadable: list[tuple[int, str]] = []
            try:
                td = await client.get_data(meta)
                got, bad = check_batch(td)
                del td
            except KeyError:  # a row handed out whose bytes are not there: find which
                counts["get_data KeyError"] += 1
                got, bad = [], []
                for row in meta.rows:
                    try:
                        one = await client.get_data(BatchMeta(meta.partition_id, [row], FIELDS))
                    except KeyError as exc:
                        unreadable.append((row, str(exc)[:200]))
                        continue
                    g, b = check_batch(one)
                    got, bad = got + g, bad + b
            busy[0] += time.perf_counter() - t0
            counts["batches"] += 1
            conn.send(("got", got, bad, unreadable))

    pool = [system.new_async_client() for _ in range(clients)]
    try:
        await asyncio.gather(*(worker(c) for c in pool))
    finally:
        for c in pool:
            await c.close()
    return {"counts": dict(counts), "get_and_check_s": busy[0]}
