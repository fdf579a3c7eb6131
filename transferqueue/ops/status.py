"""What a running system is doing: ``tq.status()`` and ``python -m transferqueue status``.

Everything here is read-only calls on the actors, so watching a job never disturbs it:
the controller's ``system_info``, ``list_partitions`` and ``partition_info``, each storage
unit's ``stats``, and every actor's built-in :data:`~transferqueue.runtime.transports._protocol.STATS`
request (its dispatcher's cumulative request counters and latency histogram).

:func:`collect` takes one *raw* snapshot; :func:`report` turns one snapshot, or two taken
some time apart, into the plain dict ``tq.status()`` returns and ``--json`` prints. Rates and
p99 latencies are over the time between the two snapshots; from a single one they are since
the actor started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from transferqueue.client.connect import controller_address, target_config
from transferqueue.config import Config
from transferqueue.errors import ConfigError, PartitionNotFoundError, TransferQueueError
from transferqueue.runtime.transports import transport_class
from transferqueue.runtime.transports._protocol import STATS
from transferqueue.runtime.transports.base import ActorRef, Address

__all__ = ["Watcher", "collect", "partition_row", "quantile", "report", "status", "storage_row"]

#: seconds one status call to an actor may take (a busy actor still answers; a dead one must
#: not hang the view)
CALL_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------ snapshots


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)  # every field, ``leased`` too where it exists
    return dict(value)


async def _call(ref: ActorRef, method: str, *args: Any) -> Any:
    try:
        return await ref.call(method, *args, timeout=CALL_TIMEOUT_S)
    except Exception as exc:  # a dead or hung actor is reported, not raised
        return {"error": f"{type(exc).__name__}: {exc}"}


async def collect(controller: ActorRef, units: Sequence[ActorRef] | None = None) -> dict[str, Any]:
    """One raw snapshot of the system whose controller is ``controller`` (the units default
    to those the controller names, connected for this call). Raises when the controller
    cannot be reached; a unit that cannot be is reported in the snapshot."""
    info = await controller.call("system_info", timeout=CALL_TIMEOUT_S)
    if units is not None:
        return await _collect(controller, info, units)
    refs = [ActorRef(Address.from_plain(u), controller.config) for u in info.get("units", [])]
    try:
        return await _collect(controller, info, refs)
    finally:
        await close_refs(refs)


class Watcher:
    """Snapshots of one system over connections it keeps between them (close it after)."""

    def __init__(self, controller: ActorRef) -> None:
        self.controller = controller
        self._units: dict[tuple[Any, ...], ActorRef] = {}

    def _unit(self, plain: Mapping[str, Any]) -> ActorRef:
        key = tuple(sorted(plain.items()))
        ref = self._units.get(key)
        if ref is None:
            ref = self._units[key] = ActorRef(Address.from_plain(plain), self.controller.config)
        return ref

    async def snapshot(self) -> dict[str, Any]:
        info = await self.controller.call("system_info", timeout=CALL_TIMEOUT_S)
        units = [self._unit(u) for u in info.get("units", [])]
        return await _collect(self.controller, info, units)

    async def aclose(self) -> None:
        refs, self._units = [self.controller, *self._units.values()], {}
        await close_refs(refs)


async def _collect(
    controller: ActorRef, info: Mapping[str, Any], units: Sequence[ActorRef]
) -> dict[str, Any]:
    # the counters first: the snapshot's own calls are not in flight in them
    requests = await _call(controller, STATS)
    capacity = None
    if "capacity" in (requests.get("remote_methods") or ()):
        capacity = await _call(controller, "capacity")
    names = await controller.call("list_partitions", timeout=CALL_TIMEOUT_S)
    infos = await asyncio.gather(
        *(controller.call("partition_info", p, timeout=CALL_TIMEOUT_S) for p in names),
        return_exceptions=True,
    )
    partitions = []
    for result in infos:
        if isinstance(result, PartitionNotFoundError):
            continue  # cleared between the two calls
        if isinstance(result, BaseException):
            raise result
        partitions.append(_plain(result))
    unit_results = await asyncio.gather(*(_unit_snapshot(u) for u in units))
    return {
        "time": time.time(),
        "system": dict(info),
        "partitions": partitions,
        "controller": {"requests": requests, "capacity": capacity},
        "units": [{"stats": stats, "requests": requests} for requests, stats in unit_results],
    }


async def _unit_snapshot(unit: ActorRef) -> tuple[Any, Any]:
    requests = await _call(unit, STATS)
    return requests, await _call(unit, "stats")


async def close_refs(refs: Sequence[ActorRef]) -> None:
    await asyncio.gather(*(r.aclose() for r in refs), return_exceptions=True)


# ------------------------------------------------------------------------ figures


def quantile(bounds: Sequence[float], buckets: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram (``buckets[i]``: observations in
    ``(bounds[i-1], bounds[i]]``, the last one above ``bounds[-1]``), interpolated linearly
    within its bucket as Prometheus' ``histogram_quantile`` does; None without observations.
    An answer in the last bucket is ``bounds[-1]`` (a lower bound)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n > 0 and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = bounds[i - 1] if i > 0 else 0.0
            return float(low + (bounds[i] - low) * (rank - seen) / n)
        seen += n
    return float(bounds[-1])


def _methods(now: Any, before: Any) -> dict[str, Any] | None:
    """Per method (and ``"*"``, all of them): calls, rate, p99, in flight, errors by type."""
    if not isinstance(now, Mapping) or "methods" not in now:
        return None
    bounds = now["bounds"]
    ok_before = isinstance(before, Mapping) and before.get("pid") == now.get("pid")
    then = before if ok_before else None
    window = now["time"] - (then["time"] if then else now["started"])
    out: dict[str, Any] = {}
    total_calls, total_in_flight = 0, 0
    total_buckets = [0] * (len(bounds) + 1)
    total_errors: dict[str, int] = {}
    for name, m in sorted(now["methods"].items()):
        old = then["methods"].get(name) if then else None
        calls = m["calls"] - (old["calls"] if old else 0)
        buckets = list(m["buckets"])
        if old:
            buckets = [b - o for b, o in zip(buckets, old["buckets"])]
        out[name] = {
            "calls": m["calls"],
            "per_s": calls / window if window > 0 else None,
            "p99_s": quantile(bounds, buckets, 0.99),
            "in_flight": m["in_flight"],
            "errors": dict(m["errors"]),
        }
        total_calls += calls
        total_buckets = [a + b for a, b in zip(total_buckets, buckets)]
        total_in_flight += m["in_flight"]
        for kind, n in m["errors"].items():
            total_errors[kind] = total_errors.get(kind, 0) + n
    out["*"] = {
        "calls": sum(m["calls"] for m in now["methods"].values()),
        "per_s": total_calls / window if window > 0 else None,
        "p99_s": quantile(bounds, total_buckets, 0.99),
        "in_flight": total_in_flight,
        "errors": total_errors,
    }
    return {"window_s": window, "methods": out}


def _pending(part: Mapping[str, Any]) -> int:
    """Rows not produced yet: ``PartitionInfo.pending`` where it has one; else the live rows
    without the most produced field (exact when every put writes the same fields)."""
    if part.get("pending") is not None:
        return int(part["pending"])
    produced = part.get("produced") or {}
    return max(0, int(part["size"]) - max(produced.values(), default=0))


def partition_row(part: Mapping[str, Any]) -> dict[str, Any]:
    """One partition of the status dict, from a ``PartitionInfo`` as plain data."""
    return {
        "partition_id": part["partition_id"],
        "size": part["size"],
        "expected_size": part["expected_size"],
        "sealed": part["sealed"],
        "pending": _pending(part),
        "produced": dict(part.get("produced") or {}),
        "consumed": dict(part.get("consumed") or {}),
        # None: the controller does not report consumer leases
        "leased": None if part.get("leased") is None else dict(part["leased"]),
        "in_flight": part.get("in_flight", 0),
        "lost": part.get("lost", 0),
        "waiting": dict(part.get("waiting") or {}),
        # bytes committed puts sent to units on another node than the writer's (ray)
        "cross_node_bytes": part.get("cross_node_bytes", 0),
    }


def _unit(i: int, now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    stats = now["stats"]
    unit: dict[str, Any] = {"unit_id": stats.get("unit_id", i)}
    if "error" in stats:
        unit["error"] = stats["error"]
    else:
        parts = stats.get("partitions") or {}
        unit.update(
            pid=stats.get("pid"),
            nbytes=stats.get("nbytes"),
            capacity_bytes=stats.get("capacity_bytes"),
            rows=sum(int(p.get("rows", 0)) for p in parts.values()),
            partitions=len(parts),
            waiting_puts=stats.get("waiting_puts"),
        )
    requests = _methods(now["requests"], before["requests"] if before else None)
    methods = requests["methods"] if requests else {}
    for name, key in (("put", "puts"), ("get", "gets")):
        m = methods.get(name, {})
        unit[key] = m.get("calls", 0)
        unit[f"{key}_per_s"] = m.get("per_s", 0.0 if requests else None)
    unit["requests"] = requests
    return unit


def storage_row(now: Mapping[str, Any]) -> dict[str, Any]:
    """The system-wide bytes: the controller's bound and use where it reports them (its
    ``capacity()``), else None; the bytes the units hold, summed."""
    cap = now["controller"].get("capacity")
    cap = cap if isinstance(cap, Mapping) and "error" not in cap else {}
    held = [u["stats"].get("nbytes") for u in now["units"] if "error" not in u["stats"]]
    return {
        "capacity_bytes": cap.get("capacity_bytes"),
        "used_bytes": cap.get("used_bytes"),
        "reserved_bytes": cap.get("reserved_bytes"),
        "unit_bytes": sum(n for n in held if n is not None),
    }


def report(now: Mapping[str, Any], before: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The status dict of raw snapshot ``now`` (rates since ``before``, another raw snapshot
    of the same system, or since each actor started)."""
    system = now["system"]
    requests = _methods(
        now["controller"]["requests"], before["controller"]["requests"] if before else None
    )
    old_units = before["units"] if before and len(before["units"]) == len(now["units"]) else None
    controller = system.get("controller") or {}
    return {
        "time": now["time"],
        "interval_s": now["time"] - before["time"] if before else None,
        "controller": {
            "address": controller.get("endpoint")
            if isinstance(controller, Mapping)
            else controller,
            "pid": (now["controller"]["requests"] or {}).get("pid"),
            "owner_pid": system.get("owner_pid"),
            "requests": requests,
        },
        "metrics_url": system.get("metrics_url"),
        "storage": storage_row(now),
        "partitions": [partition_row(p) for p in now["partitions"]],
        "units": [
            _unit(i, u, old_units[i] if old_units else None) for i, u in enumerate(now["units"])
        ],
    }


