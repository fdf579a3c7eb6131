"""Who may call a zmq server and where it can be reached: CURVE keys and the bind rule.

* **Bind rule** (:func:`server_plan`, checked by the owner before any actor starts): a
  server on loopback (or ``ipc://``) needs nothing; beyond loopback it needs CURVE keys
  (``zmq.curve``), or ``zmq.insecure: true``, which serves without them and logs a warning.
  Otherwise :class:`~transferqueue.errors.ConfigError`. A wildcard host (``0.0.0.0``)
  binds every interface but advertises a concrete address: ``zmq.advertise_host``, else
  the address of the interface of the default route (the source address the kernel picks
  for a route off the host; nothing is sent), else an error asking for
  ``zmq.advertise_host``.
* **Keys** (:func:`load_keys`): the server key pair, the client key pair of this process
  (default: the server's pair, when this process holds it -- the system's own processes)
  and the allowed client public keys (the server's own, ``allowed_clients`` and the
  ``.key`` files in ``allowed_clients_dir``).
* **Sockets**: every actor process of a system serves its ROUTER with the one server pair
  (:func:`secure_server`) and a ZAP handler that admits the allowed keys only; client
  DEALERs (:func:`secure_client`) carry the server public key and their own pair. Inside an
  actor process, channels whose config names no keys use the process's own
  (:func:`set_process_keys`): the controller's connections to the storage units.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from transferqueue.config import CurveConfig, ZmqConfig
from transferqueue.errors import ConfigError

log = logging.getLogger("transferqueue.zmq")

#: hosts that bind every interface
WILDCARD_HOSTS = ("0.0.0.0", "*")
#: a route lookup toward this address (TEST-NET-1, RFC 5737) finds the default route's
#: interface; connecting a UDP socket sends nothing
_PROBE = ("192.0.2.1", 9)


@dataclass(frozen=True)
class CurveKeys:
    """Loaded CURVE keys (Z85 bytes). ``server_secret`` only where the system runs;
    ``client_*`` None where this process has no client pair."""

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes | None
    client_secret: bytes | None
    allowed: frozenset[bytes]


@dataclass(frozen=True)
class ServerPlan:
    """How an actor process serves: the host it advertises in place of the bound one
    (None: the bound endpoint as it is) and its keys (None: no CURVE)."""

    advertise: str | None
    keys: CurveKeys | None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_route_address() -> str | None:
    """The IPv4 address of the interface of the default route, or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_PROBE)
        except OSError:  # ENETUNREACH: no route off this host
            return None
        address: str = probe.getsockname()[0]
    return None if is_loopback(address) or address == "0.0.0.0" else address


def advertised_host(config: ZmqConfig) -> str | None:
    """The host servers put in their addresses (None: the one they bound). Raises
    ConfigError for a wildcard host when there is nothing to advertise."""
    if config.advertise_host:
        return config.advertise_host
    if config.host not in WILDCARD_HOSTS:
        return None
    address = default_route_address()
    if address is None:
        raise ConfigError(
            f"zmq.host {config.host!r} binds every interface, but this host has no default "
            "route whose address could be advertised to clients: set zmq.advertise_host to "
            "the address other hosts reach this one at (or zmq.host to that interface)"
        )
    return address


def server_plan(config: ZmqConfig) -> ServerPlan:
    """The checked plan for a server with ``config`` (the bind rule of this module)."""
    keys = load_keys(config.curve)
    if config.protocol == "ipc":
        return ServerPlan(None, keys)
    if keys is not None and keys.server_secret is None:
        raise ConfigError(
            "zmq.curve names the server's public key only: the processes that serve need "
            "its secret too (server_key_file: the .key_secret file, or server_secret)"
        )
    if keys is None and not is_loopback(config.host):
        if not config.insecure:
            raise ConfigError(
                f"zmq.host {config.host!r} exposes the system beyond this host: configure "
                "CURVE keys (zmq.curve.server_key_file, written by `python -m transferqueue "
                "keygen DIR`) or set zmq.insecure: true to serve without authentication"
            )
        log.warning(
            "zmq.insecure: serving on %s without authentication; anyone who can reach the "
            "port can read, write and clear every partition",
            config.host,
        )
    return ServerPlan(advertised_host(config), keys)


