"""Processes of ``bench_fleet`` (spawned: they must be importable by module name).

* :func:`producer` -- one rollout worker: attaches to the system, warms its connections,
  waits for the start signal, then puts ``samples`` single-sample batches (``client.put``
  or ``kv_batch_put``), each with a tag naming it; reports the put latencies and the
  ``perf_counter`` at which each put returned (CLOCK_MONOTONIC: one clock for every
  process of the machine).
* :func:`consumer` -- one trainer: streams the partition with ``get_meta(wait=True)`` +
  ``get_data`` and reports, per sample, when it held it.
* :func:`hammer` -- ``clients`` concurrent async callers on connections of their own,
  issuing ``begin_put``/``commit``/``get_meta`` to the controller for ``seconds``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

#: a finished trajectory, ~40 KB in 3 fields
PROMPT, RESPONSE = 1024, 4096


def sample() -> dict[str, Any]:
    import torch

    return {
        "prompts": torch.arange(PROMPT, dtype=torch.int64).reshape(1, PROMPT),
        "responses": torch.arange(RESPONSE, dtype=torch.int64).reshape(1, RESPONSE),
        "reward": torch.ones(1),
    }


def producer(conn: Any, cfg: Any, pid: str, idx: int, samples: int, mode: str) -> None:
    import transferqueue as tq

    try:
        tq.init(cfg)
        client = tq.get_client()
        data = sample()
        for j in range(5):  # connections and code paths warm
            client.put(data, partition_id=f"{pid}-warm", tags=[{"p": idx, "s": j}])
        conn.send(("ready", None))
        if conn.recv() != "go":
            return
        lat, done = [], []
        for j in range(samples):
            tag = [{"p": idx, "s": j}]
            t0 = time.perf_counter()
            if mode == "put":
                client.put(data, partition_id=pid, tags=tag)
            else:
                tq.kv_batch_put([f"{idx}-{j}"], pid, fields=data, tags=tag)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            done.append(t1)
        conn.send(("done", (lat, done)))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        tq.close()


def consumer(conn: Any, cfg: Any, pid: str, total: int) -> None:
    import transferqueue as tq

    try:
        tq.init(cfg)
        client = tq.get_client()
        client.get_meta(["prompts"], 1, f"{pid}-none", "warm", wait=False)
        conn.send(("ready", None))
        held: dict[tuple[int, int], float] = {}
        while len(held) < total:
            meta = client.get_meta(
                ["prompts", "responses", "reward"], 1, pid, "train", wait=True, timeout=120
            )
            if not len(meta):
                break
            client.get_data(meta)
            t = time.perf_counter()
            for tag in meta.tags:
                held[(tag["p"], tag["s"])] = t
        conn.send(("done", held))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        tq.close()


def hammer(conn: Any, cfg: Any, pid: str, clients: int, seconds: float) -> None:
    """``clients`` concurrent callers, each looping begin_put -> commit -> get_meta."""
    import torch

    import transferqueue as tq
    from transferqueue.client.columns import field_spec
    from transferqueue.runtime.actor import ActorRef, Address
    from transferqueue.runtime.loop import runtime_loop

    spec = {"x": field_spec(torch.zeros(1, 1))}

    async def one(ref: Any, k: int, start: float, stop: float) -> int:
        ops = 0
        await ref.call("process_id")  # connected
        while time.perf_counter() < start:
            await asyncio.sleep(0.001)
        while time.perf_counter() < stop:
            lease = (await ref.call("begin_put", pid, spec, 1))["lease"]
            await ref.call("commit", pid, lease)
            await ref.call("get_meta", ["x"], 1, pid, f"t{k}", None, False)
            ops += 3
        return ops

    async def main(start: float, stop: float) -> int:
        info = cfg.system
        refs = [ActorRef(Address.from_plain(info["controller"]), cfg) for _ in range(clients)]
        try:
            counts = await asyncio.gather(*(one(r, k, start, stop) for k, r in enumerate(refs)))
        finally:
            for r in refs:
                await r.aclose()
        return sum(counts)

    try:
        tq.init(cfg)
        conn.send(("ready", None))
        start = conn.recv()
        ops = runtime_loop().run(main(start, start + seconds))
        conn.send(("done", ops))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        tq.close()
