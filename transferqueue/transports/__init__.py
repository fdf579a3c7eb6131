"""Transports: where actors live and how requests reach them.

Only ``zmq.py`` (and ``zmq_actor.py``, its actor process, and ``ray_zmq.py``, the zmq data
path of the ray transport) imports zmq and only ``ray.py`` imports ray; both are imported
lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from transferqueue.errors import ConfigError, TransportUnavailableError

if TYPE_CHECKING:
    from transferqueue.transports.base import Transport

_MODULES = {
    "inproc": ("transferqueue.transports.inproc", "InprocTransport"),
    "zmq": ("transferqueue.transports.zmq", "ZmqTransport"),
    "ray": ("transferqueue.transports.ray", "RayTransport"),
}


def transport_class(name: str) -> type[Transport]:
    """The transport class registered under ``name`` (imported on first use)."""
    try:
        module_name, attr = _MODULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown transport {name!r}; choose one of {', '.join(_MODULES)}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"ray": "ray", "zmq": "zmq"}.get(name, name)
        raise TransportUnavailableError(
            f"the {name!r} transport needs an optional dependency that is not installed "
            f'({exc.name}): pip install "transferqueue[{extra}]"'
        ) from exc
    return getattr(module, attr)  # type: ignore[no-any-return]
