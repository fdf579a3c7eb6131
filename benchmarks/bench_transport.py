"""The actor runtime's transports (issue 2), each beside a bare baseline measured in the same run.

* zmq, 128 MiB call: ``ref.call("echo", [5 tensors])`` to an :class:`_actors.Echo` actor in
  its own process, and back. Baseline: a bare pyzmq DEALER -> ROUTER echo of the same frames
  (``codec.encode`` of the same payload) to a server in a process of its own.
  Throughput = bytes moved / round-trip time = 2 x 128 MiB / median round trip.
* zmq, empty call: ``await ref.call("noop")`` timed on the runtime's event loop (p50, p99);
  also the synchronous form (``runtime_loop().run(ref.call(...))`` from the main thread,
  i.e. one thread hop more). Baseline: bare pyzmq round trip of the same one-frame request
  (blocking sockets).
* inproc, empty call from another thread: ``runtime_loop().run(ref.call("noop"))`` from the
  main thread (the actor lives on the runtime loop thread; codec checking on, the default).
  Baseline: ``runtime_loop().run()`` of an empty coroutine (the thread hop alone).
* ray: empty call and 128 MiB echo through the Ray transport, beside a bare async Ray actor
  (numpy views of the same tensors) and ``ray.get(ray.put(tensors))`` of the same tensors.
  Ray runs with ``num_cpus=2``; it is started here and shut down at the end.
* codec: best-of-15 microseconds of ``codec.decode(codec.encode(x))`` for a small request
  header and for a header with 5 small tensors, beside the msgspec version of the same
  strategy (``codec_header.py`` prints the full comparison).

Run: ``python -m transferqueue bench transport [--quick]`` from the checkout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import torch
from _common import BareZmq, MiB, Table, p50, pct, rate

from transferqueue.config import Config
from transferqueue.runtime import codec
from transferqueue.runtime.loop import runtime_loop

PAYLOAD_MIB = 128
DTYPES = [torch.int64, torch.int64, torch.int64, torch.float32, torch.float32]


def payload(mib: int = PAYLOAD_MIB) -> tuple[list[torch.Tensor], int]:
    """5 tensors of shape (B, L): 3 int64, 2 float32, ``mib`` MiB in total."""
    b = 1024
    per_l = sum(torch.empty(0, dtype=d).element_size() for d in DTYPES)
    length = (mib * MiB) // (b * per_l)
    tensors = [torch.ones(b, length, dtype=d) for d in DTYPES]
    return tensors, sum(t.nbytes for t in tensors)


async def _timed_call(ref: Any, method: str, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = await ref.call(method, *args)
    return time.perf_counter() - t0, out


async def _empty_calls(ref: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await ref.call("noop")
        times.append(time.perf_counter() - t0)
    return times


def _zmq(quick: bool, table: Table, figures: dict[str, Any]) -> None:
    from _actors import Echo

    from transferqueue.runtime.transports.zmq import ZmqTransport

    loop = runtime_loop()
    tensors, nbytes = payload()
    frames = codec.encode(tensors)
    handle = loop.run(ZmqTransport(Config()).spawn(Echo))
    bare = BareZmq("echo")
    ref = handle.ref
    try:
        reps = 3 if quick else 7
        actor_t, bare_t = [], []
        for i in range(reps + 1):  # interleaved: machine noise hits both alike; first = warm-up
            dt, out = loop.run(_timed_call(ref, "echo", tensors))
            if len(out) != 5 or out[4].shape != tensors[4].shape:
                raise RuntimeError("echo returned something else")
            del out
            bt = bare.roundtrip(frames)
            if i:
                actor_t.append(dt)
                bare_t.append(bt)
        actor_gbps, bare_gbps = rate(2 * nbytes, p50(actor_t)), rate(2 * nbytes, p50(bare_t))
        table.add(
            "zmq 128 MiB echo (5 tensors)",
            actor_gbps,
            "GB/s",
            "bare pyzmq echo",
            bare_gbps,
            ">= 0.8x bare",
            actor_gbps >= 0.8 * bare_gbps,
        )
        n = 1000 if quick else 3000
        loop.run(_empty_calls(ref, 200))  # warm-up
        empty = loop.run(_empty_calls(ref, n))
        sync = []
        for _ in range(n):
            t0 = time.perf_counter()
            loop.run(ref.call("noop"))
            sync.append(time.perf_counter() - t0)
        request = codec.encode({"i": 0, "m": "noop", "a": [], "k": {}})
        for _ in range(200):
            bare.roundtrip(request)
        bare_empty = [bare.roundtrip(request) for _ in range(n)]
        e50, e99, b50 = p50(empty) * 1e3, pct(empty, 99) * 1e3, p50(bare_empty) * 1e3
        s50, s99 = p50(sync) * 1e3, pct(sync, 99) * 1e3
        table.add(
            "zmq empty call p50 (on the loop)",
            e50,
            "ms",
            "bare pyzmq p50",
            b50,
            "<= 0.3 ms",
            e50 <= 0.3,
        )
        table.add(
            "zmq empty call p99 (on the loop)",
            e99,
            "ms",
            "bare pyzmq p99",
            pct(bare_empty, 99) * 1e3,
        )
        table.add(
            "zmq empty call p50 (sync, thread hop)",
            s50,
            "ms",
            "bare pyzmq p50",
            b50,
            "<= 0.3 ms",
            s50 <= 0.3,
        )
        table.add("zmq empty call p99 (sync, thread hop)", s99, "ms")
        figures.update(
            zmq_echo_128MiB_GBps=actor_gbps,
            bare_pyzmq_echo_128MiB_GBps=bare_gbps,
            zmq_empty_p50_ms=e50,
            zmq_empty_p99_ms=e99,
            zmq_empty_sync_p50_ms=s50,
            zmq_empty_sync_p99_ms=s99,
            bare_pyzmq_empty_p50_ms=b50,
        )
    finally:
        bare.close()
        loop.run(handle.stop())


def _inproc(quick: bool, table: Table, figures: dict[str, Any]) -> None:
    from _actors import Echo

    from transferqueue.runtime.transports.inproc import InprocTransport

    loop = runtime_loop()
    handle = loop.run(InprocTransport(Config()).spawn(Echo))
    ref = handle.ref

    async def nothing() -> None:
        return None

    try:
        n = 2000 if quick else 5000
        actor_t, hop_t = [], []
        for i in range(n + 500):  # interleaved; the first 500 are warm-up
            t0 = time.perf_counter()
            loop.run(ref.call("noop"))
            t1 = time.perf_counter()
            loop.run(nothing())
            t2 = time.perf_counter()
            if i >= 500:
                actor_t.append(t1 - t0)
                hop_t.append(t2 - t1)
        a50, a99, h50 = p50(actor_t) * 1e6, pct(actor_t, 99) * 1e6, p50(hop_t) * 1e6
        table.add(
            "inproc empty call p50 (other thread)",
            a50,
            "us",
            "thread hop alone",
            h50,
            "<= 50 us",
            a50 <= 50,
        )
        table.add(
            "inproc empty call p99 (other thread)",
            a99,
            "us",
            "thread hop p99",
            pct(hop_t, 99) * 1e6,
        )
        figures.update(inproc_empty_p50_us=a50, inproc_empty_p99_us=a99, thread_hop_p50_us=h50)
    finally:
        loop.run(handle.stop())


def _ray(quick: bool, table: Table, figures: dict[str, Any]) -> None:
    try:
        import ray
    except ImportError:
        table.note("ray: not installed, skipped")
        return
    from _actors import Echo, RayEcho

    from transferqueue.runtime.transports.ray import RayTransport

    _common.setup_path()  # PYTHONPATH for the workers, before they start
    loop = runtime_loop()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    handle = None
    try:
        handle = loop.run(RayTransport(Config()).spawn(Echo))
        ref = handle.ref
        bare = ray.remote(RayEcho).options(num_cpus=0).remote()

        async def bare_calls(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                await bare.noop.remote()
                times.append(time.perf_counter() - t0)
            return times

        n = 100 if quick else 300
        loop.run(_empty_calls(ref, 30))
        loop.run(bare_calls(30))
        empty, bare_empty = loop.run(_empty_calls(ref, n)), loop.run(bare_calls(n))
        e50, b50 = p50(empty) * 1e3, p50(bare_empty) * 1e3
        table.add("ray empty call p50", e50, "ms", "bare async Ray actor", b50)
        table.add(
            "ray empty call p99",
            pct(empty, 99) * 1e3,
            "ms",
            "bare async Ray actor p99",
            pct(bare_empty, 99) * 1e3,
        )

        tensors, nbytes = payload()
        arrays = [t.numpy() for t in tensors]

        async def bare_echo() -> float:
            t0 = time.perf_counter()
            out = await bare.echo.remote(arrays)
            dt = time.perf_counter() - t0
            del out
            return dt

        def put_get() -> float:
            t0 = time.perf_counter()
            out = ray.get(ray.put(tensors))
            dt = time.perf_counter() - t0
            del out
            return dt

        reps = 2 if quick else 5
        actor_t, bare_t, pg_t = [], [], []
        for i in range(reps + 1):
            dt, out = loop.run(_timed_call(ref, "echo", tensors))
            del out
            bt, pt = loop.run(bare_echo()), put_get()
            if i:
                actor_t.append(dt)
                bare_t.append(bt)
                pg_t.append(pt)
        a, b, pg = (rate(2 * nbytes, p50(x)) for x in (actor_t, bare_t, pg_t))
        table.add("ray 128 MiB echo (5 tensors)", a, "GB/s", "bare Ray actor echo", b)
        table.add("ray 128 MiB echo vs put/get", a, "GB/s", "ray.put+ray.get", pg)
        figures.update(
            ray_empty_p50_ms=e50,
            ray_bare_empty_p50_ms=b50,
            ray_echo_128MiB_GBps=a,
            ray_bare_echo_128MiB_GBps=b,
            ray_put_get_128MiB_GBps=pg,
        )
    finally:
        if handle is not None:
            loop.run(handle.stop())
        if started:
            ray.shutdown()


def _codec(quick: bool, table: Table, figures: dict[str, Any]) -> None:
    """codec.encode + codec.decode (msgpack, what the wire uses) beside the same strategy
    written with msgspec (see codec_header.py: why msgpack was kept)."""
    import functools

    import codec_header as ch

    number = 500 if quick else 1000
    for key, label, obj in (
        ("small", "codec small header (with a tuple)", ch.SMALL_TUPLE),
        ("tensors", "codec header + 5 tensors", ch.WITH_TENSORS),
    ):
        ours = ch.best_us(functools.partial(ch._codec_full, obj), number)
        spec = ch.best_us(functools.partial(ch._msgspec_full, obj), number)
        table.add(f"{label}, enc+dec", ours, "us", "msgspec strategy", spec)
        figures[f"codec_{key}_us"] = ours
        figures[f"codec_{key}_msgspec_us"] = spec


def run(quick: bool = False) -> dict[str, Any]:
    table = Table(
        "transport (issue 2). Echo GB/s = 2 x payload / round trip; latencies are round trips"
    )
    figures: dict[str, Any] = {}
    try:
        _zmq(quick, table, figures)
        _inproc(quick, table, figures)
        _ray(quick, table, figures)
        _codec(quick, table, figures)
    finally:
        table.print()
    return figures


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
