"""The actor runtime: Address, ActorRef, request dispatch, errors that travel.

An actor is any object whose public ``async def`` methods may be called remotely. A
transport (``transports/``) hosts it and carries requests; :class:`ActorRef` is the
picklable handle callers use: it connects lazily in the process and event loop that call
it and never reuses a connection made before a fork.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import logging
import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transferqueue import errors
from transferqueue.loop import background

if TYPE_CHECKING:
    from transferqueue.config import Config
    from transferqueue.transports.base import Channel

log = logging.getLogger("transferqueue.actor")

#: sentinel: "use the ref's default timeout"
DEFAULT = object()

_TRAVELLING_BUILTINS = ("ValueError", "TypeError", "KeyError", "TimeoutError")


class Actor:
    """Optional base class: lifecycle hooks an actor may override."""

    async def on_start(self) -> None:
        """Called once on the actor's loop before the first request."""

    async def on_stop(self) -> None:
        """Called once when the actor is stopped by its owner."""


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

    Picklable; a ref unpickled in another process connects afresh there.
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
        for dead in [lp for lp in self._channels if lp.is_closed()]:
            del self._channels[dead]  # its channel releases its sockets when collected
        channel = self._channels.get(loop)
        if channel is None:
            from transferqueue.transports import transport_class

            channel = transport_class(self.address.transport).connect(self.address, self.config)
            self._channels[loop] = channel
        return channel

    async def call(self, method: str, /, *args: Any, timeout: Any = DEFAULT, **kwargs: Any) -> Any:
        """Call ``method`` on the actor; ``timeout`` (seconds, None = forever) overrides the
        configured default. Raises ``TimeoutError`` when it expires."""
        if timeout is DEFAULT:
            timeout = self.config.runtime.call_timeout
        return await self._channel().request(method, args, kwargs, timeout)

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


class Dispatcher:
    """Server side: turns a request into a method call on the actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._methods = {
            name: getattr(actor, name)
            for name, fn in inspect.getmembers(type(actor))
            if not name.startswith("_")
            and inspect.iscoroutinefunction(fn)
            and name not in ("on_start", "on_stop")
        }

    async def handle(self, method: Any, args: Any, kwargs: Any) -> Any:
        fn = self._methods.get(method) if isinstance(method, str) else None
        if fn is None:
            raise errors.ActorError(
                f"{type(self.actor).__name__} has no remote method {method!r}; "
                f"available: {', '.join(sorted(self._methods))}"
            )
        return await fn(*args, **kwargs)

    async def start(self) -> None:
        hook = getattr(self.actor, "on_start", None)
        if hook is not None:
            await hook()

    async def stop(self) -> None:
        hook = getattr(self.actor, "on_stop", None)
        if hook is not None:
            await hook()


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """An exception as plain data (codec-safe)."""
    cls = type(exc)
    args = [a for a in exc.args if isinstance(a, (str, int, float, bool, type(None)))]
    if len(args) != len(exc.args):
        args = [str(exc)]
    if isinstance(exc, errors.RemoteError):
        args = [exc.args[0] if exc.args else "", exc.remote_type, exc.remote_traceback]
    return {
        "type": cls.__name__,
        "module": cls.__module__,
        "args": args,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def error_from_wire(data: dict[str, Any]) -> BaseException:
    """Rebuild an exception: same type for transferqueue errors and a few builtins."""
    name, module = data.get("type", ""), data.get("module", "")
    cls: Any = None
    if module == errors.__name__:
        cls = getattr(errors, name, None)
    elif module == "builtins" and name in _TRAVELLING_BUILTINS:
        cls = getattr(builtins, name)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return cls(*data.get("args", []))  # type: ignore[no-any-return]
        except Exception:  # an exotic constructor: fall back to RemoteError below
            pass
    return errors.RemoteError(
        f"{module}.{name}: {data.get('message', '')}", f"{module}.{name}", data.get("traceback", "")
    )