def _read_pair(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read a CURVE key from {str(path)!r}: {exc}") from None
    return public, secret


def _z85(value: str, what: str) -> bytes:
    raw = value.encode("ascii", "replace")
    try:
        z85.decode(raw)
    except Exception:
        raise ConfigError(f"{what} is not valid Z85 text") from None
    return raw


@functools.lru_cache(maxsize=16)
def load_keys(curve: CurveConfig) -> CurveKeys | None:
    """The keys ``curve`` names (files read once per process), or None when CURVE is off."""
    if not curve.enabled:
        return None
    if not zmq.has("curve"):
        raise ConfigError("zmq.curve is set, but this libzmq was built without CURVE support")
    secret: bytes | None
    if curve.server_key_file:
        public, secret = _read_pair(curve.server_key_file, "zmq.curve.server_key_file")
    else:
        secret = (
            _z85(curve.server_secret, "zmq.curve.server_secret") if curve.server_secret else None
        )
        if curve.server_public:
            public = _z85(curve.server_public, "zmq.curve.server_public")
        else:
            assert secret is not None  # enabled: one of the three is set
            public = zmq.curve_public(secret)
    client_public: bytes | None
    client_secret: bytes | None
    if curve.client_key_file:
        client_public, client_secret = _read_pair(
            curve.client_key_file, "zmq.curve.client_key_file"
        )
        if client_secret is None:
            raise ConfigError(
                f"zmq.curve.client_key_file {str(curve.client_key_file)!r} holds no secret key: "
                "name the .key_secret file"
            )
    elif curve.client_public and curve.client_secret:
        client_public = _z85(curve.client_public, "zmq.curve.client_public")
        client_secret = _z85(curve.client_secret, "zmq.curve.client_secret")
    else:
        client_public, client_secret = (public, secret) if secret is not None else (None, None)
    allowed = {public, *(_z85(k, "zmq.curve.allowed_clients") for k in curve.allowed_clients)}
    if curve.allowed_clients_dir:
        folder = Path(curve.allowed_clients_dir)
        if not folder.is_dir():
            raise ConfigError(f"zmq.curve.allowed_clients_dir {str(folder)!r} is not a folder")
        allowed.update(zmq.auth.load_certificates(folder))
    return CurveKeys(public, secret, client_public, client_secret, frozenset(allowed))


_process_keys: CurveKeys | None = None


def set_process_keys(keys: CurveKeys | None) -> None:
    """The keys of this (actor) process: used by channels whose config names none."""
    global _process_keys
    _process_keys = keys


def client_keys(config: ZmqConfig) -> CurveKeys | None:
    """The keys a channel with ``config`` connects with (None: no CURVE). Raises
    ConfigError when CURVE is on but this process has no client key pair."""
    keys = load_keys(config.curve) or _process_keys
    if keys is not None and keys.client_secret is None:
        raise ConfigError(
            "zmq.curve names the server's public key but no client key pair for this process: "
            "set zmq.curve.client_key_file (a .key_secret file from `python -m transferqueue "
            "keygen`) whose public key the server allows"
        )
    return keys


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public or b"")
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret or b"")


class _AllowedKeys:
    """The ZAP handler's check: a client is admitted when its key is allowed."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        log.warning("refused a client whose CURVE public key %s is not allowed", key.decode())
        return False


def secure_server(
    ctx: zmq.Context[Any], sock: zmq.Socket[Any], keys: CurveKeys
) -> ThreadAuthenticator:
    """Make ``sock`` (not bound yet) a CURVE server admitting ``keys.allowed`` only; the
    returned authenticator (a thread answering the context's ZAP requests) must be stopped
    when the socket closes."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("transferqueue.zmq.auth"))
    auth.start()
    auth.configure_curve_callback("*", _AllowedKeys(keys.allowed))
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret or b"")
    return auth


def advertise(endpoint: str, host: str | None) -> str:
    """``endpoint`` (``tcp://bound-host:port``) with ``host`` in place of the bound host."""
    if host is None or not endpoint.startswith("tcp://"):
        return endpoint
    port = endpoint.rsplit(":", 1)[1]
    return f"tcp://{host}:{port}"


def write_key_pair(folder: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``folder/name.key`` (public) and ``folder/name.key_secret`` (both keys, mode
    0600); refuses to overwrite. Returns their paths."""
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    public, secret = base / f"{name}.key", base / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{str(path)!r} exists already: remove it or choose another name")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        made = zmq.auth.create_certificates(base, name)
    finally:
        os.umask(old)
    os.chmod(made[0], 0o644)
    return Path(made[0]), Path(made[1])
