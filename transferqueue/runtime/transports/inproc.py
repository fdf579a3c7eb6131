"""In-process transport: actors run on the runtime's background loop thread.

Callable from any thread or event loop of the process that hosts them. With
``runtime.inproc_codec`` (the default) every request and reply goes through the codec, so
a payload the other transports cannot carry is rejected here too. Errors always travel in
their wire form, so their types behave exactly as on zmq and ray.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Mapping
from typing import Any

from transferqueue.config import Config
from transferqueue.errors import ActorClosedError, TransportUnavailableError
from transferqueue.runtime.loop import LoopThread, runtime_loop
from transferqueue.runtime.memory import tune_malloc_for_large_buffers
from transferqueue.runtime.transports import _protocol as protocol
from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports._protocol import (
    Envelope,
    error_from_wire,
    error_to_wire,
)
from transferqueue.runtime.transports.base import ActorHandle, ActorRef, Address, Channel, Transport

_ids = itertools.count()
_hosted: dict[str, _Hosted] = {}
_hosted_lock = threading.Lock()


class _Hosted:
    def __init__(self, actor: Any, loop_thread: LoopThread) -> None:
        self.dispatcher = Dispatcher(actor)
        self.loop_thread = loop_thread
        self.pid = os.getpid()
        self.stopped = False


async def _serve(hosted: _Hosted, request: Any, check: bool) -> Any:
    """Runs on the actor's loop. With ``check``, ``request`` holds a request's frames and
    the reply frames come back; without, ``(envelope, args, kwargs)`` and ("ok", result) or
    ("err", wire error)."""
    if check:
        if hosted.stopped:
            return protocol.encode_reply(
                None, False, ActorClosedError("the actor was stopped by its owner")
            )
        return await hosted.dispatcher.serve(request)
    try:
        if hosted.stopped:
            raise ActorClosedError("the actor was stopped by its owner")
        return ("ok", await hosted.dispatcher.run(*request))
    except Exception as exc:
        return ("err", error_to_wire(exc))


async def _within(coro: Any, timeout: float | None) -> Any:
    """``await coro`` bounded by ``timeout``, without a Task where Python allows (3.11+)."""
    if timeout is None:
        return await coro
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await coro
    return await asyncio.wait_for(coro, timeout)  # pragma: no cover - Python 3.10


class InprocChannel(Channel):
    def __init__(self, hosted: _Hosted, config: Config) -> None:
        self._hosted = hosted
        self._check = config.runtime.inproc_codec
        self._ids = itertools.count()

    async def request(
        self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], deadline: float | None
    ) -> Any:
        envelope = Envelope(next(self._ids), method, deadline)
        # encode in the caller, so a payload the codec cannot carry fails here, as on zmq
        if self._check:
            request: Any = protocol.encode_request(envelope, args, kwargs)
        else:
            request = (envelope, args, kwargs)
        coro = _serve(self._hosted, request, self._check)
        loop = self._hosted.loop_thread.loop
        timeout = protocol.time_left(deadline)
        try:
            if asyncio.get_running_loop() is loop:
                reply = await _within(coro, timeout)
            else:
                fut = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
                reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"call {method!r} got no reply within {timeout:.3g} s") from None
        if self._check:
            return protocol.outcome(reply)
        status, value = reply
        if status == "err":
            raise error_from_wire(value)
        return value

    async def aclose(self) -> None:
        return None


class _InprocHandle(ActorHandle):
    def __init__(self, key: str, hosted: _Hosted, ref: ActorRef) -> None:
        self._key = key
        self._hosted = hosted
        self.ref = ref

    async def stop(self) -> None:
        if self._hosted.stopped:
            return
        self._hosted.stopped = True
        with _hosted_lock:
            _hosted.pop(self._key, None)
        loop = self._hosted.loop_thread.loop
        coro = self._hosted.dispatcher.stop()
        if asyncio.get_running_loop() is loop:
            await coro
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


class InprocTransport(Transport):
    name = "inproc"
    cross_process = False

    async def spawn(
        self,
        target: type,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> ActorHandle:
        loop_thread = runtime_loop()
        if self.config.zmq.tune_malloc:
            # this process hosts the actors: big buffers (store, results) reuse heap pages,
            # as in an actor process of the other transports (runtime/memory.py)
            tune_malloc_for_large_buffers()
        actor = target(*args, **dict(kwargs or {}))
        hosted = _Hosted(actor, loop_thread)
        start = hosted.dispatcher.start()
        if asyncio.get_running_loop() is loop_thread.loop:
            await start
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(start, loop_thread.loop))
        key = f"{name or target.__name__}-{next(_ids)}"
        with _hosted_lock:
            _hosted[key] = hosted
        ref = ActorRef(Address("inproc", key, pid=os.getpid()), self.config)
        return _InprocHandle(key, hosted, ref)

    @classmethod
    def connect(cls, address: Address, config: Config) -> Channel:
        if address.pid != os.getpid():
            raise TransportUnavailableError(
                "an inproc transferqueue system cannot be reached from another process; "
                "start it with transport 'zmq' or 'ray' to share it across processes"
            )
        with _hosted_lock:
            hosted = _hosted.get(address.endpoint)
        if hosted is None:
            raise ActorClosedError(f"no inproc actor {address.endpoint!r}: it was stopped")
        return InprocChannel(hosted, config)
