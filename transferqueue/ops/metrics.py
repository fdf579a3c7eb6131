"""Prometheus metrics of a running system (opt-in: ``metrics.port``, the ``[metrics]`` extra).

One scrape endpoint per system, served by the process that owns it (the ``tq.init`` that
started it): on each scrape a custom collector takes one :func:`transferqueue.ops.status.collect`
snapshot -- read-only calls on the controller and every storage unit -- and turns it into
metric families. The actors need no HTTP server, no extra port and no dependency of their
own; a scrape costs a few small requests, and nothing is computed between scrapes. Why this
and not one endpoint per actor: docs/operability.md.

Families (all prefixed ``transferqueue_``): ``up``; per actor and method ``requests_total``,
``requests_in_flight``, ``request_duration_seconds`` (histogram), ``request_errors_total``
(by exception type); ``puts_total`` / ``gets_total`` (controller ``commit`` / ``get_meta``);
per unit ``unit_bytes``, ``unit_capacity_bytes``, ``unit_rows``, ``unit_waiting_puts``; per
partition ``partition_rows`` (by state: size, pending, in_flight, lost),
``partition_produced_rows`` (by field), ``partition_consumed_rows`` and
``partition_leased_rows`` (by task), ``partition_waiting_get_meta`` (by task),
``partition_expected_size``, ``partition_sealed``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from transferqueue.errors import ConfigError

if TYPE_CHECKING:
    from transferqueue.ops.status import Watcher
    from transferqueue.system import System

__all__ = ["MetricsServer", "astop", "ensure_started", "families", "start", "stop", "url_of"]

log = logging.getLogger("transferqueue.metrics")

#: seconds one scrape may spend asking the actors
SCRAPE_TIMEOUT_S = 15.0
#: the metrics server of each system this process serves one for
_served: weakref.WeakKeyDictionary[Any, MetricsServer] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "metrics.port is set but prometheus_client is not installed: "
            "pip install 'transferqueue[metrics]'"
        ) from None
    return prometheus_client


def families(raw: Mapping[str, Any] | None) -> Iterator[Any]:
    """The metric families of one raw snapshot (None: the controller did not answer)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    up = GaugeMetricFamily("transferqueue_up", "1 when the scrape reached the controller")
    up.add_metric([], 0.0 if raw is None else 1.0)
    yield up
    if raw is None:
        return
    labels = ["actor", "unit", "method"]
    calls = CounterMetricFamily("transferqueue_requests", "requests answered", labels=labels)
    busy = GaugeMetricFamily("transferqueue_requests_in_flight", "requests running", labels=labels)
    latency = HistogramMetricFamily(
        "transferqueue_request_duration_seconds", "request latency", labels=labels
    )
    errors = CounterMetricFamily(
        "transferqueue_request_errors", "requests answered with an error", labels=[*labels, "type"]
    )
    puts = CounterMetricFamily("transferqueue_puts", "puts committed (controller commit calls)")
    gets = CounterMetricFamily("transferqueue_gets", "controller get_meta calls")
    actors = [("controller", "", raw["controller"]["requests"])]
    actors += [("unit", str(i), u["requests"]) for i, u in enumerate(raw["units"])]
    for actor, unit, snap in actors:
        if not isinstance(snap, Mapping) or "methods" not in snap:
            continue  # an actor that did not answer
        bounds = snap["bounds"]
        for method, m in snap["methods"].items():
            key = [actor, unit, method]
            calls.add_metric(key, m["calls"])
            busy.add_metric(key, m["in_flight"])
            cumulative, seen = [], 0
            for bound, n in zip([*map(str, bounds), "+Inf"], m["buckets"]):
                seen += n
                cumulative.append((bound, seen))
            latency.add_metric(key, cumulative, m["seconds"])
            for kind, n in m["errors"].items():
                errors.add_metric([*key, kind], n)
            if actor == "controller" and method == "commit":
                puts.add_metric([], m["calls"])
            if actor == "controller" and method == "get_meta":
                gets.add_metric([], m["calls"])
    yield from (calls, busy, latency, errors, puts, gets)
    yield from _unit_families(raw)
    yield from _partition_families(raw)


