"""Clients built from a config: ``connect(config)`` / ``aconnect(config)``.

A config names a running system in ``config.system``: the controller's and the units'
addresses (what ``tq.init`` returns), or only the controller's (what ``python -m
transferqueue serve`` prints; the controller is asked for the rest). Building a client
starts nothing and stops nothing: the system belongs to whoever started it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from transferqueue.client.async_client import AsyncTransferQueueClient
from transferqueue.client.sync_facade import TransferQueueClient
from transferqueue.config import Config, load_config
from transferqueue.errors import ConfigError, TransportUnavailableError
from transferqueue.runtime.actor import ActorRef, Address
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import transport_class

Target = Config | Mapping[str, Any] | str


def target_config(target: Target) -> Config:
    """``target`` as a Config: a Config, a mapping, a config file, or a controller address
    (``tcp://...`` / ``ipc://...``, as ``python -m transferqueue serve`` prints it)."""
    from transferqueue.config import config_file_path

    if isinstance(target, str) and config_file_path(target) is None:
        target = {"transport": "zmq", "system": {"controller": target}}
    return load_config(target)


def shareable(config: Config) -> bool:
    """Whether processes other than the one that started it can reach a system on
    ``config.transport`` (DataLoader workers, spawned producers)."""
    return transport_class(config.transport).cross_process


def client_for(config: Config) -> AsyncTransferQueueClient:
    """An async client of the system ``config.system`` names in full (no I/O here: its
    connections open on first use, in the loop that uses them)."""
    info = config.system
    if not info or "units" not in info:
        raise ConfigError(
            "config.system names no running system (pass the config tq.init returned)"
        )
    controller = Address.from_plain(info["controller"])
    if controller.pid and controller.pid != os.getpid():  # an in-process actor elsewhere
        raise TransportUnavailableError(
            "an inproc transferqueue system cannot be reached from another process; "
            "start it with tq.init({'transport': 'zmq'}) or {'transport': 'ray'} to share it"
        )
    units = [ActorRef(Address.from_plain(u), config) for u in info["units"]]
    return AsyncTransferQueueClient(ActorRef(controller, config), units, config)


#: the name a system's controller is spawned under (found by it where the transport names actors)
CONTROLLER_NAME = "controller"


def controller_address(config: Config) -> Address | None:
    """The address of the controller ``config`` names: the one in ``config.system`` (an
    address, or the text ``serve`` printed), else -- where the transport names actors (Ray) --
    the running one found by its name; ``None`` when there is none."""
    if config.system is None:
        return transport_class(config.transport).find_named(CONTROLLER_NAME, config)
    return _given_controller(config, config.system)


def _given_controller(config: Config, info: Mapping[str, Any]) -> Address:
    controller = info["controller"]
    if isinstance(controller, str):  # the text `serve` printed: an endpoint of this transport
        controller = {"transport": config.transport, "endpoint": controller}
    return Address.from_plain(controller)


async def resolve(config: Config) -> Config:
    """``config`` with ``system`` naming the controller and every unit: when it names only
    the controller, the controller is asked."""
    info = config.system
    if info is None:
        raise ConfigError("config.system is empty: there is no running system to attach to")
    if "units" in info:
        return config
    ref = ActorRef(_given_controller(config, info), config)
    try:
        full = await ref.call("system_info")
    finally:
        await ref.aclose()
    return dataclasses.replace(config, system=full)


async def aconnect(target: Target) -> AsyncTransferQueueClient:
    """An async client of the running system ``target`` names."""
    config = target_config(target)
    transport_class(config.transport)  # a clear error when its dependency is missing
    return client_for(await resolve(config))


def connect(target: Target) -> TransferQueueClient:
    """A synchronous client of the running system ``target`` names (see :func:`aconnect`)."""
    return TransferQueueClient(runtime_loop().run(aconnect(target)))
