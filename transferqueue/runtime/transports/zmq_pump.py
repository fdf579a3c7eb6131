"""A plain (blocking-API) pyzmq socket driven by an asyncio event loop (:class:`Pump`),
and the process's one zmq context: what the zmq channels (:mod:`.zmq`) and the actor
servers (:mod:`.zmq_actor`) both stand on. A reader callback on the socket's
edge-triggered FD drains it with non-blocking calls, which costs far less than
``zmq.asyncio``; frames travel zero-copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from transferqueue.errors import ActorClosedError

log = logging.getLogger("transferqueue.zmq")

#: messages one reader callback handles before it lets the loop run other work
_BATCH = 64
# plain ints: pyzmq's flag enums cost a lot on the hot path
_POLLIN, _POLLOUT, _EVENTS = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.EVENTS)
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
_contexts: dict[int, zmq.Context[zmq.Socket[bytes]]] = {}
_IO_THREADS = 2

__all__ = ["Pump", "context", "release"]


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """One context per process (a forked child makes its own). Two I/O threads: a get
    receives from every storage unit at once, and one thread copying all streams out of the
    kernel was the bottleneck (128 MiB get from 2 units: ~145 ms -> ~110 ms)."""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        ctx = _contexts[pid] = zmq.Context(io_threads=_IO_THREADS)
    return ctx


class Pump:
    """A plain zmq socket driven by an event loop.

    The socket's FD is edge-triggered: it only says "EVENTS may have changed", and any send
    or receive may consume that edge. So every callback and every send re-reads EVENTS and
    drains until nothing is left. Sends that would block wait in an outbox flushed here.
    """

    def __init__(self, sock: zmq.Socket[bytes], on_message: Callable[[list[Any]], None]) -> None:
        self.sock, self.on_message, self.copy = sock, on_message, sock.type == zmq.PAIR
        self.loop = loop = asyncio.get_running_loop()
        self.closed = self._busy = False
        self._outbox: deque[list[Any]] = deque()
        self._fd: int = sock.get(zmq.FD)  # type: ignore[assignment]
        loop.add_reader(self._fd, self.pump)
        loop.call_soon(self.pump)  # messages may already wait: no edge would announce them

    def send(self, frames: list[Any], drain: bool = True) -> None:
        """Queue ``frames`` (zero-copy when large); sends at once unless it would block.
        ``drain=False``: the caller calls :meth:`pump` itself after a batch of sends."""
        if self.closed:
            raise ActorClosedError("the socket is closed")
        if self._outbox or not self._try_send(frames):
            self._outbox.append(frames)
        if drain and not self._busy:  # the send may have eaten the edge of a waiting message
            self.pump()

    def _try_send(self, frames: list[Any]) -> bool:
        sock = self.sock
        try:
            for frame in frames[:-1]:  # a multipart message is atomic: only its first
                sock.send(frame, _MORE, copy=False)  # part can raise Again
            sock.send(frames[-1], _NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _recv(self) -> list[Any]:
        sock = self.sock
        if self.copy:
            return sock.recv_multipart(_NOBLOCK)
        parts = [sock.recv(_NOBLOCK, copy=False)]
        while parts[-1].more:
            parts.append(sock.recv(_NOBLOCK, copy=False))
        return parts

    def pump(self) -> None:
        """Receive what is waiting and flush the outbox, until EVENTS says nothing is left."""
        if self.closed or self._busy:
            return
        self._busy = True
        try:
            for _ in range(_BATCH):
                events: int = self.sock.get(_EVENTS)  # type: ignore[assignment]
                if events & _POLLIN:
                    frames = self._recv()
                    try:
                        self.on_message(frames)
                    except Exception:  # one bad message must not stall the socket
                        log.exception("could not handle a message")
                elif self._outbox and events & _POLLOUT and self._try_send(self._outbox[0]):
                    self._outbox.popleft()
                else:
                    return
                if self.closed:
                    return
            self.loop.call_soon(self.pump)  # more waits: let other callbacks run first
        except zmq.ZMQError as exc:
            log.debug("socket error: %s", exc)
        finally:
            self._busy = False

    def close(self) -> None:
        """Idempotent. Call on the loop's thread, or once the loop no longer runs."""
        if self.closed:
            return
        self.closed = True
        if not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._fd)
        self._outbox.clear()
        self.sock.close(linger=0)


def release(pumps: list[Pump]) -> None:
    """Close ``pumps`` from wherever the garbage collector runs: on their loop while it
    runs, else here."""
    loop = pumps[0].loop

    def close_all() -> None:
        for p in pumps:
            with contextlib.suppress(Exception):
                p.close()

    if loop.is_running():
        with contextlib.suppress(RuntimeError):  # closed meanwhile: fall through
            loop.call_soon_threadsafe(close_all)
            return
    close_all()
