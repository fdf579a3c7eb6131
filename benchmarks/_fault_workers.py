"""Child processes of ``bench faults`` (spawned; importable from ``benchmarks/``)."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

import torch

import transferqueue as tq


def producer_stopped_after_begin(config: Any, pid: str, conn: Connection) -> None:
    """Attach, start a put, report once its rows are allocated, then wait to be killed."""
    tq.init(config)
    client = tq.get_client()

    async def hook(point: str) -> None:
        if point == "begun":
            conn.send(point)
            await asyncio.Event().wait()

    client.async_client.put_hook = hook
    client.put({"x": torch.ones(1, 16)}, partition_id=pid)


def owner(conn: Connection) -> None:
    """Start a zmq system, report its actor processes' pids, wait to be killed."""
    from transferqueue.runtime.loop import runtime_loop
    from transferqueue.system import current

    tq.init({"transport": "zmq", "storage": {"units": 2}})
    system = current()
    loop = runtime_loop()
    pids = [loop.run(system.async_client._controller.call("process_id"))]
    pids += [loop.run(u.call("stats"))["pid"] for u in system.async_client._units]
    conn.send(pids)
    conn.recv()  # never sent: killed here