# ------------------------------------------------------------------------ entry points


def status(interval: float = 0.0) -> dict[str, Any]:
    """The status of the default system (``tq.init``) as a plain dict: per partition the
    rows pending, produced per field, consumed (and leased) per task, in flight, lost,
    sealed, expected size and waiting consumers; per storage unit the bytes and rows it
    holds and its puts and gets (per second); the controller's requests per second and p99
    latency, per method and in all (``"*"``); the metrics URL when this process serves one.

    With ``interval`` > 0 it takes two snapshots that many seconds apart and the rates and
    p99s are over that window; otherwise since each actor started."""
    from transferqueue import system as tq_system
    from transferqueue.runtime.loop import runtime_loop

    current = tq_system.current()
    watcher = Watcher(controller_of(current))
    try:
        before = runtime_loop().run(watcher.snapshot()) if interval > 0 else None
        if before is not None:
            time.sleep(interval)  # the measuring window, not a wait for anything
        now = runtime_loop().run(watcher.snapshot())
    finally:
        runtime_loop().run(watcher.aclose())
    out = report(now, before)
    from transferqueue.ops import metrics

    out["metrics_url"] = out["metrics_url"] or metrics.url_of(current)
    return out


def controller_of(system: Any) -> ActorRef:
    """A new ref to the controller of a started or attached ``System`` (close it after)."""
    info = system.config.system or {}
    return ActorRef(Address.from_plain(info["controller"]), system.config)


def attach_config(target: str | None) -> Config:
    """The config naming the system ``python -m transferqueue status TARGET`` watches:
    a controller address (``tcp://...``, ``ipc://...``), a config file (a running ray
    system by its namespace, or one whose ``system`` names the controller); no target: the
    ray system of the default namespace."""
    config = target_config(target if target is not None else {"transport": "ray"})
    if config.system is not None:
        return config
    if not transport_class(config.transport).names_actors:
        raise ConfigError(
            "status attaches to a running system: give the controller address that "
            "`python -m transferqueue serve` prints, or a config with transport 'ray'"
        )
    return config


def controller_ref(config: Config) -> ActorRef:
    """A ref to the controller the config names (never starts a system)."""
    address = controller_address(config)
    if address is None:
        raise TransferQueueError(
            f"no transferqueue system is running in ray namespace {config.ray.namespace!r}"
        )
    return ActorRef(address, config)
