"""What the benchmarks run in other processes: it must be importable by name there.

``benchmarks/`` is put on ``sys.path`` (inherited by zmq actor processes and by
``multiprocessing`` spawn children) and on ``PYTHONPATH`` (read by Ray workers) by
``_common.setup_path()``.
"""

from __future__ import annotations

from typing import Any


class Echo:
    """A transferqueue actor that returns what it is sent."""

    async def echo(self, payload: Any) -> Any:
        return payload

    async def noop(self) -> None:
        return None


class RayEcho:
    """The bare Ray baseline: an async Ray actor (as transferqueue's Ray host is) without
    the codec or the runtime."""

    async def echo(self, payload: Any) -> Any:
        return payload

    async def noop(self) -> None:
        return None


def bare_zmq_server(reply: str) -> None:
    """A bare pyzmq ROUTER, run as ``python -c`` (imports neither torch nor transferqueue).

    ``reply="echo"`` sends every message back as received (zero-copy frames);
    ``reply="ack"`` answers each message with one empty frame (a one-way transfer).
    Prints its endpoint on stdout; stops on a one-frame message ``b"stop"`` or when its
    stdin closes (the owner went away).
    """
    import sys
    import threading

    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)

    def watch_owner() -> None:
        sys.stdin.read()
        import os

        os._exit(0)

    threading.Thread(target=watch_owner, daemon=True).start()
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 2 and frames[1].bytes == b"stop":
                sock.send_multipart([frames[0], b"stopped"])
                return
            if reply == "echo":
                sock.send_multipart(frames, copy=False)
            else:
                sock.send_multipart([frames[0], b""])
            del frames
    finally:
        sock.close(linger=0)
        ctx.term()


def data_consumer(conn: Any, config: Any, ray_address: str | None = None) -> None:
    """The consumer process of ``bench_data``: attaches to the system named by ``config``
    and, per ``("get", partition, fields, batch_size)`` command, times get_meta + get_data.
    ``ray_address``: the parent's Ray cluster (another may run on this machine)."""
    import time

    import transferqueue as tq

    if ray_address is not None:
        import ray

        ray.init(address=ray_address, namespace=config.ray.namespace, log_to_driver=False)
    tq.init(config)
    client = tq.get_client()
    try:
        conn.send("ready")
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                return
            _, pid, fields, batch_size = cmd
            t0 = time.perf_counter()
            meta = client.get_meta(fields, batch_size, pid, "bench", wait=True, timeout=120)
            t1 = time.perf_counter()
            td = client.get_data(meta)
            t2 = time.perf_counter()
            rows = td.batch_size[0] if len(td.batch_size) else 0
            del td
            conn.send((t1 - t0, t2 - t1, rows))
    finally:
        tq.close()
        conn.close()


def stream_consumer(conn: Any, config: Any, args: dict[str, Any]) -> None:
    """The consumer process of ``bench_streaming`` (zmq): blocks in the stream and sends
    ``("held", time.perf_counter())`` for each batch it holds (CLOCK_MONOTONIC: the same
    clock as the producer's in the parent process)."""
    import asyncio

    import transferqueue as tq

    tq.init(config)
    try:
        asyncio.run(consume(tq.get_async_client(), conn.send, **args))
        conn.send(("done", 0.0))
    finally:
        tq.close()
        conn.close()


async def consume(
    client: Any,
    notify: Any,
    *,
    fields: list[str],
    batch_size: int,
    partition_id: str,
    batches: int,
    use_stream: bool,
) -> None:
    """Consume ``batches`` batches with the async ``client``; ``notify(("held", t))`` with
    ``t = time.perf_counter()`` as soon as each batch is held (meta and data)."""
    import time

    notify(("consuming", time.perf_counter()))
    if use_stream:  # the partition's reservation of batches x batch_size rows ends it
        held = 0
        agen = client.stream(fields, batch_size, partition_id, "stream")
        try:
            async for td, meta in agen:
                t = time.perf_counter()
                _check(td, meta, batch_size)
                notify(("held", t))
                held += 1
        finally:
            await agen.aclose()
        if held != batches:
            raise RuntimeError(f"the stream ended after {held} batches, expected {batches}")
        return
    for _ in range(batches):
        meta = await client.get_meta(fields, batch_size, partition_id, "stream", wait=True)
        td = await client.get_data(meta)
        t = time.perf_counter()
        _check(td, meta, batch_size)
        notify(("held", t))


def _check(td: Any, meta: Any, batch_size: int) -> None:
    if len(meta) != batch_size or td.batch_size[0] != batch_size:
        raise RuntimeError(f"expected a batch of {batch_size} rows, got {len(meta)}")
