"""Watching a running system: the dispatcher's counters, ``tq.status()`` and
``python -m transferqueue status`` (``--json`` field by field on zmq; the live view once,
under a pseudo-terminal)."""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest
import torch
from tensordict import TensorDict

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.errors import PartitionNotFoundError
from transferqueue.ops.status import collect, controller_of, quantile, report
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports._protocol import (
    LATENCY_BOUNDS,
    STATS,
    Envelope,
    encode_request,
    outcome,
)
from transferqueue.system import System, start_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ the counters


class Worker:
    async def echo(self, value: Any) -> Any:
        return value

    async def fail(self) -> None:
        raise KeyError("nope")


async def _call(dispatcher: Dispatcher, rid: int, method: str, *args: Any) -> Any:
    frames = encode_request(Envelope(rid, method), args, {})
    return outcome(await dispatcher.serve(frames))


async def test_the_dispatcher_counts_calls_errors_and_latency_per_method() -> None:
    dispatcher = Dispatcher(Worker())
    for i in range(3):
        assert await _call(dispatcher, i, "echo", i) == i
    with pytest.raises(KeyError):
        await _call(dispatcher, 3, "fail")
    with pytest.raises(tq.ActorError):
        await _call(dispatcher, 4, "no_such_method")
    stats = await _call(dispatcher, 5, STATS)
    assert stats["actor"] == "Worker" and stats["pid"] == os.getpid()
    assert stats["bounds"] == list(LATENCY_BOUNDS)
    echo, fail, unknown = (stats["methods"][m] for m in ("echo", "fail", "?"))
    assert (echo["calls"], echo["in_flight"], echo["errors"]) == (3, 0, {})
    assert sum(echo["buckets"]) == 3 and echo["seconds"] >= 0
    assert fail["calls"] == 1 and fail["errors"] == {"KeyError": 1}
    assert unknown["errors"] == {"ActorError": 1}
    assert STATS not in stats["methods"]  # asking does not count
    assert stats["remote_methods"] == ["echo", "fail"]


def test_quantile_interpolates_within_its_bucket() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert quantile(bounds, [0, 0, 0, 0], 0.99) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.5)
    assert quantile(bounds, [0, 0, 100, 0], 0.99) == pytest.approx(2.0 + 2.0 * 0.99)
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 4.0  # above the last bound: a lower bound


def _snap(t: float, calls: int, buckets: list[int]) -> dict[str, Any]:
    requests = {
        "actor": "ControllerActor",
        "pid": 7,
        "started": 0.0,
        "time": t,
        "bounds": [1.0],
        "methods": {
            "commit": {
                "calls": calls,
                "in_flight": 0,
                "seconds": 0.0,
                "buckets": buckets,
                "errors": {},
            }
        },
    }
    return {
        "time": t,
        "system": {"controller": {"endpoint": "tcp://x"}},
        "partitions": [],
        "controller": {"requests": requests},
        "units": [],
    }


def test_the_system_wide_capacity_is_shown_where_the_controller_reports_it() -> None:
    snap = _snap(1.0, 0, [0, 0])
    assert report(snap)["storage"]["capacity_bytes"] is None
    snap["controller"]["capacity"] = {"capacity_bytes": 100, "used_bytes": 40, "reserved_bytes": 5}
    storage = report(snap)["storage"]
    assert (storage["capacity_bytes"], storage["used_bytes"], storage["reserved_bytes"]) == (
        100,
        40,
        5,
    )


def test_rates_come_from_two_snapshots_or_since_the_start() -> None:
    first, second = _snap(10.0, 20, [20, 0]), _snap(12.0, 30, [20, 10])
    since_start = report(first)["controller"]["requests"]["methods"]["commit"]
    assert since_start["per_s"] == pytest.approx(2.0) and since_start["p99_s"] < 1.0
    window = report(second, first)["controller"]["requests"]
    assert window["window_s"] == pytest.approx(2.0)
    commit = window["methods"]["commit"]
    assert commit["calls"] == 30 and commit["per_s"] == pytest.approx(5.0)
    assert commit["p99_s"] == 1.0  # the window's 10 calls all took more than 1 s
    assert window["methods"]["*"]["per_s"] == pytest.approx(5.0)


# ------------------------------------------------------------------------ a zmq system


@pytest.fixture(scope="module")
def zmq_system():
    started = runtime_loop().run(
        start_system(load_config({"transport": "zmq", "runtime": {"call_timeout": 60.0}}))
    )
    yield started
    runtime_loop().run(started.aclose())


def _address(system: System) -> str:
    return (system.config.system or {})["controller"]["endpoint"]


def _status_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transferqueue", "status", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=90,
    )


def _baseline(system: System) -> dict[str, Any]:
    controller = controller_of(system)
    try:
        return report(runtime_loop().run(collect(controller)))
    finally:
        runtime_loop().run(controller.aclose())


