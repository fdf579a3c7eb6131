"""``python -m transferqueue serve``: a standalone zmq service for multi-process jobs.

Starts a controller and storage units on the zmq transport, prints the address that
clients pass to ``tq.init``, and serves until interrupted (Ctrl-C or SIGTERM); the actor
processes stop with it.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from transferqueue.errors import ConfigError


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config} must hold a mapping at the top level")
        config.update(loaded)
    if config.setdefault("transport", "zmq") != "zmq":
        raise ConfigError("serve runs the zmq transport; remove 'transport' from the config")
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

    config = tq.init(_config(args))
    address = (config.system or {})["controller"]["endpoint"]
    print(f"transferqueue serving at {address}", flush=True)
    print(f'clients: tq.init("{address}")', flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    tq.close()
    print("transferqueue stopped", flush=True)
    return 0
