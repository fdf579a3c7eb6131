"""The transport interface: spawn an actor, connect to an address, send requests.

A transport is small on purpose (compare httpx's ``AsyncBaseTransport``):

* :meth:`Transport.spawn` starts an actor and returns an :class:`ActorHandle` (the owner's
  handle: a ref plus the power to stop the actor);
* :meth:`Transport.connect` turns an :class:`Address` into a :class:`Channel` in the process
  and event loop that uses it;
* a :class:`Channel` sends one request and awaits its reply; many may be in flight. What
  the frames say is :mod:`transferqueue.runtime.transports._protocol`'s business.

:class:`ActorRef`, the picklable handle callers use, lives here too (and is re-exported by
:mod:`transferqueue.runtime.actor`) so that transports never import the layer above them.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transferqueue.runtime.loop import background
from transferqueue.runtime.transports._protocol import deadline_of

if TYPE_CHECKING:
    from transferqueue.config import Config

#: sentinel: "use the ref's default timeout"
DEFAULT: Any = object()


@dataclass(frozen=True)
class Address:
    """Where an actor lives. Plain data: picklable and codec-friendly."""

    transport: str
    endpoint: str
    namespace: str = ""
    #: the process that hosts an inproc actor
    pid: int = 0

    def to_plain(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "endpoint": self.endpoint,
            "namespace": self.namespace,
            "pid": self.pid,
        }

    @classmethod
    def from_plain(cls, data: Any) -> Address:
        return cls(**data)


class ActorRef:
    """A handle to an actor: ``await ref.call("method", *args, **kwargs)``.

    Picklable; a ref unpickled in another process connects afresh there. It connects lazily
    in the process and event loop that call it and never reuses a connection made before a
    fork.
    """

    def __init__(self, address: Address, config: Config | None = None) -> None:
        from transferqueue.config import Config

        self.address = address
        self.config = config if config is not None else Config()
        self._pid = os.getpid()
        self._channels: dict[asyncio.AbstractEventLoop, Channel] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorRef, (self.address, self.config))

    def __repr__(self) -> str:
        return f"ActorRef({self.address.transport}:{self.address.endpoint})"

    def _channel(self) -> Channel:
        if self._pid != os.getpid():  # forked: never reuse the parent's sockets
            self._channels = {}
            self._pid = os.getpid()
        loop = asyncio.get_running_loop()
        channel = self._channels.get(loop)
        if channel is None:
            # a new loop: forget the channels of loops that ended (each releases its
            # sockets when collected); looked for only here, not on every call
            for dead in [lp for lp in self._channels if lp.is_closed()]:
                del self._channels[dead]
            from transferqueue.runtime.transports import transport_class

            channel = transport_class(self.address.transport).connect(self.address, self.config)
            self._channels[loop] = channel
        return channel

    async def call(self, method: str, /, *args: Any, timeout: Any = DEFAULT, **kwargs: Any) -> Any:
        """Call ``method`` on the actor; ``timeout`` (seconds; None, passed explicitly: no
        deadline) overrides the configured default. The call carries the absolute deadline
        (wall clock); the actor does not start it later and cancels it then. Raises
        ``TimeoutError`` when it expires."""
        if timeout is DEFAULT:
            timeout = self.config.runtime.call_timeout
        return await self._channel().request(method, args, kwargs, deadline_of(timeout))

    async def aclose(self) -> None:
        """Close this ref's connection in the running event loop (others close with it)."""
        channels, self._channels = self._channels, {}
        current = asyncio.get_running_loop()
        for loop, channel in channels.items():
            if loop is current:
                await channel.aclose()
            elif not loop.is_closed():
                # never wait on another loop: it may be the one blocked on this call
                loop.call_soon_threadsafe(_close_later, channel)
            # a channel of a closed loop releases its sockets when collected


def _close_later(channel: Channel) -> None:
    background(channel.aclose(), "closing a connection")


class Channel(abc.ABC):
    """A connection from one (process, event loop) to one actor."""

    @abc.abstractmethod
    async def request(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        deadline: float | None,
    ) -> Any:
        """Call ``method`` on the actor and return its result (or raise its error).
        ``deadline`` is wall-clock seconds (``time.time()``), None for none; past it the
        call raises ``TimeoutError``."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection. Idempotent."""


class ActorHandle(abc.ABC):
    """What the process that spawned an actor holds: a ref, and the power to stop it."""

    ref: ActorRef
    #: the process that hosts the actor, where it has one of its own (zmq, ray)
    pid: int | None = None
    #: the node that hosts the actor, as :meth:`Transport.local_node` names nodes (ray)
    node: str | None = None

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the actor (and its process, where it has one). Idempotent."""


class Transport(abc.ABC):
    name: str = ""
    #: whether the tensors of a reply are the receiving process's own memory (zmq: its
    #: receive buffers). Otherwise (inproc: the actor's memory; ray: read-only object-store
    #: memory) the client copies what it hands to callers.
    replies_owned: bool = False
    #: whether other processes can reach this transport's actors (inproc: no)
    cross_process: bool = True
    #: whether an actor class must be importable by module path in the actor's own process
    #: (so not defined in ``__main__``): zmq starts a fresh interpreter
    imports_actor_classes: bool = False
    #: whether ``spawn(name=...)`` registers a name other processes find (``find_named``)
    names_actors: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config

    @staticmethod
    def in_worker() -> bool:
        """Whether this process is a worker this transport started (a Ray task or actor)."""
        return False

    @staticmethod
    def find_named(name: str, config: Config) -> Address | None:
        """The address of the actor spawned as ``name``, if this transport names actors and
        one is running; ``None`` otherwise."""
        return None

    @abc.abstractmethod
    async def spawn(
        self,
        target: type,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> ActorHandle:
        """Start ``target(*args, **kwargs)`` as an actor."""

    @classmethod
    @abc.abstractmethod
    def connect(cls, address: Address, config: Config) -> Channel:
        """Open a channel to ``address`` in the calling process and event loop."""

    def nodes_for(self, units: int) -> tuple[str | None, list[str | None]]:
        """Where to start the controller and each storage unit (passed to :meth:`spawn` as
        ``node=``; None: wherever the transport starts actors). Only the ray transport places
        actors on nodes (the placement keys are refused on the others); the number of units
        may differ from ``units`` (``storage.units_per_node``)."""
        return None, [None] * units

    @staticmethod
    def local_node() -> str | None:
        """The node this process runs on, named as :meth:`nodes_for` names them (None:
        the transport does not tell nodes apart)."""
        return None
