"""Processes the fault tests start and kill (importable by spawned children).

Each one reports through a multiprocessing Connection when it reached the point where the
test kills it, then waits for its end without sleeping (an Event nobody sets).
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

import torch

import transferqueue as tq


def producer_stopped_at(config: Any, pid: str, stage: str, conn: Connection) -> None:
    """Put one row; at ``stage`` ("begun": rows allocated, "written": bytes on the units,
    not committed) report and wait to be killed."""
    tq.init(config)
    client = tq.get_client()
    # a producer that has been running: its connections to the units exist (a first call
    # from a fresh process -- Ray looks the actor up -- can take longer than a test's
    # 1 s put lease)
    client.put({"x": torch.zeros(1, 4)}, partition_id=pid + "-warm-up")
    client.clear_partition(pid + "-warm-up")

    async def hook(point: str) -> None:
        if point == stage:
            conn.send(point)
            await asyncio.Event().wait()

    client.async_client.put_hook = hook
    client.put({"x": torch.full((1, 4), 7.0)}, partition_id=pid)


def consumer_holding_a_batch(config: Any, pid: str, conn: Connection) -> None:
    """Take one batch of two rows, report its rows, wait to be killed."""
    tq.init(config)
    meta = tq.get_client().get_meta(["x"], 2, pid, "train")
    conn.send(meta.rows)
    conn.recv()  # never sent: killed here


def waiter(config: Any, pid: str, conn: Connection) -> None:
    """Wait for rows that never come; report the error the wait ends with."""
    tq.init(config)
    conn.send("waiting")
    try:
        tq.get_client().get_meta(["x"], 1, pid, "train", timeout=None)
        conn.send("returned")
    except Exception as exc:
        conn.send(type(exc).__name__)


def consumer_holding_a_leased_batch(
    config: Any, pid: str, lease_s: float, conn: Connection
) -> None:
    """Take one batch of two rows under a consumer lease, report its rows, wait to be killed."""
    tq.init(config)
    meta = tq.get_client().get_meta(["x"], 2, pid, "train", lease_s=lease_s)
    conn.send(meta.rows)
    conn.recv()  # never sent: killed here


def large_batch(seed: int, rows: int = 512) -> dict[str, torch.Tensor]:
    """Two fields of 4 MiB: 1 MiB frames for each run of rows a unit (of two) gets, which
    take shared memory."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2048, generator=g)
    return {"x": x, "y": torch.randint(0, 1 << 40, (rows, 1024), generator=g)}


def producer_of_a_large_batch(config: Any, pid: str, seed: int, conn: Connection) -> None:
    """Put :func:`large_batch` (the units keep its shared-memory frames), report, wait to be
    killed."""
    tq.init(config)
    client = tq.get_client()
    batch = large_batch(seed)
    client.put(batch, partition_id=pid)
    conn.send(sum(t.nbytes for t in batch.values()))
    asyncio.run(asyncio.Event().wait())
