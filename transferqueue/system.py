"""Starting, attaching to and stopping a transferqueue system; the default client.

``tq.init(config)`` starts a controller and ``storage.units`` storage units on the
configured transport and returns the effective config, which names the running system.
Handing that config to ``tq.init`` in another process attaches to the same system instead
of starting a second one. Only the process that started a system stops it on
``tq.close()``; other processes just disconnect.

The one module-level singleton of the library lives here: the default system behind
``tq.init`` / ``tq.get_client()``.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import os
import threading
from typing import Any

from transferqueue.actor import ActorRef, Address
from transferqueue.client import AsyncTransferQueueClient, TransferQueueClient
from transferqueue.config import Config, apply_env, load_config
from transferqueue.controller.actor import ControllerActor
from transferqueue.errors import ConfigError, NotInitializedError, TransportUnavailableError
from transferqueue.loop import runtime_loop
from transferqueue.storage.unit import StorageUnit
from transferqueue.transports import transport_class
from transferqueue.transports.base import ActorHandle


class System:
    """A started or attached system: its config, client and (for the owner) actor handles."""

    def __init__(self, config: Config, handles: list[ActorHandle]) -> None:
        self.config = config
        self.handles = handles
        self.pid = os.getpid()
        self.async_client = self.new_async_client()
        self.client = TransferQueueClient(self.async_client)

    def new_async_client(self) -> AsyncTransferQueueClient:
        """A client with connections of its own to this system's actors."""
        info = self.config.system or {}
        controller = ActorRef(Address.from_plain(info["controller"]), self.config)
        units = [ActorRef(Address.from_plain(u), self.config) for u in info["units"]]
        return AsyncTransferQueueClient(controller, units, self.config)

    @property
    def is_owner(self) -> bool:
        return bool(self.handles)

    async def aclose(self) -> None:
        from transferqueue import metrics

        await metrics.astop(self)
        await self.async_client.close()
        # the controller first: it watches the units, and they going away is no fault then
        if self.handles:
            await self.handles[0].stop()
        await asyncio.gather(*(h.stop() for h in self.handles[1:]))
        self.handles = []


async def start_system(config: Config) -> System:
    """Spawn a controller and the storage units on ``config.transport``."""
    transport = transport_class(config.transport)(config)
    # where each actor runs (ray: storage.units_per_node / storage.nodes / controller.node)
    controller_node, unit_nodes = transport.nodes_for(config.storage.units)
    n = len(unit_nodes)
    controller_name = "controller" if config.transport == "ray" else None
    # the capacity is one system-wide bound, kept by the controller when it admits puts
    controller_options = {
        "num_units": n,
        "stripe_rows": config.storage.stripe_rows,
        "capacity_bytes": config.storage.capacity_bytes,
        "block_when_full": config.storage.block_when_full,
        "put_lease_s": config.controller.put_lease_s,
    }
    spawned = await asyncio.gather(
        transport.spawn(
            ControllerActor,
            (config.controller.pre_allocate, config.controller.sampler),
            controller_options,
            name=controller_name,
            **_on(controller_node),
        ),
        *(
            transport.spawn(StorageUnit, (i, n, None, False), **_on(unit_nodes[i]))
            for i in range(n)
        ),
        return_exceptions=True,
    )
    handles = [h for h in spawned if isinstance(h, ActorHandle)]
    failures = [e for e in spawned if isinstance(e, BaseException)]
    if failures:
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
        raise failures[0]
    info = {
        "controller": handles[0].ref.address.to_plain(),
        "units": [h.ref.address.to_plain() for h in handles[1:]],
        "unit_nodes": [h.node for h in handles[1:]],
        "owner_pid": os.getpid(),
    }
    await handles[0].ref.call("set_system", info)
    return System(dataclasses.replace(config, system=info), handles)


def _on(node: str | None) -> dict[str, Any]:
    """``spawn`` keywords that place an actor on ``node`` (none: where the transport likes)."""
    return {} if node is None else {"node": node}


def attach_system(config: Config) -> System:
    info = config.system
    if info is None:
        raise ConfigError("config.system is empty: there is no running system to attach to")
    if "units" not in info:  # only the controller's address: ask it for the rest
        controller = info["controller"]
        if isinstance(controller, str):
            controller = {"transport": config.transport, "endpoint": controller}
        ref = ActorRef(Address.from_plain(controller), config)
        try:
            info = runtime_loop().run(ref.call("system_info"))
        finally:
            runtime_loop().run(ref.aclose())
        config = dataclasses.replace(config, system=info)
    transport_class(config.transport)  # a clear error when its dependency is missing
    if config.transport == "inproc" and info.get("owner_pid") != os.getpid():
        raise TransportUnavailableError(
            "an inproc transferqueue system cannot be reached from another process; "
            "start it with tq.init({'transport': 'zmq'}) or {'transport': 'ray'} to share it"
        )
    return System(config, [])


def _find_named_ray_system(config: Config) -> Config | None:
    """On ray, a controller started by init is a named actor: attach to it if it exists."""
    if config.transport != "ray":
        return None
    ray_transport: Any = transport_class("ray")  # a clear error when ray is not installed
    address = ray_transport.find_named("controller", config)
    if address is None:
        return None
    ref = ActorRef(address, config)
    try:
        info = runtime_loop().run(ref.call("system_info"))
    finally:
        runtime_loop().run(ref.aclose())
    return dataclasses.replace(config, system=info)


_lock = threading.Lock()
_default: System | None = None
#: systems a forked child inherited from its parent: kept referenced, never stopped here
_inherited: list[System] = []


def init(config: Config | Any = None) -> Config:
    """Start the system ``config`` asks for (inproc by default), or attach to the one it
    names; make it this process's default. ``config`` may be a Config, a Mapping, a YAML /
    TOML config file (a path, or a str ending in .yaml/.yml/.toml or naming an existing file)
    or the controller address printed by ``python -m transferqueue serve``. Returns the
    effective config."""
    global _default
    from transferqueue.config import config_file_path

    if isinstance(config, str) and config_file_path(config) is None:
        # the address printed by `python -m transferqueue serve` ("tcp://..." / "ipc://...")
        config = {"transport": "zmq", "system": {"controller": config}}
    with _lock:
        if _default is not None and _default.pid == os.getpid():
            if config is None or load_config(config).system == _default.config.system:
                return _default.config
            raise ConfigError(
                "transferqueue is already initialised in this process; call tq.close() first"
            )
        if _default is not None:  # inherited through a fork: the parent's, not ours
            _inherited.append(_default)
            _default = None
        cfg = apply_env(load_config(config))
        if cfg.system is None:
            cfg = _find_named_ray_system(cfg) or cfg
        if cfg.system is not None:
            _default = attach_system(cfg)
        else:
            started = runtime_loop().run(start_system(cfg))
            try:  # metrics.port set: this process serves the system's scrape endpoint
                from transferqueue import metrics

                metrics.ensure_started(started)
            except BaseException:
                runtime_loop().run(started.aclose())
                raise
            _default = started
        return _default.config


def current() -> System:
    if _default is None or _default.pid != os.getpid():
        raise NotInitializedError("call tq.init() first (in this process)")
    return _default


def get_client() -> TransferQueueClient:
    """The synchronous client of the default system."""
    return current().client


def get_async_client() -> AsyncTransferQueueClient:
    """The async client of the default system."""
    return current().async_client


def close() -> None:
    """Disconnect from the default system; stop it if this process started it."""
    global _default
    with _lock:
        system, _default = _default, None
    if system is None or system.pid != os.getpid():
        return
    runtime_loop().run(system.aclose())


atexit.register(close)
