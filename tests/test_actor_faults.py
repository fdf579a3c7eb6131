"""Fail closed: deadlines travel, dead actors fail calls fast, dead owners take actors along.

Processes are killed with SIGKILL at points chosen by a barrier (an actor method that
returns once a call is running, a child that prints its actors' pids), never by a sleep.
The measured times are printed (``pytest -s`` shows them). Tests that start an owner
process of their own get a longer timeout: on a loaded 2-core machine, starting three
interpreters that import torch took up to 30 s.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from actors import Echo

from transferqueue.config import load_config
from transferqueue.errors import ActorDiedError
from transferqueue.runtime.transports import transport_class
from transferqueue.runtime.transports.base import ActorHandle, ActorRef

#: a dead actor's calls must fail within this (the call timeout below is 30 s)
DEATH_S = 2.0
#: stopping handles (and closing a system) whose actors died returns within this
STOP_S = 5.0


async def spawn_echo(base_config: dict) -> ActorHandle:
    config = load_config(base_config)
    return await transport_class(config.transport)(config).spawn(Echo)


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


async def test_deadline_passed_on_arrival_is_not_executed(base_config: dict) -> None:
    handle = await spawn_echo(base_config)
    try:
        with pytest.raises(TimeoutError):
            await handle.ref.call("hold", "never-run", timeout=0)
        await handle.ref.call("release", "never-run")
        assert await handle.ref.call("finished_gates") == []
    finally:
        await handle.stop()


async def test_handler_running_at_its_deadline_is_cancelled(base_config: dict) -> None:
    handle = await spawn_echo(base_config)
    try:
        call = asyncio.ensure_future(handle.ref.call("hold", "late", timeout=0.5))
        await handle.ref.call("entered", "late")
        with pytest.raises(TimeoutError):
            await call
        await handle.ref.call("cancelled", "late")  # the actor cancelled it at the deadline
        await handle.ref.call("release", "late")
        assert await handle.ref.call("finished_gates") == []
    finally:
        await handle.stop()


async def test_handler_sees_the_callers_deadline(base_config: dict) -> None:
    handle = await spawn_echo(base_config)
    try:
        before = time.time()
        seen = await handle.ref.call("deadline", timeout=30)
        assert before + 30 <= seen <= time.time() + 30
        assert await handle.ref.call("deadline", timeout=None) is None
    finally:
        await handle.stop()


@pytest.mark.timeout(90)  # a Ray actor's start on a loaded host; the bounds are asserted below
async def test_killed_actor_fails_waiting_and_later_calls_fast(
    base_config: dict, transport_name: str
) -> None:
    if transport_name == "inproc":
        pytest.skip("an inproc actor has no process of its own")
    handle = await spawn_echo(base_config)
    assert handle.pid is not None
    stopped = False
    try:
        waiting = [
            asyncio.ensure_future(handle.ref.call("hold", f"g{i}", timeout=30)) for i in range(3)
        ]
        for i in range(3):
            await handle.ref.call("entered", f"g{i}")  # barrier: every call is running
        started = time.monotonic()
        os.kill(handle.pid, signal.SIGKILL)
        for call in waiting:
            with pytest.raises(ActorDiedError):
                await call
        woke = time.monotonic() - started
        with pytest.raises(ActorDiedError):
            await handle.ref.call("echo", 1, timeout=30)
        later = time.monotonic() - started
        with pytest.raises(ActorDiedError):
            await handle.ref.call("echo", 2, timeout=30)
        again = time.monotonic() - started - later
        stop_started = time.monotonic()
        await handle.stop()
        stopped = True
        stop_s = time.monotonic() - stop_started
        print(
            f"\n[{transport_name}] waiting calls woke after {woke:.3f} s, a later call failed "
            f"after {later:.3f} s, the next in {again:.3f} s; stop took {stop_s:.3f} s"
        )
        assert later < DEATH_S, later
        assert again < DEATH_S / 2, again
        assert stop_s < STOP_S, stop_s
    finally:
        if not stopped:
            await handle.stop()


@pytest.mark.timeout(60)
async def test_system_whose_actors_died_closes_fast(base_config: dict, transport_name: str) -> None:
    if transport_name == "inproc":
        pytest.skip("inproc actors have no process of their own")
    from transferqueue.system import start_system

    # a namespace of its own: on ray the session's `system` fixture may hold the default
    # namespace's tq-controller already (it does when a test that uses it ran first)
    namespace = {"namespace": f"tq-closes-fast-{os.getpid()}"}
    config = load_config({**base_config, "storage": {"units": 2}, "ray": namespace})
    system = await start_system(config)
    try:
        pids = [h.pid for h in system.handles]
        assert all(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        for pid in pids:
            assert wait_for_exit(pid, 10)  # type: ignore[arg-type]
    finally:
        started = time.monotonic()
        await system.aclose()
        took = time.monotonic() - started
    print(f"\n[{transport_name}] closing a system whose actors died took {took:.3f} s")
    assert took < STOP_S, took


OWNER = """
import asyncio, os, sys
from actors import Echo
from transferqueue.config import load_config
from transferqueue.runtime.transports import transport_class

async def main():
    config = load_config({"transport": sys.argv[1], "ray": {"namespace": "tq-fault-owner"}})
    if sys.argv[1] == "ray":
        import ray
        ray.init(address=sys.argv[2], namespace="tq-fault-owner", log_to_driver=False)
    transport = transport_class(config.transport)(config)
    handles = [await transport.spawn(Echo) for _ in range(2)]
    print(" ".join(str(h.pid) for h in handles), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _kill_owner_and_time_actor_exits(argv: list[str], env: dict, within: float) -> float:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, *argv], stdout=subprocess.PIPE, env=env)
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()  # barrier: the owner's actors are serving
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        assert not wait_for_exit(pids[0], 0)  # alive while their owner lives
        started = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        for pid in pids:
            assert wait_for_exit(pid, within - (time.monotonic() - started)), (
                f"actor process {pid} outlived its owner by {within} s"
            )
        return time.monotonic() - started
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()


@pytest.mark.timeout(90)  # starting three interpreters that import torch takes most of it
def test_actors_exit_when_their_owner_is_killed(
    base_config: dict, transport_name: str, python_env: dict
) -> None:
    """zmq: the actor processes see their stdin close; ray: non-detached actors share their
    driver's fate."""
    if transport_name == "inproc":
        pytest.skip("inproc actors live in their owner's process")
    argv = [transport_name]
    if transport_name == "ray":
        import ray

        argv.append(ray.get_runtime_context().gcs_address)
    took = _kill_owner_and_time_actor_exits(argv, python_env, STOP_S)
    print(f"\n[{transport_name}] actor processes exited {took:.3f} s after their owner was killed")


def test_handle_ref_is_an_actor_ref(base_config: dict) -> None:
    from transferqueue.runtime import actor

    assert actor.ActorRef is ActorRef  # the runtime's front door re-exports it
