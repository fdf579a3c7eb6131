"""Configuration: frozen dataclasses with every default in one place.

Build a :class:`Config` from any Mapping (a dict, an OmegaConf ``DictConfig``, ...) or a
YAML / TOML file holding the same keys with :func:`load_config`; the public TransferQueue's
config shape is accepted too (:mod:`transferqueue.upstream_config` maps it). Unknown keys raise
:class:`~transferqueue.errors.ConfigError` naming the key and the valid ones (and the file).
Environment variables are read by :func:`apply_env`, called once by ``tq.init`` -- never at
import.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from transferqueue.errors import ConfigError

TRANSPORTS = ("inproc", "zmq", "ray")
PRE_ALLOC_ENV = "TQ_PRE_ALLOC_SAMPLE_NUM"


@dataclass(frozen=True)
class RuntimeConfig:
    """The actor runtime: timeouts and in-process codec checking."""

    #: default timeout (seconds) of every actor call; ``None`` waits forever
    call_timeout: float | None = 120.0
    #: inproc only: pass every request and reply through the codec, so that payloads the
    #: zmq and ray transports cannot carry are rejected in-process too
    inproc_codec: bool = True
    #: seconds to wait for a first connection to an actor before raising ActorDiedError
    connect_timeout: float = 10.0


#: the length of a CURVE key in Z85 text (32 bytes)
Z85_KEY_LENGTH = 40


@dataclass(frozen=True)
class CurveConfig:
    """CURVE authentication and encryption of the zmq transport (docs/architecture.md,
    "Across hosts"). Keys are files written by ``python -m transferqueue keygen`` (the
    ``zmq.auth`` certificate format: ``NAME.key`` holds the public key, ``NAME.key_secret``
    both) or Z85 text values (40 characters); a file and a value for the same key are an
    error. CURVE is on when a server key is given. Every actor process of a system serves
    with the one server key pair, and the system's own processes connect with it too."""

    #: the server's key: its ``.key_secret`` file where the system is started (``tq.init``,
    #: ``serve``), or its public ``.key`` file in a client that attaches
    server_key_file: str | None = None
    #: the server's public key (Z85), instead of ``server_key_file``
    server_public: str | None = None
    #: the server's secret key (Z85), where the system is started
    server_secret: str | None = None
    #: this process's client key pair (a ``.key_secret`` file); default: the server's pair
    #: when this process holds it
    client_key_file: str | None = None
    #: this process's client key pair as Z85 values, instead of ``client_key_file``
    client_public: str | None = None
    client_secret: str | None = None
    #: public keys (Z85) of the clients the server admits, besides holders of its own pair
    allowed_clients: tuple[str, ...] = ()
    #: a folder of ``.key`` files of admitted clients, read when each actor process starts
    allowed_clients_dir: str | None = None

    def __post_init__(self) -> None:
        allowed = self.allowed_clients
        if isinstance(allowed, str) or not all(isinstance(k, str) for k in allowed):
            raise ConfigError(
                f"zmq.curve.allowed_clients must be a list of Z85 public keys; got {allowed!r:.200}"
            )
        object.__setattr__(self, "allowed_clients", tuple(allowed))
        for name in ("server_public", "server_secret", "client_public", "client_secret"):
            _check_z85(f"zmq.curve.{name}", getattr(self, name))
        for key in allowed:
            _check_z85("zmq.curve.allowed_clients", key)
        for name in ("server_key_file", "client_key_file", "allowed_clients_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"zmq.curve.{name} must be a path; got {value!r:.100}")
        if self.server_key_file and (self.server_public or self.server_secret):
            raise ConfigError(
                "zmq.curve: give the server key as server_key_file or as server_public / "
                "server_secret values, not both"
            )
        if self.client_key_file and (self.client_public or self.client_secret):
            raise ConfigError(
                "zmq.curve: give the client key pair as client_key_file or as client_public / "
                "client_secret values, not both"
            )
        if bool(self.client_public) != bool(self.client_secret):
            raise ConfigError("zmq.curve: client_public and client_secret go together")

    @property
    def enabled(self) -> bool:
        """Whether CURVE is configured (a server key is named)."""
        return bool(self.server_key_file or self.server_public or self.server_secret)


def _check_z85(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or len(value) != Z85_KEY_LENGTH):
        raise ConfigError(
            f"{name} must be a CURVE key in Z85 text ({Z85_KEY_LENGTH} characters, as "
            "`python -m transferqueue keygen` writes); got "
            + (f"{len(value)} characters" if isinstance(value, str) else repr(value)[:100])
        )


@dataclass(frozen=True)
class ZmqConfig:
    #: interface servers bind to; loopback unless you configure otherwise. Beyond loopback
    #: a server requires CURVE keys (``curve``) unless ``insecure`` is set. ``0.0.0.0``
    #: binds every interface and advertises ``advertise_host``
    host: str = "127.0.0.1"
    #: the host put in the addresses servers hand out (clients connect there); default:
    #: ``host``, and for ``host: 0.0.0.0`` the address of the interface of the default
    #: route (no default route: an error asks for this setting)
    advertise_host: str | None = None
    #: serve beyond loopback without CURVE: anyone who reaches the port may call every
    #: method (clear partitions, read data). A warning is logged
    insecure: bool = False
    curve: CurveConfig = field(default_factory=CurveConfig)
    #: "tcp" or "ipc"
    protocol: str = "tcp"
    #: folder for ipc:// sockets (default: the system temp folder)
    ipc_dir: str | None = None
    #: seconds an actor process may take to start
    start_timeout: float = 60.0
    #: raise glibc's mmap and trim thresholds in a process that connects to zmq actors or
    #: hosts inproc ones, so big messages and results land in reused heap pages, not fresh
    #: ones (see transferqueue.runtime.memory); zmq and ray actor processes always do. Up to
    #: 1 GiB of freed memory then stays mapped for reuse
    tune_malloc: bool = True
    #: torch intra-op threads in an actor process (``torch.set_num_threads``). An actor
    #: copies rows and moves frames; torch's parallel copies of rows over 64 KiB, with their
    #: threads fighting the I/O threads for the cores, made a 1 MiB row write ~50x slower
    #: on a 2-core host (30 ms vs 0.6 ms, bench stress). Raise it on big hosts for huge rows
    actor_threads: int = 1
    #: between a client and an actor on one host (zmq, and ray's zmq data path), frames of
    #: ``shm_min_bytes`` or more travel through shared memory (memfd segments) instead of
    #: the socket; across hosts, or when off, the socket. See docs/architecture.md
    shared_memory: bool = True
    #: the smallest frame (a tensor's bytes) that takes the shared-memory path
    shm_min_bytes: int = 1 << 20
    #: at most this many bytes of segments per sending process (reused once their receiver
    #: lets go of them); a message that finds no room takes the socket
    shm_pool_bytes: int = 1 << 30
    #: a storage unit keeps the shared-memory frames of a put that fills a new field buffer
    #: as that buffer instead of copying them (one copy per put, not two); the memory then
    #: lives in the putting process's segment until the unit drops the rows (clear)
    shm_keep: bool = True


@dataclass(frozen=True)
class RayConfig:
    namespace: str = "transferqueue"
    #: extra ``.options(...)`` for the Ray actors; ``num_cpus`` defaults to 0 so the default
    #: configuration starts on a 2-CPU machine
    actor_options: Mapping[str, Any] = field(default_factory=dict)
    #: how requests and bytes move: "zmq" (a zmq ROUTER served inside each Ray actor, on
    #: its node's IP: ~1 round trip per call) or "ray" (one Ray actor task per call); see
    #: docs/architecture.md for the measurement behind the default
    data_path: str = "zmq"
    #: interface the actors' zmq servers bind to (None: the node's IP as Ray reports it)
    host: str | None = None


@dataclass(frozen=True)
class ControllerConfig:
    #: default reservation of a partition touched before it was created
    #: (``TQ_PRE_ALLOC_SAMPLE_NUM`` sets it when the config leaves it at 0)
    pre_allocate: int = 0
    #: built-in sampler name, BaseSampler subclass or instance, or "package.module:Class"
    sampler: Any = "sequential"
    #: seconds a put may take between allocating its rows and committing them (its *put
    #: lease*); a put not committed by then is released: its slots go back to pending, its
    #: appended rows are dropped and their bytes freed, so a stream can always end. The
    #: writes of a put are bounded by the same deadline, so no byte lands after it
    put_lease_s: float = 60.0
    #: ray only: the node the controller runs on (a Ray node id or a custom resource only
    #: that node has); None: the node of the process that calls ``tq.init``
    node: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    units: int = 2
    #: bound on the stored data bytes of the whole system (all units together), kept by the
    #: controller when it admits a put; each unit's pool of dropped buffers comes on top
    #: (at most max(256 MiB, the bytes the unit stores) per unit)
    capacity_bytes: int | None = None
    #: a put that does not fit waits for space (woken by clears and released puts) instead
    #: of raising StorageFullError
    block_when_full: bool = False
    #: rows per stripe block: rows ``[b*s, (b+1)*s)`` live on one unit, blocks go round the
    #: units. Big puts and gets still use every unit; a micro-batch of up to ``s`` rows
    #: visits one or two. Every process of a system must use the same value (attaching
    #: processes take it from the system's config).
    stripe_rows: int = 128
    #: ray only: start this many units on each node of ``nodes`` (default: every alive node
    #: of the cluster); ``units`` is then ignored
    units_per_node: int | None = None
    #: ray only: the nodes storage units run on (Ray node ids or custom resources that name
    #: one node each); without ``units_per_node`` the ``units`` go round robin over them
    nodes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.nodes, list):  # YAML / dict configs hold lists
            object.__setattr__(self, "nodes", tuple(self.nodes))


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (opt-in; needs the ``transferqueue[metrics]`` extra). The process
    that starts the system (``tq.init``) serves one scrape endpoint for the whole system and
    asks the actors for their figures on each scrape (docs/operability.md)."""

    #: port of the ``/metrics`` endpoint: None (the default) serves none; 0 lets the OS pick
    #: one (the bound URL is logged and in ``tq.status()["metrics_url"]``)
    port: int | None = None
    #: interface the endpoint binds to; loopback unless you configure otherwise
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        port = self.port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise ConfigError(f"metrics.port must be None or an int in [0, 65535]; got {port!r}")


@dataclass(frozen=True)
class Config:
    transport: str = "inproc"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: filled in by ``tq.init``: where the running system is (pass the returned config to
    #: ``tq.init`` in another process to attach to it)
    system: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(
                f"transport must be one of {', '.join(TRANSPORTS)}; got {self.transport!r}"
            )
        if self.storage.units < 1:
            raise ConfigError(f"storage.units must be >= 1; got {self.storage.units}")
        stripe = self.storage.stripe_rows
        if not isinstance(stripe, int) or isinstance(stripe, bool) or stripe < 1:
            raise ConfigError(f"storage.stripe_rows must be an int >= 1; got {stripe!r}")
        if self.controller.pre_allocate < 0:
            raise ConfigError(
                f"controller.pre_allocate must be >= 0; got {self.controller.pre_allocate}"
            )
        lease = self.controller.put_lease_s
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
            raise ConfigError(f"controller.put_lease_s must be a number > 0; got {lease!r}")
        self._check_placement()
        if self.zmq.protocol not in ("tcp", "ipc"):
            raise ConfigError(f"zmq.protocol must be 'tcp' or 'ipc'; got {self.zmq.protocol!r}")
        for key in ("shared_memory", "shm_keep"):
            if not isinstance(getattr(self.zmq, key), bool):
                raise ConfigError(
                    f"zmq.{key} must be true or false; got {getattr(self.zmq, key)!r}"
                )
        for key in ("shm_min_bytes", "shm_pool_bytes"):
            value = getattr(self.zmq, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"zmq.{key} must be a positive number of bytes; got {value!r}")
        if not isinstance(self.zmq.insecure, bool):
            raise ConfigError(f"zmq.insecure must be true or false; got {self.zmq.insecure!r}")
        advertise = self.zmq.advertise_host
        if advertise is not None and (
            not isinstance(advertise, str) or not advertise or advertise in ("0.0.0.0", "*")
        ):
            raise ConfigError(
                "zmq.advertise_host must be an address other hosts can connect to; "
                f"got {advertise!r}"
            )

    def _check_placement(self) -> None:
        per_node, nodes = self.storage.units_per_node, self.storage.nodes
        if per_node is not None and (
            isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1
        ):
            raise ConfigError(
                f"storage.units_per_node must be None or an int >= 1; got {per_node!r}"
            )
        if nodes is not None and (
            isinstance(nodes, str) or not nodes or not all(isinstance(n, str) for n in nodes)
        ):
            raise ConfigError(
                f"storage.nodes must be None or a non-empty list of str; got {nodes!r}"
            )
        if self.ray.data_path not in ("zmq", "ray"):
            raise ConfigError(f"ray.data_path must be 'zmq' or 'ray'; got {self.ray.data_path!r}")
        placed = [
            key
            for key, value in (
                ("storage.units_per_node", per_node),
                ("storage.nodes", nodes),
                ("controller.node", self.controller.node),
            )
            if value is not None
        ]
        if placed and self.transport != "ray":
            raise ConfigError(
                f"{', '.join(placed)} place actors on the nodes of a Ray cluster: they need "
                f"transport 'ray' (this config has {self.transport!r})"
            )


def _ours(data: Any) -> Mapping[str, Any]:
    """``data`` with the public TransferQueue's keys mapped to ours (:mod:`.upstream_config`:
    ``backend.SimpleStorage.num_data_storage_units`` -> ``storage.units``, ...)."""
    from transferqueue.upstream_config import from_upstream

    return from_upstream(data)[0]


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    valid = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key in data:
        if key not in valid:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                f"unknown config key {path!r}; valid keys here: {', '.join(sorted(valid))}"
            )
        value = data[key]
        sub = _dataclass_type(cls, key)
        if sub is not None and isinstance(value, Mapping):
            value = _build(sub, value, f"{where}.{key}" if where else key)
        elif isinstance(value, Mapping):
            value = {k: value[k] for k in value}
        kwargs[key] = value
    return cls(**kwargs)


def _dataclass_type(cls: type, name: str) -> type | None:
    default = {f.name: f for f in fields(cls)}[name]
    if default.default_factory is not dataclasses.MISSING:
        probe = default.default_factory()
        if is_dataclass(probe):
            return type(probe)
    return None


def load_config(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> Config:
    """Return a :class:`Config` from a Config, a Mapping (dict, DictConfig), a config file
    (a ``pathlib.Path``, or a ``str`` that :func:`config_file_path` takes for one) or
    ``None``."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = config_file_path(config)
        if path is not None:
            return _config_from_file(path, _parse_config_file(path))
        raise ConfigError(
            f"a config string must name a {'/'.join(CONFIG_FILE_SUFFIXES)} file; got {config!r}"
        )
    if isinstance(config, Mapping) or hasattr(config, "keys"):
        return _build(Config, _ours(config), "")
    raise ConfigError(
        f"config must be a Mapping, a Config or a config file path; got {type(config).__name__}"
    )