def _unit_families(raw: Mapping[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    nbytes = GaugeMetricFamily("transferqueue_unit_bytes", "bytes stored", labels=["unit"])
    cap = GaugeMetricFamily("transferqueue_unit_capacity_bytes", "unit bound", labels=["unit"])
    rows = GaugeMetricFamily("transferqueue_unit_rows", "rows stored", labels=["unit"])
    waiting = GaugeMetricFamily(
        "transferqueue_unit_waiting_puts", "writes waiting for space", labels=["unit"]
    )
    for i, u in enumerate(raw["units"]):
        stats = u["stats"]
        if "error" in stats:
            continue
        unit = [str(stats.get("unit_id", i))]
        nbytes.add_metric(unit, stats["nbytes"])
        if stats.get("capacity_bytes") is not None:
            cap.add_metric(unit, stats["capacity_bytes"])
        parts = (stats.get("partitions") or {}).values()
        rows.add_metric(unit, sum(int(p.get("rows", 0)) for p in parts))
        waiting.add_metric(unit, stats.get("waiting_puts") or 0)
    yield from (nbytes, cap, rows, waiting)
    from transferqueue.ops.status import storage_row

    storage = storage_row(raw)
    stored = GaugeMetricFamily("transferqueue_stored_bytes", "bytes the units hold, summed")
    stored.add_metric([], storage["unit_bytes"])
    yield stored
    for key, text in (
        ("capacity_bytes", "the system-wide bound (storage.capacity_bytes)"),
        ("used_bytes", "committed bytes counted against the bound"),
        ("reserved_bytes", "bytes of puts in flight counted against the bound"),
    ):
        if storage[key] is not None:
            family = GaugeMetricFamily(f"transferqueue_{key}", text)
            family.add_metric([], storage[key])
            yield family


def _partition_families(raw: Mapping[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    from transferqueue.ops.status import partition_row

    p_, s_ = ["partition"], ["partition", "state"]
    rows = GaugeMetricFamily("transferqueue_partition_rows", "rows by state", labels=s_)
    produced = GaugeMetricFamily(
        "transferqueue_partition_produced_rows", "rows with a field", labels=[*p_, "field"]
    )
    consumed = GaugeMetricFamily(
        "transferqueue_partition_consumed_rows", "rows a task consumed", labels=[*p_, "task"]
    )
    leased = GaugeMetricFamily(
        "transferqueue_partition_leased_rows", "rows leased to a task", labels=[*p_, "task"]
    )
    waiting = GaugeMetricFamily(
        "transferqueue_partition_waiting_get_meta", "get_meta calls waiting", labels=[*p_, "task"]
    )
    expected = GaugeMetricFamily(
        "transferqueue_partition_expected_size", "reserved rows", labels=p_
    )
    sealed = GaugeMetricFamily("transferqueue_partition_sealed", "1 when sealed", labels=p_)
    for plain in raw["partitions"]:
        part = partition_row(plain)
        pid = part["partition_id"]
        for state in ("size", "pending", "in_flight", "lost"):
            rows.add_metric([pid, state], part[state])
        for name, n in part["produced"].items():
            produced.add_metric([pid, name], n)
        for name, n in part["consumed"].items():
            consumed.add_metric([pid, name], n)
        for name, n in (part["leased"] or {}).items():
            leased.add_metric([pid, name], n)
        for name, n in part["waiting"].items():
            waiting.add_metric([pid, name], n)
        expected.add_metric([pid], part["expected_size"])
        sealed.add_metric([pid], 1.0 if part["sealed"] else 0.0)
    yield from (rows, produced, consumed, leased, waiting, expected, sealed)


class _Collector:
    """A prometheus collector that asks the system's actors on every scrape."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def collect(self) -> Iterator[Any]:
        from transferqueue.runtime.loop import runtime_loop

        try:
            raw = runtime_loop().run(self._watcher.snapshot(), SCRAPE_TIMEOUT_S)
        except Exception as exc:  # the scrape says so (transferqueue_up 0); never raises
            log.warning("a metrics scrape could not reach the controller: %s", exc)
            raw = None
        yield from families(raw)


class MetricsServer:
    """The ``/metrics`` endpoint of one system, on a thread of this process."""

    def __init__(self, system: System, port: int, host: str) -> None:
        prometheus = _import_prometheus()
        from transferqueue.ops.status import Watcher, controller_of

        self._watcher = Watcher(controller_of(system))
        self.registry = prometheus.CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self._watcher))
        self._server, self._thread = prometheus.start_http_server(
            port, addr=host, registry=self.registry
        )
        bound_host, bound_port = self._server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        #: where to scrape, e.g. ``http://127.0.0.1:9464/metrics``
        self.url = f"http://{shown}:{bound_port}/metrics"
        log.info("transferqueue metrics at %s", self.url)

    def _shutdown_http(self) -> bool:
        server, self._server = self._server, None
        if server is None:
            return False
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=5)
        return True

    def close(self) -> None:
        """Stop serving (idempotent). From a thread other than the runtime loop's."""
        from transferqueue.runtime.loop import runtime_loop

        if self._shutdown_http():
            with contextlib.suppress(Exception):  # the loop may be gone at interpreter exit
                runtime_loop().run(self._watcher.aclose(), 5)

    async def aclose(self) -> None:
        """Stop serving (idempotent), from async code (``System.aclose``)."""
        import asyncio

        if await asyncio.get_running_loop().run_in_executor(None, self._shutdown_http):
            await self._watcher.aclose()


def start(system: System, port: int | None = None, host: str | None = None) -> MetricsServer:
    """Serve ``system``'s metrics from this process (port and host default to
    ``system.config.metrics``; port 0: the OS picks one). Returns the server (``.url``)."""
    cfg = system.config.metrics
    port = cfg.port if port is None else port
    if port is None:
        raise ConfigError("metrics.port is not set: pass a port (0: any free one)")
    server = MetricsServer(system, port, cfg.host if host is None else host)
    with _lock:
        old = _served.get(system)
        _served[system] = server
    if old is not None:
        old.close()
    return server


def ensure_started(system: System) -> MetricsServer | None:
    """Start ``system``'s metrics endpoint if its config asks for one (``metrics.port`` set)
    and this process does not serve it yet; returns the server, or None when off. What
    ``tq.init`` calls for the system it starts."""
    with _lock:
        running = _served.get(system)
    if running is not None:
        return running
    if system.config.metrics.port is None:
        return None
    return start(system)


def url_of(system: Any) -> str | None:
    """The URL this process serves ``system``'s metrics at, or None."""
    with _lock:
        server = _served.get(system)
    return None if server is None else server.url


def stop(system: Any) -> None:
    """Stop serving ``system``'s metrics (idempotent); :func:`astop` from async code."""
    with _lock:
        server = _served.pop(system, None)
    if server is not None:
        server.close()


async def astop(system: Any) -> None:
    """Stop serving ``system``'s metrics (what ``System.aclose`` calls; idempotent)."""
    with _lock:
        server = _served.pop(system, None)
    if server is not None:
        await server.aclose()
