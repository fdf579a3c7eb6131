"""ZMQ-specific behaviour: garbage on the socket, actor processes never outlive owners."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio
from actors import Echo

from transferqueue.config import load_config
from transferqueue.transports.zmq import ZmqTransport


@pytest.fixture
async def zmq_echo():
    config = load_config({"transport": "zmq"})
    handle = await ZmqTransport(config).spawn(Echo)
    yield handle
    await handle.stop()


async def test_garbage_frames_leave_the_actor_serving(zmq_echo, caplog) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(zmq_echo.ref.address.endpoint)
    try:
        for garbage in ([b""], [b"\xff\xfe garbage"], [b"\x93\x01\x02", b"x" * 100], [b"\xc1"] * 5):
            await sock.send_multipart(garbage)
        # a well-formed call after the garbage still gets its answer
        assert await zmq_echo.ref.call("echo", "still here") == "still here"
        assert await zmq_echo.ref.call("count") == 1
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_ipc_addresses(tmp_path) -> None:
    config = load_config({"transport": "zmq", "zmq": {"protocol": "ipc", "ipc_dir": str(tmp_path)}})
    handle = await ZmqTransport(config).spawn(Echo)
    try:
        assert handle.ref.address.endpoint.startswith("ipc://" + str(tmp_path))
        assert await handle.ref.call("echo", [1, 2]) == [1, 2]
    finally:
        await handle.stop()


async def test_binds_loopback_by_default(zmq_echo) -> None:
    assert zmq_echo.ref.address.endpoint.startswith("tcp://127.0.0.1:")


OWNER = """
import asyncio, sys
from actors import Echo
from transferqueue.config import load_config
from transferqueue.transports.zmq import ZmqTransport

async def main():
    handle = await ZmqTransport(load_config({"transport": "zmq"})).spawn(Echo)
    print(handle.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True when process ``pid`` exits within ``timeout`` (event-driven: a pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_actor_process_exits_when_its_owner_dies(python_env, how) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, env=python_env)
    try:
        actor_pid = int(owner.stdout.readline())
        assert not wait_for_exit(actor_pid, 0)  # alive while its owner lives
        owner.send_signal(how)
        owner.wait(timeout=30)
        assert wait_for_exit(actor_pid, 15), "actor process outlived its owner"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


EXIT_WITHOUT_CLOSE = """
import transferqueue as tq
config = tq.init({"transport": "zmq", "storage": {"units": 1}})
print(config.system["controller"]["endpoint"], flush=True)
"""


def test_exit_without_close_stops_the_system_cleanly(python_env) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_CLOSE],
        capture_output=True,
        text=True,
        env=python_env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot schedule" not in proc.stderr
