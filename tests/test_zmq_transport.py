"""ZMQ-specific behaviour: garbage on the socket, actor processes never outlive owners."""

from __future__ import annotations

import asyncio
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
from transferqueue.errors import ActorError, ProtocolError
from transferqueue.runtime.actor import ActorRef
from transferqueue.runtime.transports._protocol import Envelope, decode_reply, encode_request
from transferqueue.runtime.transports.zmq import ZmqTransport


@pytest.fixture
async def zmq_echo():
    config = load_config({"transport": "zmq"})
    handle = await ZmqTransport(config).spawn(Echo)
    yield handle
    await handle.stop()


async def test_garbage_frames_get_error_replies_and_leave_the_actor_serving(zmq_echo) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(zmq_echo.ref.address.endpoint)

    async def ask(frames: list[bytes]) -> tuple:
        await sock.send_multipart(frames)
        return decode_reply(await asyncio.wait_for(sock.recv_multipart(), 30))

    try:
        for garbage in ([b""], [b"\xff\xfe garbage"], [b"\x93\x01\x02", b"x" * 100], [b"\xc1"] * 5):
            rid, _, error = await ask(garbage)
            assert rid is None and isinstance(error, ProtocolError), (garbage, error)
        # an envelope that decodes is answered under its id, whatever follows it
        rid, _, error = await ask([Envelope(41, "echo").encode(), b"\xc1"])
        assert rid == 41 and isinstance(error, ProtocolError)
        assert "arguments of call 41 ('echo')" in str(error)
        rid, _, error = await ask(encode_request(Envelope(42, "nope"), [], {}))
        assert rid == 42 and isinstance(error, ActorError) and "no remote method" in str(error)
        assert await ask(encode_request(Envelope(43, "echo"), ["raw"], {})) == (43, "raw", None)
        # a well-formed call after the garbage still gets its answer
        assert await zmq_echo.ref.call("echo", "still here") == "still here"
        assert await zmq_echo.ref.call("count") == 2
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_the_channels_one_deadline_timer_wakes_for_a_shorter_call(zmq_echo) -> None:
    # the actor process is stopped (SIGSTOP), so only the client's timer can end a call:
    # a shorter deadline armed behind a longer one must still expire, and firing must leave
    # the longer call waiting for its reply
    ref = zmq_echo.ref
    long = asyncio.ensure_future(ref.call("hold", "timer-long", timeout=60))
    await ref.call("entered", "timer-long")
    os.kill(zmq_echo.pid, signal.SIGSTOP)
    try:
        for _ in range(2):  # the second one arms the timer again after it fired
            with pytest.raises(TimeoutError, match="got no reply before its deadline"):
                await asyncio.wait_for(ref.call("echo", 1, timeout=0.2), 20)
        assert not long.done()
    finally:
        os.kill(zmq_echo.pid, signal.SIGCONT)
    await ref.call("release", "timer-long")
    assert await asyncio.wait_for(long, 20) == "timer-long"


async def test_a_channel_connects_whatever_inproc_endpoints_linger(zmq_echo) -> None:
    """pyzmq names a socket monitor's endpoint by the socket's fd, and libzmq frees a closed
    socket's endpoints later, on its own thread: a new channel whose socket got a fd just
    freed met the old name still bound ("Address already in use", seen once in a full
    nox run). Every name of that form is taken here: a channel must not need one."""
    from transferqueue.runtime.transports.zmq_pump import context

    squatter = context().socket(zmq.PAIR)
    try:
        for fd in range(2048):
            squatter.bind(f"inproc://monitor.s-{fd}")
        ref = ActorRef(zmq_echo.ref.address, load_config({"transport": "zmq"}))
        try:
            assert await ref.call("echo", "through") == "through"
        finally:
            await ref.aclose()
    finally:
        squatter.close(linger=0)


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
from transferqueue.errors import ActorError, ProtocolError
from transferqueue.runtime.actor import ActorRef
from transferqueue.runtime.transports._protocol import Envelope, decode_reply, encode_request
from transferqueue.runtime.transports.zmq import ZmqTransport

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
        assert wait_for_exit(actor_pid, 5), "actor process outlived its owner by 5 s"
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
