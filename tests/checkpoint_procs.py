"""The saving process the checkpoint tests SIGKILL mid-save (importable by spawned children).

It reports through a multiprocessing Connection when its save reached the hook point the
test names, then waits to be killed without sleeping (an Event nobody sets).
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

import torch

import transferqueue as tq
from transferqueue.ops import checkpoint
from transferqueue.runtime.loop import runtime_loop


def fill(client: Any, pid: str, n: int, start: int = 0) -> None:
    client.put({"x": torch.arange(start, start + n).repeat_interleave(64).reshape(n, 64)}, pid)


def saver_killed_at(
    config: Any, path: str, stage: str, own: bool, hold_s: float, conn: Connection
) -> None:
    """Save ``path`` and stop at hook point ``stage``. ``own``: start a system of its own
    (inproc), put 8 rows into ``a`` and save them completely first, then put 8 into ``b``;
    else attach to the system ``config`` names (the test filled it)."""
    tq.init(config)
    client = tq.get_client()
    if own:
        fill(client, "a", 8)
        client.save_checkpoint(path, {"step": 1})
        fill(client, "b", 8)

    async def hook(point: str) -> None:
        if point == stage:
            conn.send(point)
            await asyncio.Event().wait()

    save = checkpoint.save(
        client.async_client, path, {"step": 2}, chunk_bytes=1024, hold_s=hold_s, hook=hook
    )
    runtime_loop().run(save)
    conn.send("finished")  # never reached: killed at the hook