#: file names ending in these are config files (TOML for .toml, YAML otherwise)
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".toml")


def config_file_path(value: str | os.PathLike[str]) -> Path | None:
    """``value`` as a config file path: any ``os.PathLike``, or a ``str`` that ends in
    .yaml/.yml/.toml or names an existing file; ``None`` for any other string (``tq.init``
    takes those, ``tcp://...`` and ``ipc://...``, for a controller address)."""
    if not isinstance(value, str):
        return Path(value)
    if value.startswith(("tcp://", "ipc://")):
        return None
    if value.lower().endswith(CONFIG_FILE_SUFFIXES) or os.path.isfile(value):
        return Path(value)
    return None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a YAML (.yaml, .yml, or any other name) or TOML (.toml) config file holds,
    with the keys of the dict form. A missing or unreadable file, bad syntax, a top level that
    is not a mapping, an unknown key or a bad value raise ConfigError naming the file."""
    path = Path(path)
    data = _parse_config_file(path)
    _config_from_file(path, data)  # every key and value checked, the file named
    return dict(data)


def _parse_config_file(path: Path) -> Mapping[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    data: Any
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:  # an empty YAML file: every default
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping at the top level; "
            f"got {type(data).__name__}"
        )
    return data


def _config_from_file(path: Path, data: Mapping[str, Any]) -> Config:
    try:
        return _build(Config, _ours(data), "")
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    except (TypeError, AttributeError) as exc:  # a value of the wrong type: ``units: two``
        raise ConfigError(f"config file {str(path)!r}: bad value: {exc}") from None


def parse_pre_allocate(value: str) -> int:
    """Parse ``TQ_PRE_ALLOC_SAMPLE_NUM``; a clear ValueError for a bad value."""
    hint = (
        f"{PRE_ALLOC_ENV} must be a non-negative integer: set it to your global batch size so "
        "consumers wait for samples that are not produced yet, or to 0 to disable reservation"
    )
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{hint}; got {value!r}") from None
    if n < 0:
        raise ConfigError(f"{hint}; got {n}")
    return n


def apply_env(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """Apply the environment variables we honour. Called once, by ``tq.init``."""
    env = os.environ if environ is None else environ
    raw = env.get(PRE_ALLOC_ENV)
    if raw is not None and config.controller.pre_allocate == 0:
        n = parse_pre_allocate(raw)
        config = replace(config, controller=replace(config.controller, pre_allocate=n))
    return config