@pytest.mark.slow
def test_status_json_reports_a_running_zmq_system_field_by_field(
    zmq_system: System, python_env: dict[str, str]
) -> None:
    client, pid = zmq_system.client, "status-json"
    before = _baseline(zmq_system)["controller"]["requests"]["methods"]
    client.create_partition(pid, expected_size=8)
    td = TensorDict({"a": torch.arange(6), "b": torch.ones(6, 3)}, batch_size=[6])
    client.put(td, partition_id=pid)
    client.get_data(client.get_meta(["a", "b"], batch_size=4, partition_id=pid, task_name="train"))
    with pytest.raises(PartitionNotFoundError):
        client.partition_info("status-no-such-partition")
    # a consumer waiting for a field nobody has produced yet
    waiter = runtime_loop().submit(
        zmq_system.async_client.get_meta(["c"], 2, pid, "late", timeout=60)
    )
    while client.partition_info(pid).waiting.get("late", 0) != 1:
        pass
    try:
        proc = _status_cli(_address(zmq_system), "--json", "--interval", "0", env=python_env)
    finally:
        client.clear_partition(pid)
        concurrent.futures.wait([waiter], timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert set(data) == {
        "time",
        "interval_s",
        "controller",
        "metrics_url",
        "storage",
        "partitions",
        "units",
    }
    assert data["interval_s"] is None  # --interval 0: rates and p99s since each actor started

    (part,) = (p for p in data["partitions"] if p["partition_id"] == pid)
    assert part["size"] == 8 and part["expected_size"] == 8 and part["sealed"] is False
    assert part["pending"] == 2
    assert part["produced"] == {"a": 6, "b": 6}
    assert part["consumed"] == {"train": 4}
    assert part["leased"] is None or isinstance(part["leased"], dict)
    assert part["in_flight"] == 0 and part["lost"] == 0
    assert part["waiting"] == {"late": 1}

    ctl = data["controller"]
    assert ctl["address"] == _address(zmq_system) and ctl["owner_pid"] == os.getpid()
    if zmq_system.handles[0].pid is not None:
        assert ctl["pid"] == zmq_system.handles[0].pid
    methods = ctl["requests"]["methods"]
    assert methods["commit"]["calls"] - before.get("commit", {}).get("calls", 0) == 1
    assert methods["get_meta"]["calls"] - before.get("get_meta", {}).get("calls", 0) == 1
    assert methods["get_meta"]["in_flight"] == 1  # the waiting consumer
    assert 0 < methods["commit"]["p99_s"] < 60
    assert methods["partition_info"]["errors"].get("PartitionNotFoundError", 0) >= 1
    assert methods["*"]["per_s"] > 0 and methods["*"]["p99_s"] is not None

    units = data["units"]
    assert [u["unit_id"] for u in units] == [0, 1]
    assert [u["pid"] for u in units] == [h.pid for h in zmq_system.handles[1:]]
    assert sum(u["rows"] for u in units) >= 6
    assert sum(u["nbytes"] for u in units) >= 6 * 8 + 6 * 3 * 4
    assert sum(u["puts"] for u in units) >= 1 and sum(u["gets"] for u in units) >= 1
    assert all(u["puts_per_s"] >= 0 and u["gets_per_s"] >= 0 for u in units)
    assert all(u["capacity_bytes"] is None and u["waiting_puts"] == 0 for u in units)
    assert data["storage"]["unit_bytes"] == sum(u["nbytes"] for u in units)


def test_status_refuses_a_target_that_names_no_running_system(
    tmp_path: Any, python_env: dict[str, str]
) -> None:
    path = tmp_path / "inproc.yaml"
    path.write_text("transport: inproc\n")
    proc = _status_cli(str(path), "--json", env=python_env)
    assert proc.returncode == 2
    assert "attaches to a running system" in proc.stderr


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    return seen


@pytest.mark.slow
def test_the_live_view_renders_under_a_terminal(
    zmq_system: System, python_env: dict[str, str]
) -> None:
    pid = "status-live-view"
    zmq_system.client.create_partition(pid, expected_size=4)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**python_env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferqueue", "status", _address(zmq_system)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    os.close(slave)
    try:
        seen = _read_until(master, b"storage units", timeout=90)  # the table after partitions
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=30)
        _read_until(master, b"\0", timeout=0.5)  # let the child's last writes drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        zmq_system.client.clear_partition(pid)
    assert pid.encode() in seen, seen[-3000:]
    assert b"\x1b[" in seen  # a rich screen, with ANSI codes
    assert returncode == 0


# ------------------------------------------------------------------------ tq.status()


def test_tq_status_is_the_same_data_for_the_default_system() -> None:
    tq.init({"transport": "inproc"})
    try:
        client = tq.get_client()
        client.put(TensorDict({"x": torch.zeros(5, 2)}, batch_size=[5]), partition_id="p")
        client.get_meta(["x"], batch_size=5, partition_id="p", task_name="t")
        data = tq.status()
        assert set(data) == {
            "time",
            "interval_s",
            "controller",
            "metrics_url",
            "storage",
            "partitions",
            "units",
        }
        assert data["interval_s"] is None and data["metrics_url"] is None
        (part,) = data["partitions"]
        assert (part["partition_id"], part["size"], part["pending"]) == ("p", 5, 0)
        assert part["produced"] == {"x": 5} and part["consumed"] == {"t": 5}
        assert sum(u["rows"] for u in data["units"]) == 5
        methods = data["controller"]["requests"]["methods"]
        assert methods["commit"]["calls"] == 1 and methods["get_meta"]["calls"] == 1
        windowed = tq.status(interval=0.05)
        assert windowed["interval_s"] > 0
        assert windowed["controller"]["requests"]["window_s"] > 0
        json.dumps(data)  # plain data
    finally:
        tq.close()


def test_every_actor_answers_the_stats_request(system, pid) -> None:
    """On every transport: the controller and each unit count their requests."""
    system.client.put(TensorDict({"a": torch.arange(3)}, batch_size=[3]), partition_id=pid)
    controller = controller_of(system)
    try:
        data = report(runtime_loop().run(collect(controller)))
    finally:
        runtime_loop().run(controller.aclose())
    assert data["controller"]["requests"]["methods"]["commit"]["calls"] >= 1
    assert any(p["partition_id"] == pid for p in data["partitions"])
    assert len(data["units"]) == system.config.storage.units
    assert all(u["requests"] is not None and "error" not in u for u in data["units"])
    assert sum(u["puts"] for u in data["units"]) >= 1
