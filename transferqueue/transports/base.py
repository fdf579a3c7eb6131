"""The transport interface: spawn an actor, connect to an address, send requests.

A transport is small on purpose (compare httpx's ``AsyncBaseTransport``):

* :meth:`Transport.spawn` starts an actor and returns an :class:`ActorHandle` (the owner's
  handle: a ref plus the power to stop the actor);
* :meth:`Transport.connect` turns an :class:`~transferqueue.actor.Address` into a
  :class:`Channel` in the process and event loop that uses it;
* a :class:`Channel` sends one request and awaits its reply; many may be in flight.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferqueue.actor import ActorRef, Address
    from transferqueue.config import Config


class Channel(abc.ABC):
    """A connection from one (process, event loop) to one actor."""

    @abc.abstractmethod
    async def request(
        self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], timeout: float | None
    ) -> Any:
        """Call ``method`` on the actor and return its result (or raise its error)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection. Idempotent."""


class ActorHandle(abc.ABC):
    """What the process that spawned an actor holds: a ref, and the power to stop it."""

    ref: ActorRef

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the actor (and its process, where it has one). Idempotent."""


class Transport(abc.ABC):
    name: str = ""
    #: whether the tensors of a reply are the receiving process's own memory (zmq: its
    #: receive buffers). Otherwise (inproc: the actor's memory; ray: read-only object-store
    #: memory) the client copies what it hands to callers.
    replies_owned: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config

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
