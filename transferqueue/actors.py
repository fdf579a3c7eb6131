"""The actor runtime as a public API: run your own actor on inproc, zmq or ray.

An actor is an object whose public ``async def`` methods can be called from elsewhere: in
this process (``inproc``), from other processes and hosts (``zmq``), or across a Ray cluster
(``ray``). The code that spawns and calls it is the same on every transport::

    from transferqueue.actors import Actor, spawn

    class Counter(Actor):            # in an importable module, not __main__ (zmq, ray)
        def __init__(self, start: int = 0) -> None:
            self.value = start

        async def add(self, n: int = 1) -> int:
            self.value += n
            return self.value

    async with spawn(Counter, 10, transport="zmq") as counter:
        assert await counter.call("add", 5) == 15

This module is a thin layer over the runtime (:mod:`transferqueue.runtime.actor`,
:mod:`transferqueue.runtime.transports`, :mod:`transferqueue.errors`, :mod:`transferqueue.config`,
:mod:`transferqueue.runtime.loop`); it knows nothing of partitions, storage or clients. See
``docs/actors.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Generator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from transferqueue.config import TRANSPORTS, Config, load_config
from transferqueue.errors import (
    ActorClosedError,
    ActorDiedError,
    ActorError,
    ConfigError,
    ProtocolError,
    RemoteError,
    TransportUnavailableError,
)
from transferqueue.runtime.actor import DEFAULT, Actor, ActorRef, Address, current_deadline
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import (
    address_url,
    base,
    parse_address_url,
    transport_class,
)

__all__ = [
    "TRANSPORTS",
    "Actor",
    "ActorClosedError",
    "ActorDiedError",
    "ActorError",
    "ActorHandle",
    "ActorRef",
    "Address",
    "ProtocolError",
    "RemoteError",
    "TransportUnavailableError",
    "connect",
    "current_deadline",
    "run",
    "spawn",
]

T = TypeVar("T")


class ActorHandle:
    """What :func:`spawn` returns: the owner's handle of one actor.

    ``await`` it to start the actor (it returns itself), or use it as ``async with`` to
    start it and stop it at the end of the block. Then :attr:`ref` calls it, :attr:`url`
    names it for :func:`connect` in another process, and :meth:`aclose` (or :meth:`stop`)
    stops it: its :meth:`Actor.on_stop` runs and, on zmq and ray, its process ends.
    """

    def __init__(
        self,
        cls: type,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        config: Config,
        name: str | None,
    ) -> None:
        self._cls = cls
        self._args = args
        self._kwargs = dict(kwargs)
        self.config = config
        self._name = name
        self._inner: base.ActorHandle | None = None
        self._closed = False

    # -- starting -------------------------------------------------------------------------

    async def start(self) -> ActorHandle:
        """Start the actor (once; later calls return at once). Raises what its constructor
        or :meth:`Actor.on_start` raised: the type itself on inproc, an
        :class:`ActorError` (or :class:`ActorDiedError` on ray) on the others."""
        if self._closed:
            raise ActorClosedError(f"{self!r} was closed; spawn a new actor")
        if self._inner is None:
            transport = transport_class(self.config.transport)(self.config)
            self._inner = await transport.spawn(
                self._cls, self._args, self._kwargs, name=self._name
            )
        return self

    def __await__(self) -> Generator[Any, None, ActorHandle]:
        return self.start().__await__()

    async def __aenter__(self) -> ActorHandle:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- using ----------------------------------------------------------------------------

    def _started(self) -> base.ActorHandle:
        if self._inner is None:
            if self._closed:
                raise ActorClosedError(f"{self!r} was closed")
            raise RuntimeError(
                f"{self!r} is not started: `await spawn(...)` or `async with spawn(...)` first"
            )
        return self._inner

    @property
    def ref(self) -> ActorRef:
        """The actor's ref: picklable, it can be handed to other processes."""
        return self._started().ref

    @property
    def address(self) -> Address:
        return self.ref.address

    @property
    def url(self) -> str:
        """The actor's address as text, for :func:`connect` (e.g. in another process)."""
        return address_url(self.address)

    @property
    def pid(self) -> int | None:
        """The process that hosts the actor (zmq, ray); None on inproc (this process)."""
        return self._started().pid

    async def call(self, method: str, /, *args: Any, timeout: Any = DEFAULT, **kwargs: Any) -> Any:
        """``await self.ref.call(method, *args, timeout=timeout, **kwargs)``; after
        :meth:`aclose`, raises :class:`ActorClosedError` on every transport."""
        if self._closed:
            raise ActorClosedError(f"{self!r} was closed by its owner")
        return await self._started().ref.call(method, *args, timeout=timeout, **kwargs)

    # -- stopping -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the actor: its ``on_stop`` runs, its process (zmq, ray) ends. Idempotent."""
        self._closed = True
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.stop()

    async def stop(self) -> None:
        """The same as :meth:`aclose`."""
        await self.aclose()

    def __repr__(self) -> str:
        where = self.url if self._inner is not None else "not started"
        closed = ", closed" if self._closed else ""
        return f"ActorHandle({self._cls.__name__}, {self.config.transport}: {where}{closed})"


