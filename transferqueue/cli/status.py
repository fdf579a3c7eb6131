"""``python -m transferqueue status``: the live status view (rich), ``--once`` and ``--json``.

What it shows is gathered by ``transferqueue.ops.status`` (the same data ``tq.status()``
returns); this module only renders it and runs the command.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from transferqueue.errors import TransferQueueError
from transferqueue.ops.status import (
    Watcher,
    attach_config,
    controller_ref,
    report,
)


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _rate(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}/s"


def _seconds(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def _pairs(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(d.items()))


def render(data: Mapping[str, Any]) -> Any:
    """A rich renderable of a status dict."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ctl = data["controller"]
    req = (ctl.get("requests") or {}).get("methods", {})
    everything = req.get("*", {})
    storage = data.get("storage") or {}
    cap = storage.get("capacity_bytes")
    head = Text(
        f"transferqueue  controller {ctl.get('address')} (pid {ctl.get('pid')})  "
        f"requests {_rate(everything.get('per_s'))}  p99 {_seconds(everything.get('p99_s'))}  "
        f"in flight {everything.get('in_flight', '-')}  "
        f"stored {_bytes(storage.get('unit_bytes'))}"
        + (f" of {_bytes(cap)}" if cap is not None else "")
        + (f"  metrics {data['metrics_url']}" if data.get("metrics_url") else ""),
        style="bold",
    )
    parts = Table(title="partitions", expand=True)
    has_leases = any(p["leased"] is not None for p in data["partitions"])
    for col in ("partition", "size/expected", "sealed", "pending", "produced", "consumed"):
        parts.add_column(col, overflow="fold")
    if has_leases:
        parts.add_column("leased", overflow="fold")
    for col in ("in flight", "lost", "waiting"):
        parts.add_column(col, overflow="fold")
    for p in data["partitions"]:
        row = [
            p["partition_id"],
            f"{p['size']}/{p['expected_size'] or '-'}",
            "yes" if p["sealed"] else "no",
            str(p["pending"]),
            _pairs(p["produced"]),
            _pairs(p["consumed"]),
        ]
        if has_leases:
            row.append(_pairs(p["leased"]))
        row += [str(p["in_flight"]), str(p["lost"]), _pairs(p["waiting"])]
        parts.add_row(*row)
    units = Table(title="storage units", expand=True)
    for col in ("unit", "pid", "bytes", "rows", "waiting puts", "puts", "gets"):
        units.add_column(col)
    for u in data["units"]:
        if "error" in u:
            units.add_row(str(u["unit_id"]), "-", u["error"], "", "", "", "")
            continue
        cap = u.get("capacity_bytes")
        used = _bytes(u["nbytes"]) + (f" / {_bytes(cap)}" if cap is not None else "")
        units.add_row(
            str(u["unit_id"]),
            str(u["pid"]),
            used,
            str(u["rows"]),
            str(u["waiting_puts"]),
            _rate(u["puts_per_s"]),
            _rate(u["gets_per_s"]),
        )
    methods = Table(title="controller requests", expand=True)
    for col in ("method", "calls", "rate", "p99", "in flight", "errors"):
        methods.add_column(col)
    for name, m in req.items():
        if name != "*":
            methods.add_row(
                name,
                str(m["calls"]),
                _rate(m["per_s"]),
                _seconds(m["p99_s"]),
                str(m["in_flight"]),
                _pairs(m["errors"]),
            )
    return Group(head, parts, units, methods)


# ------------------------------------------------------------------------ the command


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        metavar="ADDRESS|CONFIG",
        help="the controller address `serve` prints (tcp://...), or a config file of a ray "
        "system (transport ray, its namespace); default: the ray namespace 'transferqueue'",
    )
    parser.add_argument("--once", action="store_true", help="print one status and exit")
    parser.add_argument("--json", action="store_true", help="print JSON (implies --once)")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between snapshots: the refresh period, and the window of the rates "
        "with --once/--json (0: rates since each actor started)",
    )


def run(args: Any) -> int:
    from transferqueue.runtime.loop import runtime_loop

    try:
        config = attach_config(args.target)
        watcher = Watcher(controller_ref(config))
    except TransferQueueError as exc:
        print(f"python -m transferqueue status: error: {exc}", file=sys.stderr)
        return 2
    loop = runtime_loop()
    try:
        if args.once or args.json:
            before = loop.run(watcher.snapshot()) if args.interval > 0 else None
            if before is not None:
                time.sleep(args.interval)  # the window of the rates
            data = report(loop.run(watcher.snapshot()), before)
            if args.json:
                print(json.dumps(data, indent=2, sort_keys=True), flush=True)
            else:
                from rich.console import Console

                Console().print(render(data))
            return 0
        return _live(watcher, max(args.interval, 0.1))
    except KeyboardInterrupt:
        return 0
    except (TransferQueueError, TimeoutError, OSError) as exc:
        print(f"python -m transferqueue status: error: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.run(watcher.aclose())


def _live(watcher: Watcher, interval: float) -> int:
    from rich.console import Console
    from rich.live import Live

    from transferqueue.runtime.loop import runtime_loop

    loop = runtime_loop()
    before = loop.run(watcher.snapshot())
    with Live(render(report(before)), console=Console(), refresh_per_second=4) as live:
        while True:
            time.sleep(interval)  # the refresh period
            now = loop.run(watcher.snapshot())
            live.update(render(report(now, before)))
            before = now
