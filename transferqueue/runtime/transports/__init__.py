"""Transports: where actors live and how requests reach them.

Only ``zmq.py`` (with ``zmq_actor.py``, its actor process, and ``zmq_auth.py``, its CURVE
keys) imports zmq and only ``ray.py`` imports ray; both are imported lazily.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from transferqueue.errors import ConfigError, TransportUnavailableError
from transferqueue.runtime.transports.base import Address

if TYPE_CHECKING:
    from transferqueue.runtime.transports.base import Transport

_MODULES = {
    "inproc": ("transferqueue.runtime.transports.inproc", "InprocTransport"),
    "zmq": ("transferqueue.runtime.transports.zmq", "ZmqTransport"),
    "ray": ("transferqueue.runtime.transports.ray", "RayTransport"),
}


#: the library a transport's worker processes have imported (a worker of none imports it)
_WORKER_LIBRARIES = {"ray": "ray"}


def worker_transport() -> str | None:
    """The transport this process is a worker of (a Ray task or actor), if any."""
    for name, library in _WORKER_LIBRARIES.items():
        if library in sys.modules and transport_class(name).in_worker():
            return name
    return None


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


def address_url(address: Address) -> str:
    """An actor's address as text (``ActorHandle.url``), parsed back by :func:`parse_address_url`."""
    if address.transport == "zmq":
        return f"zmq+{address.endpoint}"  # zmq+tcp://127.0.0.1:5555, zmq+ipc:///tmp/x.sock
    if address.transport == "ray":
        return f"ray://{address.namespace}/{address.endpoint}"
    return f"inproc://{address.pid}/{address.endpoint}"


def parse_address_url(url: str) -> Address:
    scheme, sep, rest = url.partition("://")
    if sep and scheme.startswith("zmq+") and scheme[4:] in ("tcp", "ipc") and rest:
        return Address("zmq", url[4:])
    first, slash, last = rest.partition("/")
    if sep and slash and first and last:
        if scheme == "ray":
            return Address("ray", last, namespace=first)
        if scheme == "inproc" and first.isdigit():
            return Address("inproc", last, pid=int(first))
    raise ConfigError(
        f"not an actor url: {url!r}; expected zmq+tcp://HOST:PORT, zmq+ipc://PATH, "
        "ray://NAMESPACE/NAME or inproc://PID/KEY (an ActorHandle's url)"
    )