def _config(config: Config | Mapping[str, Any] | None, transport: str | None) -> Config:
    cfg = load_config(config)
    if transport is not None:
        if transport not in TRANSPORTS:
            raise ConfigError(
                f"transport must be one of {', '.join(TRANSPORTS)}; got {transport!r}"
            )
        cfg = dataclasses.replace(cfg, transport=transport)
    return cfg


def spawn(
    cls: type,
    /,
    *args: Any,
    transport: str | None = None,
    config: Config | Mapping[str, Any] | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> ActorHandle:
    """An actor ``cls(*args, **kwargs)`` on ``transport`` (default: ``config.transport``,
    which defaults to ``"inproc"``). ``await`` the result, or use it as ``async with``.

    ``config`` is a :class:`~transferqueue.config.Config` or a mapping of the same keys
    (timeouts, zmq host, Ray namespace and actor options). ``name`` is a label (on Ray, the
    actor's name in its namespace). The constructor arguments are the actor process's start
    arguments: any picklable values (calls, unlike them, carry only codec payloads). On zmq
    ``cls`` must be importable by module path (not defined in ``__main__``); on ray its
    module must be importable by the Ray workers too.
    """
    if not isinstance(cls, type):
        raise TypeError(f"spawn() takes an actor class, got {cls!r:.100}")
    cfg = _config(config, transport)
    if transport_class(cfg.transport).imports_actor_classes and cls.__module__ == "__main__":
        raise ConfigError(
            f"{cls.__name__} is defined in __main__, which a {cfg.transport} actor process "
            "cannot import; "
            "define the actor class in a module of its own and import it from there"
        )
    return ActorHandle(cls, args, kwargs, cfg, name)


def connect(
    address: Address | str, *, config: Config | Mapping[str, Any] | None = None
) -> ActorRef:
    """A ref to the actor at ``address``: an :class:`Address` or the text of
    :attr:`ActorHandle.url` (e.g. printed by another process). It connects lazily, on its
    first call; ``config`` gives its timeouts."""
    if isinstance(address, str):
        address = parse_address_url(address)
    elif not isinstance(address, Address):
        raise TypeError(f"connect() takes an Address or its url, got {address!r:.100}")
    return ActorRef(address, load_config(config))


def run(awaitable: Awaitable[T], timeout: float | None = None) -> T:
    """Run ``awaitable`` on the runtime's background event loop and block for its result:
    the synchronous way in, e.g. ``counter = run(spawn(Counter))`` then
    ``run(counter.call("add", 1))``. ``timeout`` bounds the wait (``TimeoutError``; the
    awaitable is cancelled). Not from inside a coroutine on that loop (``RuntimeError``)."""

    async def wait() -> T:
        return await awaitable

    return runtime_loop().run(wait(), timeout)
