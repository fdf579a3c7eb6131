"""Ray transport: each actor is hosted in an async Ray actor.

Ray places the actors (``storage.units_per_node`` / ``storage.nodes`` / ``controller.node``:
node-affinity or custom-resource scheduling), starts and stops them and finds the named
controller. Requests and replies take one of two data paths (``ray.data_path``):

* ``"zmq"`` (the default): the Ray actor serves the zmq transport's ROUTER socket on its
  node's IP (:mod:`.ray_zmq`); a ref calls it over zmq, and a dead actor's socket tells its
  callers at once (``ActorDiedError``). The actor's address carries its zmq endpoint.
* ``"ray"``: every request is a Ray actor task (frames as bytes and zero-copy numpy views).

Either way the frames are the same codec's, so every transport accepts exactly the same
payloads. Actors request 0 CPUs by default, so the default configuration starts on a 2-CPU
machine; ``ray.actor_options`` and ``ray.namespace`` are configurable.
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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from transferqueue.config import Config
from transferqueue.errors import (
    ActorClosedError,
    ActorDiedError,
    ConfigError,
    TransportUnavailableError,
)
from transferqueue.runtime.transports import _protocol as protocol
from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports._protocol import Envelope
from transferqueue.runtime.transports.base import ActorHandle, ActorRef, Address, Channel, Transport
from transferqueue.runtime.transports.zmq_shm import ShmSettings

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


#: separates a Ray actor's name from its zmq endpoint in an address's ``endpoint``
_SEP = "|"


class _RayHost:
    """The Ray actor that hosts one transferqueue actor."""

    def __init__(
        self, target: type, args: tuple[Any, ...], kwargs: dict[str, Any], serve: dict[str, Any]
    ) -> None:
        self._dispatcher = Dispatcher(target(*args, **kwargs))
        self._serve = serve  # the zmq data path: {"host": ...}; {} for Ray tasks
        self._server: Any = None
        self._started: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        await self._dispatcher.start()
        if self._serve:
            import torch

            from transferqueue.runtime.memory import tune_malloc_for_large_buffers
            from transferqueue.runtime.transports.ray_zmq import ZmqServing

            # as in a zmq actor process: big frames reuse heap pages; few torch threads
            tune_malloc_for_large_buffers()
            torch.set_num_threads(max(1, int(self._serve.get("threads", 1))))

            host = self._serve.get("host") or ray.util.get_node_ip_address()
            self._server = ZmqServing(self._dispatcher, host, self._serve.get("shm"))

    async def ready(self) -> dict[str, Any]:
        """Starts the actor (once); returns its process id, node and zmq endpoint."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await self._started
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "zmq": self._server.endpoint if self._server is not None else "",
        }

    async def call(self, frames: list[Any]) -> list[Any]:
        await self.ready()
        return _to_ray(await self._dispatcher.serve(frames))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
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
    """Requests as Ray actor tasks; or, when the actor serves zmq, over its socket."""

    def __init__(self, address: Address, config: Config) -> None:
        self._name, _, self._zmq_endpoint = address.endpoint.partition(_SEP)
        self._namespace = address.namespace
        self._config = config
        self._actor: Any = None
        self._zmq: Channel | None = None
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
        if self._zmq is None and not self._zmq_endpoint and self._actor is None:
            await self._discover(deadline)  # an address by name only (find_named)
        if self._zmq_endpoint:
            if self._zmq is None:
                from transferqueue.runtime.transports import ray_zmq

                self._zmq = ray_zmq.connect(self._zmq_endpoint, self._config)
            return await self._zmq.request(method, args, kwargs, deadline)
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

    async def _discover(self, deadline: float | None) -> None:
        """Ask the actor (by its Ray name) for the zmq endpoint it serves, if any."""
        try:
            ready = await asyncio.wait_for(
                self._handle().ready.remote(), protocol.time_left(deadline)
            )
        except asyncio.TimeoutError:
            raise TimeoutError(f"Ray actor {self._name!r} did not answer in time") from None
        except RayActorError as exc:
            raise ActorDiedError(f"the Ray actor {self._name!r} died: {exc}") from None
        self._zmq_endpoint = ready["zmq"]

    async def aclose(self) -> None:
        self._closed = True
        self._actor = None
        if self._zmq is not None:
            await self._zmq.aclose()


class _RayHandle(ActorHandle):
    def __init__(self, actor: Any, ref: ActorRef, ready: dict[str, Any]) -> None:
        self._actor = actor
        self.ref = ref
        self.pid = ready["pid"]
        self.node = ready["node"]
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
        node: str | None = None,
    ) -> ActorHandle:
        """``node``: a Ray node id or the name of a custom resource the node has."""
        cfg = self.config.ray
        namespace = cfg.namespace
        _ensure_ray_started(namespace)
        # a named actor (e.g. the controller) can be found by name in its namespace
        actor_name = f"tq-{name}" if name else f"tq-{target.__name__}-{uuid.uuid4().hex[:10]}"
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 10_000}
        if node is not None:
            options.update(_node_options(node))
        options.update(cfg.actor_options)
        options.update(name=actor_name, namespace=namespace)
        serve: dict[str, Any] = {"host": cfg.host, "threads": self.config.zmq.actor_threads}
        serve["shm"] = ShmSettings.of(self.config.zmq)  # same-node refs: shared memory
        if cfg.data_path != "zmq":
            serve = {}
        actor = (
            ray.remote(_RayHost)
            .options(**options)
            .remote(target, tuple(args), dict(kwargs or {}), serve)
        )
        try:
            ready = await actor.ready.remote()  # type: ignore[union-attr]
        except RayActorError as exc:
            raise ActorDiedError(
                f"the Ray actor for {target.__name__} failed to start: {exc}"
            ) from None
        endpoint = f"{actor_name}{_SEP}{ready['zmq']}" if ready["zmq"] else actor_name
        ref = ActorRef(Address("ray", endpoint, namespace=namespace), self.config)
        return _RayHandle(actor, ref, ready)

    def nodes_for(self, units: int) -> tuple[str | None, list[str | None]]:
        """The controller's node (``controller.node``, default: this driver's) and one node
        per storage unit: ``storage.units_per_node`` on each of ``storage.nodes`` (default:
        every alive node), or ``storage.units`` round robin over ``storage.nodes``."""
        _ensure_ray_started(self.config.ray.namespace)
        controller = self.config.controller.node or ray.get_runtime_context().get_node_id()
        per_node = self.config.storage.units_per_node
        if self.config.storage.nodes is None and per_node is None:
            return controller, [None] * units
        targets = list(self.config.storage.nodes or ())
        if not targets:
            targets = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        for t in targets:
            _node_options(t)  # a clear error for a name no node has, before anything starts
        if per_node is not None:
            return controller, [t for t in targets for _ in range(per_node)]
        return controller, [targets[i % len(targets)] for i in range(units)]

    @staticmethod
    def local_node() -> str | None:
        """This process's Ray node id (None when it is not connected to Ray)."""
        if _forked_with_ray or not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_node_id()

    @classmethod
    def connect(cls, address: Address, config: Config) -> Channel:
        return RayChannel(address, config)

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


def _node_options(node: str) -> dict[str, Any]:
    """Ray actor options that place an actor on ``node`` (a node id or a custom resource)."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    if any(n["NodeID"] == node for n in alive):
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
    if any(node in n["Resources"] for n in alive):
        return {"resources": {node: 0.001}}  # a sliver of the node's own resource
    raise ConfigError(
        f"no alive Ray node has the id or custom resource {node!r} (storage.nodes / "
        f"controller.node name nodes by id or by a resource only they have)"
    )


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
