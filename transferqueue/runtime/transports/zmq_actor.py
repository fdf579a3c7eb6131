"""The actor process of the zmq transport: ``python -m transferqueue.runtime.transports.zmq_actor``.

Started by :class:`~transferqueue.runtime.transports.zmq.ZmqTransport` as a fresh interpreter. It
reads its start arguments (the owner's ``sys.path``, then target class, args, config) pickled
from its stdin -- process start arguments on a pipe, never the wire -- builds the actor,
binds a ROUTER socket, prints ``TQ-ADDRESS <endpoint>`` and serves requests concurrently
until its stdin closes (the owner closing it, or dying). With CURVE keys in its start
arguments (the owner's checked :class:`~transferqueue.runtime.transports.zmq_auth.ServerPlan`) the
ROUTER is a CURVE server admitting the allowed client keys only, and the process's own
connections use the server's pair; a wildcard bind is advertised under the plan's host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import sys
import tempfile
import threading
import uuid
from typing import Any

import zmq

from transferqueue.config import Config
from transferqueue.errors import ActorClosedError, ActorError, ProtocolError
from transferqueue.runtime.memory import tune_malloc_for_large_buffers
from transferqueue.runtime.transports import zmq_auth, zmq_shm
from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports._protocol import Envelope, encode_reply
from transferqueue.runtime.transports.zmq_pump import Pump
from transferqueue.runtime.transports.zmq_shm import same_host, tag_host

log = logging.getLogger("transferqueue.zmq")


class _Server:
    """The actor process's request loop over a ROUTER socket: handlers run concurrently.

    A request is dispatched in the callback that received it; a handler that finishes
    without suspending (most do) needs no task, and its reply joins the replies of the same
    wake-up, sent together two loop turns later (so that the waiters a ``commit`` woke run
    before its caller hears back, and the socket is drained once per batch, not once per
    reply). A handler that suspends goes on in a task and is answered when it ends.

    Every message that carries a routing identity is answered (the protocol turns each
    failure into an error reply). Large frames to and from peers on this host travel in
    shared memory (``shm``; tag the socket with :func:`tag_host` before it binds)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        sock: zmq.Socket[bytes],
        shm: zmq_shm.ShmSettings | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.shm = shm or zmq_shm.ShmSettings()
        self._tasks: set[asyncio.Future[list[Any]]] = set()
        self._out: list[list[Any]] = []  # replies waiting for the next flush
        self.pump = Pump(sock, self._on_request)

    def _on_request(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:  # no identity and message: nobody to answer
            log.warning("dropped a malformed message (%d frames)", len(frames))
            return
        ident = frames[0]
        body = [f.buffer for f in frames[1:]]
        owned = None  # the request's shared-memory frames, which its handler may keep
        if zmq_shm.is_descriptor(body[0]):
            try:
                if not self.shm.enabled:
                    raise ProtocolError("a shared-memory message, but zmq.shared_memory is off")
                body = zmq_shm.unpack(body, 0)
            except ActorError as exc:  # answer that request: its bytes cannot be had
                self._send([ident, *encode_reply(_request_id(body[1:]), False, exc)])
                return
            if self.shm.keep:
                owned = zmq_shm.owned(body)
        reply = self.dispatcher.serve_now(body, owned)
        if isinstance(reply, list):
            body.clear()  # a request's segment goes back to its sender as soon as it can
            if not self._out:
                self.pump.loop.call_soon(self._flush_soon)
            self._out.append(self._message(ident, reply))
            return
        self._tasks.add(reply)
        reply.add_done_callback(functools.partial(self._answer_later, ident, body))

    def _answer_later(
        self, ident: zmq.Frame, body: list[Any], reply: asyncio.Future[list[Any]]
    ) -> None:
        self._tasks.discard(reply)
        body.clear()
        if not reply.cancelled():
            self._send(self._message(ident, reply.result()))

    def _message(self, ident: zmq.Frame, reply: list[Any]) -> list[Any]:
        large = zmq_shm.large_frames(reply, 0, self.shm.min_bytes)
        if large:
            same = self.shm.enabled and same_host(ident)
            reply = zmq_shm.pack(reply, 0, self.shm, same, large)
        return [ident, *reply]

    def _flush_soon(self) -> None:
        # one more turn: the waiters woken by the handlers of these replies were scheduled
        # after this callback, and run before the flush (replies queued from now on wait
        # for a flush of their own)
        out, self._out = self._out, []
        self.pump.loop.call_soon(self._flush, out)

    def _flush(self, out: list[list[Any]]) -> None:
        for message in out:
            self._send(message, drain=False)
        self.pump.pump()  # the sends may have eaten the edge of a waiting request

    def _send(self, message: list[Any], drain: bool = True) -> None:
        try:
            self.pump.send(message, drain)
        except (zmq.ZMQError, ActorClosedError) as exc:  # the peer or we went away
            log.debug("could not send a reply: %s", exc)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._out.clear()
        self.pump.close()
        zmq_shm.sweep()


def _request_id(frames: list[Any]) -> int | None:
    with contextlib.suppress(Exception):
        return Envelope.decode(frames[0]).id
    return None


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
    plan: zmq_auth.ServerPlan = spec["plan"]
    zmq_auth.set_process_keys(plan.keys)  # before the actor exists: it may connect at once
    actor = spec["target"](*spec["args"], **spec["kwargs"])
    dispatcher = Dispatcher(actor)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    auth = zmq_auth.secure_server(ctx, sock, plan.keys) if plan.keys is not None else None
    shm = zmq_shm.ShmSettings.of(config.zmq)
    tag_host(sock, shm)  # before bind: a listener takes the socket's options when it binds
    sock.bind(_bind_endpoint(config))
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    endpoint = zmq_auth.advertise(bound, plan.advertise)
    await dispatcher.start()
    stop = asyncio.Event()
    threading.Thread(
        target=_watch_owner, args=(asyncio.get_running_loop(), stop), daemon=True
    ).start()
    sys.stdout.write(f"TQ-ADDRESS {endpoint}\n")
    sys.stdout.flush()
    os.dup2(2, 1)  # anything printed later goes to stderr, not the address pipe
    server = _Server(dispatcher, sock, shm)
    await stop.wait()
    server.close()
    await dispatcher.stop()
    if auth is not None:
        auth.stop()
    ctx.term()
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.unlink(endpoint[len("ipc://") :])


def main() -> None:
    """Entry point of an actor process: read the spec from stdin, serve until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides when we stop
    tune_malloc_for_large_buffers()  # large frames and buffers reuse heap pages
    sys.path[:] = pickle.load(sys.stdin.buffer)
    spec = pickle.load(sys.stdin.buffer)
    import torch

    torch.set_num_threads(max(1, int(spec["config"].zmq.actor_threads)))  # see ZmqConfig
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.run(_host(spec))
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        asyncio.run(_host(spec))
    # the actor has stopped and released its sockets: skip the interpreter's teardown (seconds
    # of module finalisation with torch loaded), so that an actor whose owner died is gone
    # at once
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
