"""ZMQ transport: each actor runs in a process of its own and serves a ROUTER socket.

* The actor process (:mod:`transferqueue.runtime.transports.zmq_actor`) is started as a fresh
  interpreter, never by forking a process that holds torch or Ray
  threads. Its start arguments (target class, args, config) arrive on its stdin; the
  process exits when its owner closes that pipe -- or dies, which closes it too: no
  orphans.
* Clients use one DEALER per (process, event loop, actor); many requests are in flight on
  it and replies are matched by request id.
* Sockets are plain (blocking-API) pyzmq sockets driven by the event loop: a reader
  callback on the socket's edge-triggered FD drains it with non-blocking calls
  (:class:`~.zmq_pump.Pump`), which costs far less than ``zmq.asyncio``. Frames travel zero-copy.
* A socket monitor notices a peer that went away: calls in flight then fail with
  :class:`~transferqueue.errors.ActorDiedError` at once, not after their timeout.
* Servers bind to loopback unless ``zmq.host`` says otherwise; ports come from the OS.
  Beyond loopback they require CURVE keys (:mod:`transferqueue.runtime.transports.zmq_auth`); a
  handshake the peer refuses fails the channel's calls with
  :class:`~transferqueue.errors.AuthenticationError` at once.
* Between peers on one host, large frames travel through shared memory
  (:mod:`transferqueue.runtime.transports.zmq_shm`): each side names its host in the
  handshake's metadata (:func:`~.zmq_shm.tag_host`), and a message to a peer of the same host carries a
  descriptor of a memfd segment in place of those frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from transferqueue.config import Config
from transferqueue.errors import ActorClosedError, ActorDiedError, ActorError, AuthenticationError
from transferqueue.runtime.memory import tune_malloc_for_large_buffers
from transferqueue.runtime.transports import zmq_auth, zmq_shm
from transferqueue.runtime.transports._protocol import CANCEL, Calls, encode_reply
from transferqueue.runtime.transports.base import ActorHandle, ActorRef, Address, Channel, Transport
from transferqueue.runtime.transports.zmq_pump import Pump, context, release

log = logging.getLogger("transferqueue.zmq")

#: after a disconnect, how long a new call waits for the peer to come back
_DEATH_GRACE_S = 1.0
_NO_DETAIL_WITH_KEYS = (
    "the server ended the handshake: is zmq.curve.server_key_file / server_public the "
    "server's public key?"
)
_NO_DETAIL_WITHOUT_KEYS = (
    "the server ended the handshake: it may require CURVE keys (zmq.curve: the server's "
    "public key and a client key pair it allows)"
)
_HANDSHAKE_FAILED = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): _NO_DETAIL_WITH_KEYS,
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "the handshake failed: one side uses CURVE and the "
    "other not (zmq.curve: the server's public key and a client key pair it allows)",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "the server refused this client's CURVE key (its "
    "public key is not among the server's allowed clients)",
}
_T = TypeVar("_T")


def _reply_id(frames: list[Any]) -> int | None:
    with contextlib.suppress(Exception):
        return int(msgpack.unpackb(frames[0])[0])
    return None


#: numbers the channels' socket monitors (their inproc endpoints' names)
_MONITORS = itertools.count()


class ZmqChannel(Channel):
    """A DEALER connected to one actor, bound to the event loop that created it."""

    def __init__(self, address: Address, config: Config) -> None:
        self._endpoint = address.endpoint
        self._connect_timeout = config.runtime.connect_timeout
        self._loop = asyncio.get_running_loop()
        self._keys = zmq_auth.client_keys(config.zmq)  # ConfigError: CURVE without a client pair
        self._shm = zmq_shm.ShmSettings.of(config.zmq)
        #: whether the actor is on this host (None: no reply yet said so)
        self._same_host: bool | None = None
        sock = context().socket(zmq.DEALER)
        zmq_shm.tag_host(sock, self._shm)
        for opt, value in ((zmq.LINGER, 0), (zmq.RECONNECT_IVL, 100), (zmq.HEARTBEAT_IVL, 1000)):
            sock.setsockopt(opt, value)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if self._keys is not None:
            zmq_auth.secure_client(sock, self._keys)
        # a name of its own: pyzmq's default names the endpoint by the socket's fd, which a
        # closed socket's endpoint may still hold (libzmq frees it later, on its thread)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH,
            addr=f"inproc://tq-monitor-{os.getpid()}-{next(_MONITORS)}",
        )
        sock.connect(self._endpoint)
        self._calls = Calls(self._endpoint)
        self._connected = asyncio.Event()
        self._ever_connected = False
        #: the peer went away and did not come back within the grace (or refused to): calls
        #: fail at once
        self._gone = False
        #: why the peer refused our handshake (None: it did not); calls then fail at once
        self._refused: str | None = None
        self._handshaken = False  # a handshake ever succeeded
        self._news = asyncio.Event()  # set (and replaced) on every connection event
        self._monitor = Pump(monitor, self._on_event)  # a PAIR: receives copies
        self._pump = Pump(sock, self._on_reply)
        self._closed = False
        #: rid -> (loop time of its deadline, its future, its method), and the one timer
        self._deadlines: dict[int, tuple[float, asyncio.Future[Any], str]] = {}
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = math.inf

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        if self._same_host is None:
            self._same_host = self._shm.enabled and zmq_shm.same_host(frames[0])
        bufs = [f.buffer for f in frames]
        if zmq_shm.is_descriptor(bufs[0]):
            try:
                bufs = zmq_shm.unpack(bufs, 0)
            except ActorError as exc:  # fail that call: its bytes cannot be had
                bufs = encode_reply(_reply_id(bufs[1:]), False, exc)
        self._calls.receive(bufs)

    def _on_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)["event"]
        if event in _HANDSHAKE_FAILED:
            self._on_handshake_failed(event)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshaken = True
            self._refused = None
        elif event == zmq.EVENT_CONNECTED:
            self._ever_connected = True
            self._gone = False
            self._connected.set()
        elif event == zmq.EVENT_DISCONNECTED:
            self._connected.clear()
            if self._refused is None:
                self._calls.fail_all(ActorDiedError(f"the actor at {self._endpoint} went away"))
        elif event == zmq.EVENT_CONNECT_RETRIED and self._ever_connected:
            # a reconnect was refused: nothing listens there any more (actors never come back
            # on the same endpoint), so there is no point waiting out the grace
            self._gone = True
        self._news.set()
        self._news = asyncio.Event()

    def _on_handshake_failed(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            if self._handshaken:
                return  # a connection lost during a handshake, not a refusal: a disconnect follows
            # the server hung up in the first handshake: a server key that does not match,
            # or (without keys) a server that requires them; retried: a success clears it
            self._refused = _NO_DETAIL_WITH_KEYS if self._keys else _NO_DETAIL_WITHOUT_KEYS
        else:  # refused: libzmq does not retry after AUTH or PROTOCOL failures
            self._refused = _HANDSHAKE_FAILED[event]
        self._calls.fail_all(self._refusal())

    def _refusal(self) -> AuthenticationError:
        return AuthenticationError(f"the actor at {self._endpoint} refused us: {self._refused}")

    async def _await_connected(self) -> None:
        wait = _DEATH_GRACE_S if self._ever_connected else self._connect_timeout
        give_up = self._loop.time() + wait
        while not self._connected.is_set():
            if self._refused is not None:
                raise self._refusal()
            left = give_up - self._loop.time()
            if self._gone or left <= 0:
                self._gone = self._ever_connected
                what = "went away" if self._ever_connected else "cannot be reached"
                raise ActorDiedError(f"the actor at {self._endpoint} {what}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._news.wait(), left)

    async def request(
        self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], deadline: float | None
    ) -> Any:
        if self._closed:
            raise ActorClosedError(f"the channel to {self._endpoint} is closed")
        if self._refused is not None:
            raise self._refusal()
        envelope, frames = self._calls.request(method, args, kwargs, deadline, token=-1)
        if not self._connected.is_set():
            await self._await_connected()
            if self._closed:
                raise ActorClosedError(f"the channel to {self._endpoint} is closed")
            if self._refused is not None:  # refused in the same batch of events
                raise self._refusal()
        large = zmq_shm.large_frames(frames, 0, self._shm.min_bytes)  # one pass per message
        if large:
            if self._shm.enabled and self._same_host is None:
                # ask (a no-op): its reply names the actor's host
                await self.request(CANCEL, (), {}, deadline)
            frames = zmq_shm.pack(frames, 0, self._shm, bool(self._same_host), large)
        fut = self._calls.expect(envelope.id)
        if deadline is not None:
            at = self._loop.time() + max(0.0, deadline - time.time())
            self._deadlines[envelope.id] = (at, fut, method)
            if at < self._watch_at:  # the watchdog must wake up earlier
                self._arm(at)
        try:
            self._pump.send(frames)
            return await fut
        except asyncio.CancelledError:  # the caller gave up: so does the actor
            if not self._closed and not self._pump.closed:
                self._pump.send(self._calls.request(CANCEL, (), {}, None, envelope.token)[1])
            raise
        finally:
            self._calls.forget(envelope.id)
            self._deadlines.pop(envelope.id, None)

    def _arm(self, at: float) -> None:
        # one timer per channel, not one per call (~5 us each): it wakes at the earliest
        # deadline (calls mostly share the default timeout, so rarely re-armed)
        if self._watch is not None:
            self._watch.cancel()
        self._watch_at, self._watch = at, self._loop.call_at(at, _watch, weakref.ref(self))

    def _expire_due(self) -> None:
        self._watch, self._watch_at, left = None, math.inf, math.inf
        now = self._loop.time() + 0.001  # the loop's timers are ms-grained
        for rid, (at, fut, method) in list(self._deadlines.items()):
            if at > now:
                left = min(left, at)
                continue
            del self._deadlines[rid]
            if not fut.done():
                why = f"call {method!r} to {self._endpoint} got no reply before its deadline"
                fut.set_exception(TimeoutError(why))
        if left < math.inf:
            self._arm(left)

    def __del__(self) -> None:
        # a channel dropped (or whose event loop ended) without aclose(): release its sockets
        if not getattr(self, "_closed", True):
            self._closed = True
            release([self._monitor, self._pump])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._calls.fail_all(ActorClosedError(f"the channel to {self._endpoint} was closed"))
        self._pump.sock.disable_monitor()
        self._monitor.close()
        self._pump.close()
        zmq_shm.sweep()


def _watch(ref: weakref.ref[ZmqChannel]) -> None:
    channel = ref()  # the timer does not keep a dropped channel alive
    if channel is not None:
        channel._expire_due()


# ------------------------------------------------------------------------ owner side


async def _in_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a thread of its own. Unlike ``asyncio.to_thread`` this works while the
    interpreter shuts down (an atexit close), when executors take no new work."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():  # the awaiting side gave up (a timeout)
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as exc:  # handed to the awaiting side
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="tq-zmq-wait", daemon=True).start()
    return await fut


class _ZmqHandle(ActorHandle):
    def __init__(self, proc: subprocess.Popen[bytes], ref: ActorRef) -> None:
        self._proc = proc
        self.ref = ref
        self.pid = proc.pid
        self._stopped = False

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.ref.aclose()
        await _in_thread(self._terminate)

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
        [sys.executable, "-m", "transferqueue.runtime.transports.zmq_actor"],
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
    imports_actor_classes = True
    replies_owned = True
    _plan: zmq_auth.ServerPlan | None = None

    async def spawn(
        self,
        target: type,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> ActorHandle:
        if self._plan is None:  # the bind rule, checked before any process starts
            self._plan = zmq_auth.server_plan(self.config.zmq)
        spec = {
            "target": target,
            "args": tuple(args),
            "kwargs": dict(kwargs or {}),
            "config": self.config,
            "plan": self._plan,
        }
        proc = _start_process(spec)
        try:
            endpoint = await asyncio.wait_for(
                _in_thread(lambda: _read_address(proc)), self.config.zmq.start_timeout
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
        if config.zmq.tune_malloc:
            tune_malloc_for_large_buffers()  # replies land in reused heap pages
        return ZmqChannel(address, config)
