"""The public TransferQueue project's config shape, mapped onto ours (docs/migrating.md).

Upstream configs look like ``{"controller": {"sampler": ..., "polling_mode": ...},
"backend": {"storage_backend": "SimpleStorage", "SimpleStorage":
{"num_data_storage_units": 2, "total_storage_size": ...}}, "metrics": {"enabled": ...,
"port": ...}}``. :func:`from_upstream` rewrites the upstream keys it finds, one table row
each, and leaves every other key alone, so ``load_config`` checks what is left as usual (an
unknown key still raises ``ConfigError`` naming it). Keys that mean nothing here are
accepted with a one-line note; keys that would change behaviour we do not have raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from transferqueue.errors import ConfigError

log = logging.getLogger("transferqueue.config")

Path = tuple[str, ...]

#: upstream sampler class names -> our built-in sampler names
_SAMPLER_NAMES = {
    "SequentialSampler": "sequential",
    "GRPOGroupNSampler": "grpo",
    "RankAwareSampler": "rank_aware",
    "SeqlenBalancedSampler": "seqlen_balanced",
}

_BACKEND = "SimpleStorage"
_OTHER_BACKENDS = ("MooncakeStore", "Yuanrong", "RayStore")


def _units(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _sampler(value: Any) -> Any:
    return _SAMPLER_NAMES.get(value, value) if isinstance(value, str) else value


def _null_only(key: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None:
            raise ConfigError(
                f"{key} is the address upstream's init fills in; it means nothing here: "
                "attach with the config tq.init returned (or a bare tq.init() on Ray)"
            )

    return check


def _storage_backend(value: Any) -> None:
    if value != _BACKEND:
        raise ConfigError(
            f"backend.storage_backend {value!r} is not available here: only {_BACKEND!r} "
            "(our storage units); drop the key or set it to 'SimpleStorage'"
        )


def _polling_mode(value: Any) -> str | None:
    if value:
        return (
            "controller.polling_mode is ignored: every wait here is an event, so get_meta "
            "blocks until it can answer; pass get_meta(..., wait=False) to get what is ready now"
        )
    return None


def _total_storage_size(value: Any) -> str:
    return (
        f"backend.SimpleStorage.total_storage_size={value!r} is ignored: storage units here "
        "grow with the rows; bound them in bytes with storage.capacity_bytes"
    )


#: upstream key -> ("to", our key, value converter) | ("note", fn giving a note or None)
#: | ("check", fn that raises for values we cannot honour) | ("drop",)
TABLE: dict[Path, tuple[Any, ...]] = {
    ("backend", "SimpleStorage", "num_data_storage_units"): ("to", ("storage", "units"), _units),
    ("backend", "SimpleStorage", "total_storage_size"): ("note", _total_storage_size),
    ("backend", "SimpleStorage", "zmq_info"): (
        "check",
        _null_only("backend.SimpleStorage.zmq_info"),
    ),
    ("backend", "storage_backend"): ("check", _storage_backend),
    ("controller", "polling_mode"): ("note", _polling_mode),
    ("controller", "zmq_info"): ("check", _null_only("controller.zmq_info")),
    ("controller", "sampler"): ("to", ("controller", "sampler"), _sampler),
    ("metrics", "endpoint"): ("drop",),  # filled in by upstream's init
}


def _plain(value: Any) -> Any:
    """Mappings (dict, OmegaConf DictConfig) as nested dicts; other values as they are."""
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        return {str(k): _plain(value[k]) for k in value.keys()}
    return value


def _pop(data: dict[str, Any], path: Path) -> tuple[bool, Any]:
    node: Any = data
    for key in path[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return False, None
    if path[-1] not in node:
        return False, None
    return True, node.pop(path[-1])


def _set(data: dict[str, Any], path: Path, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _leftovers(node: Any, where: str) -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, v in node.items() for k in _leftovers(v, f"{where}.{key}")]
    return [] if node == {} else [where]


def from_upstream(config: Any) -> tuple[dict[str, Any], list[str]]:
    """``config`` (any Mapping) with the public TransferQueue's keys rewritten to ours, and
    the notes for keys accepted without effect. Raises ConfigError for upstream keys we
    cannot honour; keys it does not know are left for ``load_config`` to judge."""
    data = _plain(config)
    notes: list[str] = []
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and "enabled" in metrics:  # upstream: enabled + port 0
        enabled = metrics.pop("enabled")
        if not enabled:
            metrics.pop("port", None)  # upstream's port 0 would start a server here
        else:
            metrics.setdefault("port", 0)
    backend = data.get("backend")
    if isinstance(backend, dict):
        for name in _OTHER_BACKENDS:  # sections of a backend not selected configure nothing
            backend.pop(name, None)
    for path, (action, *args) in TABLE.items():
        found, value = _pop(data, path)
        if not found:
            continue
        if action == "to":
            target, convert = args
            try:
                value = convert(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{'.'.join(path)}: bad value {value!r}") from None
            found, ours = _pop(data, target)
            if found and ours != value:
                raise ConfigError(
                    f"{'.'.join(path)}={value!r} and {'.'.join(target)}={ours!r} "
                    "say different things: give one of them"
                )
            _set(data, target, value)
        elif action == "note":
            note = args[0](value)
            if note:
                notes.append(note)
        elif action == "check":
            args[0](value)
    if "backend" in data:
        left = _leftovers(data.pop("backend"), "backend")
        if left:
            mapped = ", ".join(".".join(p) for p in TABLE if p[0] == "backend")
            raise ConfigError(
                f"unknown config key {left[0]!r} (upstream keys mapped here: {mapped}; "
                "ours: storage.units, storage.capacity_bytes, ...)"
            )
    for note in notes:
        log.warning(note)
    return data, notes
