"""ZMQ transport: each actor runs in a process of its own and serves a ROUTER socket.

* The actor process is started as a fresh interpreter (``python -m
  transferqueue.transports.zmq``), never by forking a process that holds torch or Ray
  threads. Its start arguments (target class, args, config) arrive on its stdin; the
  process exits when its owner closes that pipe -- or dies, which closes it too: no
  orphans.
* Clients use one DEALER per (process, event loop, actor); many requests are in flight on
  it and replies are matched by request id.
* A socket monitor notices a peer that went away: calls in flight then fail with
  :class:`~transferqueue.errors.ActorDiedError` at once, not after their timeout.
* Servers bind to loopback unless ``zmq.host`` says otherwise; ports come from the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from transferqueue import codec
from transferqueue.actor import ActorRef, Address, Dispatcher, error_from_wire, error_to_wire
from transferqueue.config import Config
from transferqueue.errors import ActorClosedError, ActorDiedError, ActorError
from transferqueue.transports.base import ActorHandle, Channel, Transport

log = logging.getLogger("transferqueue.zmq")

#: after a disconnect, how long a new call waits for the peer to come back
_DEATH_GRACE_S = 1.0
_contexts: dict[int, zmq.asyncio.Context] = {}


def _context() -> zmq.asyncio.Context:
    """One asyncio context per process (a forked child makes its own)."""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        ctx = _contexts[pid] = zmq.asyncio.Context()
    return ctx


def _buffers(frames: list[zmq.Frame]) -> list[memoryview]:
    return [f.buffer for f in frames]


class ZmqChannel(Channel):
    """A DEALER connected to one actor, bound to the event loop that created it."""

    def __init__(self, address: Address, config: Config) -> None:
        self._endpoint = address.endpoint
        self._connect_timeout = config.runtime.connect_timeout
        self._sock = _context().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(self._endpoint)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._connected = asyncio.Event()
        self._ever_connected = False
        self._closed = False
        self._tasks = [
            asyncio.ensure_future(self._read_replies()),
            asyncio.ensure_future(self._watch()),
        ]

    async def _read_replies(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                reply = codec.decode(_buffers(frames))
                fut = self._pending.pop(reply["i"], None)
            except Exception:
                log.warning("dropped a malformed reply from %s", self._endpoint)
                continue
            if fut is None or fut.done():
                continue
            if "e" in reply:
                fut.set_exception(error_from_wire(reply["e"]))
            else:
                fut.set_result(reply.get("r"))

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self._ever_connected = True
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected.clear()
                self._fail_pending(ActorDiedError(f"the actor at {self._endpoint} went away"))

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _await_connected(self) -> None:
        if self._connected.is_set():
            return
        wait = _DEATH_GRACE_S if self._ever_connected else self._connect_timeout
        try:
            await asyncio.wait_for(self._connected.wait(), wait)
        except asyncio.TimeoutError:
            what = "went away" if self._ever_connected else "cannot be reached"
            raise ActorDiedError(f"the actor at {self._endpoint} {what}") from None

    async def request(
        self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], timeout: float | None
    ) -> Any:
        if self._closed:
            raise ActorClosedError(f"the channel to {self._endpoint} is closed")
        rid = next(self._ids)
        frames = codec.encode({"i": rid, "m": method, "a": list(args), "k": dict(kwargs)})
        await self._await_connected()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._sock.send_multipart(frames, copy=False)
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"call {method!r} to {self._endpoint} got no reply within {timeout} s"
            ) from None
        finally:
            self._pending.pop(rid, None)

    def __del__(self) -> None:
        # a channel whose event loop ended without aclose(): release the sockets quietly
        if not getattr(self, "_closed", True):
            self._closed = True
            for sock in (self._monitor, self._sock):
                with contextlib.suppress(Exception):
                    sock.close(linger=0)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending(ActorClosedError(f"the channel to {self._endpoint} was closed"))
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)


# --------------------------------------------------------------------------- server side


class _Server:
    """The actor process's request loop over a ROUTER socket."""

    def __init__(self, dispatcher: Dispatcher, sock: zmq.asyncio.Socket) -> None:
        self.dispatcher = dispatcher
        self.sock = sock
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            if len(frames) < 2:
                log.warning("dropped a malformed message (%d frames)", len(frames))
                continue
            try:
                request = codec.decode(_buffers(frames[1:]))
                rid, method = request["i"], request["m"]
                args, kwargs = request.get("a", []), request.get("k", {})
            except Exception as exc:
                log.warning("dropped a malformed message: %s", exc)
                continue
            task = asyncio.ensure_future(self._handle(frames[0], rid, method, args, kwargs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(
        self, ident: zmq.Frame, rid: Any, method: Any, args: Any, kwargs: Any
    ) -> None:
        try:
            result = await self.dispatcher.handle(method, args, kwargs)
            reply = codec.encode({"i": rid, "r": result})
        except Exception as exc:
            reply = codec.encode({"i": rid, "e": error_to_wire(exc)})
        try:
            await self.sock.send_multipart([ident, *reply], copy=False)
        except zmq.ZMQError as exc:  # the peer went away; nothing to answer
            log.debug("could not send a reply: %s", exc)


def _bind_endpoint(config: Config) -> str:
    if config.zmq.protocol == "ipc":
        folder = config.zmq.ipc_dir or tempfile.gettempdir()
        return f"ipc://{os.path.join(folder, f'tq-{uuid.uuid4().hex[:12]}.sock')}"
    return f"tcp://{config.zmq.host}:*"


def _watch_owner(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Block on stdin until the owner closes it (or dies), then stop the actor."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    finally:
        loop.call_soon_threadsafe(stop.set)


async def _host(spec: dict[str, Any]) -> None:
    config: Config = spec["config"]
    actor = spec["target"](*spec["args"], **spec["kwargs"])
    dispatcher = Dispatcher(actor)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.bind(_bind_endpoint(config))
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    await dispatcher.start()
    stop = asyncio.Event()
    threading.Thread(
        target=_watch_owner, args=(asyncio.get_running_loop(), stop), daemon=True
    ).start()
    sys.stdout.write(f"TQ-ADDRESS {endpoint}\n")
    sys.stdout.flush()
    os.dup2(2, 1)  # anything printed later goes to stderr, not the address pipe
    server = asyncio.ensure_future(_Server(dispatcher, sock).serve())
    await stop.wait()
    server.cancel()
    await dispatcher.stop()
    sock.close(linger=0)
    ctx.term()
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.unlink(endpoint[len("ipc://") :])


def main() -> None:
    """Entry point of an actor process: read the spec from stdin, serve until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides when we stop
    sys.path[:] = pickle.load(sys.stdin.buffer)
    spec = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.run(_host(spec))
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        asyncio.run(_host(spec))


# ------------------------------------------------------------------------ owner side


class _ZmqHandle(ActorHandle):
    def __init__(self, proc: subprocess.Popen[bytes], ref: ActorRef) -> None:
        self._proc = proc
        self.ref = ref
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.ref.aclose()
        await asyncio.to_thread(self._terminate)

    def _terminate(self) -> None:
        proc = self._proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _start_process(spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferqueue.transports.zmq"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches the owner only; the owner stops us
    )
    if proc.stdin is None:  # pragma: no cover - Popen with PIPE always sets it
        raise ActorError("could not open the actor process's stdin")
    pickle.dump(list(sys.path), proc.stdin)
    pickle.dump(spec, proc.stdin)
    proc.stdin.flush()
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _read_address(proc: subprocess.Popen[bytes]) -> str:
    line = proc.stdout.readline().decode() if proc.stdout is not None else ""
    if not line.startswith("TQ-ADDRESS "):
        _reap(proc)
        raise ActorError(
            f"the actor process exited before it served (exit code {proc.returncode}); "
            "its error is printed above"
        )
    return line.split(" ", 1)[1].strip()


class ZmqTransport(Transport):
    name = "zmq"

    async def spawn(
        self,
        target: type,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> ActorHandle:
        spec = {
            "target": target,
            "args": tuple(args),
            "kwargs": dict(kwargs or {}),
            "config": self.config,
        }
        proc = _start_process(spec)
        try:
            endpoint = await asyncio.wait_for(
                asyncio.to_thread(_read_address, proc), self.config.zmq.start_timeout
            )
        except asyncio.TimeoutError:
            _reap(proc)
            raise ActorError(
                f"the actor process for {target.__name__} did not start within "
                f"{self.config.zmq.start_timeout} s"
            ) from None
        return _ZmqHandle(proc, ActorRef(Address("zmq", endpoint), self.config))

    @classmethod
    def connect(cls, address: Address, config: Config) -> Channel:
        return ZmqChannel(address, config)


if __name__ == "__main__":
    main()
