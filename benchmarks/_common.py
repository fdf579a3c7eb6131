"""Helpers shared by the ``bench_*`` modules: paths, timing statistics, the results table.

Not a benchmark itself (``python -m transferqueue bench`` only runs ``bench_*.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: GB means 1e9 bytes everywhere in this suite
GB = 1e9
MiB = 1 << 20


def setup_path() -> None:
    """Make ``benchmarks/`` (for ``_actors``) and the checkout (for ``transferqueue``)
    importable here, in spawned children (they inherit ``sys.path``) and in Ray workers
    (they read ``PYTHONPATH``)."""
    for p in (str(HERE), str(ROOT)):
        if p not in sys.path:
            sys.path.append(p)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for p in (str(HERE), str(ROOT)):
        if p not in parts:
            parts.append(p)
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


setup_path()


def vm_kib(pid: int, field: str) -> int | None:
    """``field`` (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status`` in KiB; None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pct(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=float), q))


def p50(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    a = abs(value)
    if a >= 100:
        text = f"{value:.0f}"
    elif a >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


@dataclass
class Row:
    """One figure: its value, the baseline measured in the same run, and the target."""

    name: str
    value: float | None
    unit: str
    base_label: str = ""
    base: float | None = None
    target: str = ""
    met: bool | None = None
    public: str = ""  # the public TransferQueue 0.1.11 figure quoted in the issue

    def ratio(self) -> float | None:
        """value / baseline (for a time, below 1 is better; for a rate, above 1)."""
        if self.value is None or not self.base:
            return None
        return self.value / self.base


class Table:
    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[Row | str] = []

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.rows.append(text)

    def print(self) -> None:
        has_public = any(isinstance(r, Row) and r.public for r in self.rows)
        header = ["figure", "value", "baseline (same run)", "ratio", "target", "met"]
        if has_public:
            header.append("public TQ 0.1.11 (from issue)")
        lines: list[list[str] | str] = []
        for r in self.rows:
            if isinstance(r, str):
                lines.append(r)
                continue
            ratio = r.ratio()
            cells = [
                r.name,
                fmt(r.value, r.unit),
                f"{r.base_label} {fmt(r.base, r.unit)}".strip() if r.base_label else "",
                f"{ratio:.2f}x" if ratio is not None else "",
                r.target,
                {True: "met", False: "NOT MET", None: ""}[r.met],
            ]
            if has_public:
                cells.append(r.public)
            lines.append(cells)
        print_grid(self.title, header, lines, right={1, 3})


def print_grid(
    title: str,
    header: list[str],
    lines: Sequence[list[str] | str],
    right: frozenset[int] | set[int] = frozenset(),
) -> None:
    """An aligned table; a ``str`` line is printed as a note under the rows."""
    cols = [x for x in lines if isinstance(x, list)] + [header]
    widths = [max(len(c[i]) for c in cols) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    print(title)
    print(render(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(f"  {line}" if isinstance(line, str) else render(line))
    sys.stdout.flush()


class BareZmq:
    """A blocking DEALER here, talking to :func:`_actors.bare_zmq_server` in a process of
    its own (started with ``python -c``: no torch import, so it starts in a blink)."""

    def __init__(self, reply: str) -> None:
        import subprocess

        import zmq

        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import _actors; _actors.bare_zmq_server({reply!r})"
        # the malloc settings transferqueue's processes use (transferqueue.runtime.memory), so the
        # bare server, too, receives into reused pages rather than fresh ones
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": str(2**30),
            "MALLOC_TRIM_THRESHOLD_": str(2**30),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self.proc.stdout is not None
        endpoint = self.proc.stdout.readline().decode().strip()
        if not endpoint.startswith("tcp://"):
            self.proc.kill()
            raise RuntimeError("the bare pyzmq server did not start")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def roundtrip(self, frames: list[Any]) -> float:
        """Seconds to send ``frames`` (zero-copy) and receive the reply."""
        t0 = time.perf_counter()
        self.sock.send_multipart(frames, copy=False)
        reply = self.sock.recv_multipart(copy=False)
        dt = time.perf_counter() - t0
        del reply
        return dt

    def close(self) -> None:
        import subprocess

        try:
            self.sock.send_multipart([b"stop"])
            if self.sock.poll(5000):
                self.sock.recv_multipart()
        finally:
            self.sock.close(linger=0)
            self.ctx.term()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


_shared: dict[str, Any] = {}


def zmq_config() -> Any:
    """The config of a zmq system (controller + 2 units) shared by the benchmarks of this
    process: starting one costs ~10 s on a small machine (3 interpreters importing torch),
    so it is started once. Benchmarks attach with ``tq.init(zmq_config())``; their
    ``tq.close()`` only disconnects. It is stopped when this process exits."""
    system = _shared.get("zmq")
    if system is None:
        from transferqueue.config import load_config
        from transferqueue.runtime.loop import runtime_loop
        from transferqueue.system import start_system

        system = runtime_loop().run(start_system(load_config({"transport": "zmq"})))
        _shared["zmq"] = system
        _at_exit(_stop_shared)
    return system.config


def _stop_shared() -> None:
    system = _shared.pop("zmq", None)
    if system is not None:
        from transferqueue.runtime.loop import runtime_loop

        runtime_loop().run(system.aclose(), timeout=60)


def _at_exit(fn: Any) -> None:
    """Run ``fn`` at exit while thread pools still work: stopping a zmq actor uses
    ``asyncio.to_thread``, which fails from a plain ``atexit`` hook (concurrent.futures shuts
    its pools down first). ``threading._register_atexit`` hooks run before that shutdown
    when registered after it (they run in reverse order)."""
    import concurrent.futures.thread  # noqa: F401  (its exit hook is registered first)
    import threading

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(fn)
    else:  # pragma: no cover - CPython < 3.9
        import atexit

        atexit.register(fn)


def rate(nbytes: float, seconds: float) -> float:
    """GB/s."""
    return nbytes / seconds / GB
