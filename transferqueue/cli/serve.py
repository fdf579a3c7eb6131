"""``python -m transferqueue serve``: a standalone zmq service for multi-process jobs.

Starts a controller and storage units on the zmq transport, prints the address that
clients pass to ``tq.init``, and serves until interrupted (Ctrl-C or SIGTERM); the actor
processes stop with it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from transferqueue.config import read_config_file
from transferqueue.errors import ConfigError


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The config ``serve`` starts: the ``--config`` file (YAML or TOML, the keys of the dict
    form; checked here, so an error names the file), then the command-line options."""
    config: dict[str, Any] = {}
    if args.config:
        config.update(read_config_file(args.config))
    if config.setdefault("transport", "zmq") != "zmq":
        where = f" in {args.config}" if args.config else ""
        raise ConfigError(f"serve runs the zmq transport; remove 'transport'{where}")
    if args.units is not None:
        config.setdefault("storage", {})["units"] = args.units
    zmq_cfg = config.setdefault("zmq", {})
    if args.host is not None:
        zmq_cfg["host"] = args.host
    if args.protocol is not None:
        zmq_cfg["protocol"] = args.protocol
    return config


def serve(args: argparse.Namespace) -> int:
    import transferqueue as tq

    try:
        wanted = _config(args)
    except ConfigError as exc:
        print(f"python -m transferqueue serve: error: {exc}", file=sys.stderr)
        return 2
    config = tq.init(wanted)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the address is out: a client may stop us
        signal.signal(sig, lambda *_: stop.set())
    address = (config.system or {})["controller"]["endpoint"]
    print(f"transferqueue serving at {address}", flush=True)
    print(f'clients: tq.init("{address}")', flush=True)
    stop.wait()
    tq.close()
    print("transferqueue stopped", flush=True)
    return 0
