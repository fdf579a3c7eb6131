"""Starting, attaching to and stopping a transferqueue system; the default client.

``tq.init(config)`` starts a controller and ``storage.units`` storage units on the
configured transport and returns the effective config, which names the running system.
Handing that config to ``tq.init`` in another process attaches to the same system instead
of starting a second one. Only the process that started a system stops it on
``tq.close()``; other processes just disconnect.

A ``System`` holds the actors a process started (their handles) and the config naming
them; clients are built from that config by ``transferqueue.client.connect`` and the
process's default client lives in ``transferqueue.client.default``. The default system
behind ``tq.init`` / ``tq.close`` lives here.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import os
import threading
from typing import Any

from transferqueue.client import default
from transferqueue.client.async_client import AsyncTransferQueueClient
from transferqueue.client.connect import (
    CONTROLLER_NAME,
    client_for,
    controller_address,
    resolve,
    target_config,
)
from transferqueue.client.sync_facade import TransferQueueClient
from transferqueue.config import Config, apply_env, load_config
from transferqueue.controller.actor import ControllerActor
from transferqueue.errors import ConfigError, NotInitializedError
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import transport_class, worker_transport
from transferqueue.runtime.transports.base import ActorHandle
from transferqueue.storage.unit import StorageUnit


class System:
    """A started (``handles``: its actors) or attached (no handles) system and the config
    that names it. ``client`` is a convenience: a client connected to it, made on first use
    (closed by ``aclose``)."""

    def __init__(self, config: Config, handles: list[ActorHandle]) -> None:
        self.config = config
        self.handles = handles
        self.pid = os.getpid()
        self._client: TransferQueueClient | None = None

    def new_async_client(self) -> AsyncTransferQueueClient:
        """A client with connections of its own to this system's actors."""
        return client_for(self.config)

    @property
    def client(self) -> TransferQueueClient:
        if self._client is None:
            self._client = TransferQueueClient(self.new_async_client())
        return self._client

    @property
    def async_client(self) -> AsyncTransferQueueClient:
        return self.client.async_client

    @property
    def is_owner(self) -> bool:
        return bool(self.handles)

    async def aclose(self) -> None:
        from transferqueue.ops import metrics

        await metrics.astop(self)
        if self._client is not None:
            await self._client.async_client.close()
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
            name=CONTROLLER_NAME,
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
    """The running system ``config.system`` names (its controller's address is enough)."""
    transport_class(config.transport)  # a clear error when its dependency is missing
    config = runtime_loop().run(resolve(config))
    client_for(config)  # refuses a system this process cannot reach
    return System(config, [])


def _find_named_system(config: Config) -> Config | None:
    """Where the transport names actors (Ray), a controller started by init is found by
    its name: attach to it if it exists."""
    address = controller_address(config)
    if address is None:
        return None
    return runtime_loop().run(
        resolve(dataclasses.replace(config, system={"controller": address.to_plain()}))
    )


def attach_from_worker(config: Config) -> Config:
    """A bare ``tq.init()`` in a Ray worker: the system that ``tq.init`` started on Ray in
    ``config.ray.namespace``; NotInitializedError when there is none."""
    found = _find_named_system(config)
    if found is None:
        raise NotInitializedError(
            f"tq.init() in a Ray worker attaches to the system the driver started on Ray, but "
            f"Ray namespace {config.ray.namespace!r} holds none: call "
            f"tq.init({{'transport': 'ray', ...}}) in the driver before starting the workers "
            f"(or pass the config it returned to tq.init here)"
        )
    return found


_lock = threading.Lock()
_default: System | None = None
#: systems a forked child inherited from its parent: kept referenced, never stopped here
_inherited: list[System] = []


def init(config: Config | Any = None) -> Config:
    """Start the system ``config`` asks for (inproc by default), or attach to the one it
    names; make it this process's default. ``config`` may be a Config, a Mapping, a YAML /
    TOML config file (a path, or a str ending in .yaml/.yml/.toml or naming an existing file)
    or the controller address printed by ``python -m transferqueue serve``. Returns the
    effective config.

    A bare ``tq.init()`` in a Ray worker (a Ray task or actor) attaches to the system the
    driver started on Ray (``tq.init({"transport": "ray"})``, named actors in the
    ``ray.namespace`` "transferqueue"), and raises NotInitializedError when there is none;
    anywhere else it starts an in-process system, Ray or not (docs/migrating.md)."""
    global _default
    if isinstance(config, str):  # a config file, or the address `serve` printed
        config = target_config(config)
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
        worker_of = worker_transport() if config is None else None
        if worker_of is not None:
            cfg = attach_from_worker(apply_env(load_config({"transport": worker_of})))
        else:
            cfg = apply_env(load_config(config))
        if cfg.system is None:
            cfg = _find_named_system(cfg) or cfg
        if cfg.system is not None:
            _default = attach_system(cfg)
        else:
            started = runtime_loop().run(start_system(cfg))
            try:  # metrics.port set: this process serves the system's scrape endpoint
                from transferqueue.ops import metrics

                metrics.ensure_started(started)
            except BaseException:
                runtime_loop().run(started.aclose())
                raise
            _default = started
        default.set_default(_default.client)
        return _default.config


def current() -> System:
    if _default is None or _default.pid != os.getpid():
        raise NotInitializedError("call tq.init() first (in this process)")
    return _default


def close() -> None:
    """Disconnect from the default system; stop it if this process started it."""
    global _default
    with _lock:
        system, _default = _default, None
        if system is not None and system.pid == os.getpid():
            default.set_default(None)
    if system is None or system.pid != os.getpid():
        return
    runtime_loop().run(system.aclose())


atexit.register(close)
