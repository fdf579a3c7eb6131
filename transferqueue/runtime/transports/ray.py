"""Ray transport: each actor is hosted in an async Ray actor.

Requests and replies go through the same codec as on zmq (the frames travel as bytes and
zero-copy numpy views, which Ray moves without copies), so every transport accepts exactly
the same payloads. Actors request 0 CPUs by default, so the default configuration starts
on a 2-CPU machine; ``ray.actor_options`` and ``ray.namespace`` are configurable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from transferqueue.config import Config
from transferqueue.errors import (
    ActorClosedError,
    ActorDiedError,
    TransportUnavailableError,
)
from transferqueue.runtime.transports import _protocol as protocol
from transferqueue.runtime.transports._protocol import Dispatcher, Envelope
from transferqueue.runtime.transports.base import ActorHandle, ActorRef, Address, Channel, Transport

#: how long stopping an actor waits for its on_stop hook before it is killed
_STOP_GRACE_S = 3.0

_forked_with_ray = False


def _after_fork_in_child() -> None:
    global _forked_with_ray
    _forked_with_ray = _forked_with_ray or ray.is_initialized()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_not_forked() -> None:
    if _forked_with_ray:
        raise TransportUnavailableError(
            "this process was forked from one connected to Ray, and Ray cannot be used after a "
            "fork: start worker processes with the spawn method (for a DataLoader: "
            "multiprocessing_context='spawn')"
        )


def _to_ray(frames: list[Any]) -> list[Any]:
    """Frames as Ray-serialisable objects: numpy views travel out of band, without copies."""
    out: list[Any] = [bytes(frames[0])]
    for frame in frames[1:]:
        out.append(np.frombuffer(frame, dtype=np.uint8) if len(memoryview(frame)) else b"")
    return out


class _RayHost:
    """The Ray actor that hosts one transferqueue actor."""

    def __init__(self, target: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._dispatcher = Dispatcher(target(*args, **kwargs))
        self._started: asyncio.Task[None] | None = None

    async def ready(self) -> int:
        """Starts the actor (once); returns the pid of the process that hosts it."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._dispatcher.start())
        await self._started
        return os.getpid()

    async def call(self, frames: list[Any]) -> list[Any]:
        await self.ready()
        return _to_ray(await self._dispatcher.serve(frames))

    async def stop(self) -> None:
        await self._dispatcher.stop()


def _cluster_address() -> str:
    """The Ray cluster to attach to: ``RAY_ADDRESS`` when set (Ray's own variable), else
    the one this machine runs ("auto")."""
    return os.environ.get("RAY_ADDRESS") or "auto"


def _ensure_ray(namespace: str) -> None:
    _check_not_forked()
    if not ray.is_initialized():
        ray.init(address=_cluster_address(), namespace=namespace, log_to_driver=False)


class RayChannel(Channel):
    def __init__(self, address: Address) -> None:
        self._name = address.endpoint
        self._namespace = address.namespace
        self._actor: Any = None
        self._closed = False

    def _handle(self) -> Any:
        if self._actor is None:
            _ensure_ray(self._namespace)
            try:
                self._actor = ray.get_actor(self._name, namespace=self._namespace)
            except ValueError:
                raise ActorDiedError(
                    f"no Ray actor {self._name!r} in {self._namespace!r}"
                ) from None
        return self._actor

    async def request(
        self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], deadline: float | None
    ) -> Any:
        if self._closed:
            raise ActorClosedError(f"the channel to Ray actor {self._name!r} is closed")
        # one call per Ray task: the reply needs no id (Ray matches it to its request)
        frames = _to_ray(protocol.encode_request(Envelope(0, method, deadline), args, kwargs))
        timeout = protocol.time_left(deadline)
        try:
            reply_frames = await asyncio.wait_for(self._handle().call.remote(frames), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"call {method!r} to Ray actor {self._name!r} got no reply within {timeout:.3g} s"
            ) from None
        except RayActorError as exc:
            raise ActorDiedError(f"the Ray actor {self._name!r} died: {exc}") from None
        return protocol.outcome(reply_frames)

    async def aclose(self) -> None:
        self._closed = True
        self._actor = None


class _RayHandle(ActorHandle):
    def __init__(self, actor: Any, ref: ActorRef, pid: int) -> None:
        self._actor = actor
        self.ref = ref
        self.pid = pid
        self._stopped = False

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.ref.aclose()
        if not ray.is_initialized():  # at exit Ray may have shut down first: nothing to stop
            return
        with contextlib.suppress(Exception):  # dead, or stuck: it is killed below either way
            await asyncio.wait_for(self._actor.stop.remote(), _STOP_GRACE_S)
        with contextlib.suppress(Exception):
            ray.kill(self._actor, no_restart=True)


class RayTransport(Transport):
    name = "ray"
    names_actors = True

    async def spawn(
        self,
        target: type,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> ActorHandle:
        namespace = self.config.ray.namespace
        _ensure_ray_started(namespace)
        # a named actor (e.g. the controller) can be found by name in its namespace
        actor_name = f"tq-{name}" if name else f"tq-{target.__name__}-{uuid.uuid4().hex[:10]}"
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 10_000}
        options.update(self.config.ray.actor_options)
        options.update(name=actor_name, namespace=namespace)
        actor = (
            ray.remote(_RayHost).options(**options).remote(target, tuple(args), dict(kwargs or {}))
        )
        ref = ActorRef(Address("ray", actor_name, namespace=namespace), self.config)
        try:
            pid = await actor.ready.remote()  # type: ignore[union-attr]
        except RayActorError as exc:
            raise ActorDiedError(
                f"the Ray actor for {target.__name__} failed to start: {exc}"
            ) from None
        return _RayHandle(actor, ref, pid)

    @classmethod
    def connect(cls, address: Address, config: Config) -> Channel:
        return RayChannel(address)

    @staticmethod
    def find_named(name: str, config: Config) -> Address | None:
        return find_named(name, config)

    @staticmethod
    def in_worker() -> bool:
        """Whether this process is a Ray worker (it runs Ray tasks or an actor)."""
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _ensure_ray_started(namespace: str) -> None:
    """Spawning starts a local Ray cluster if this process is not connected to one."""
    if not ray.is_initialized():
        ray.init(namespace=namespace, log_to_driver=False)


def find_named(name: str, config: Config) -> Address | None:
    """The address of the actor spawned as ``name`` in the configured namespace, if any."""
    namespace = config.ray.namespace
    if not ray.is_initialized():
        try:
            ray.init(address=_cluster_address(), namespace=namespace, log_to_driver=False)
        except ConnectionError:
            return None
    try:
        ray.get_actor(f"tq-{name}", namespace=namespace)
    except ValueError:
        return None
    return Address("ray", f"tq-{name}", namespace=namespace)
