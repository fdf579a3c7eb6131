"""``python -m transferqueue serve``: a standalone zmq service for multi-process jobs.

Starts a controller and storage units on the zmq transport, prints the address that
clients pass to ``tq.init``, and serves until interrupted (Ctrl-C or SIGTERM); the actor
processes stop with it. Beyond loopback it requires CURVE keys (``--server-key``, from
``python -m transferqueue keygen``) or ``--insecure``; see README "Across hosts (zmq)".
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
    if args.advertise_host is not None:
        zmq_cfg["advertise_host"] = args.advertise_host
    if args.insecure:
        zmq_cfg["insecure"] = True
    curve: dict[str, Any] = {}
    if args.server_key is not None:
        curve["server_key_file"] = args.server_key
    if args.allowed_clients is not None:
        curve["allowed_clients_dir"] = args.allowed_clients
    if args.allow_client:
        allowed = zmq_cfg.get("curve", {}).get("allowed_clients", ())
        curve["allowed_clients"] = [*allowed, *args.allow_client]
    if curve:
        zmq_cfg["curve"] = {**zmq_cfg.get("curve", {}), **curve}
    return config


def serve(args: argparse.Namespace) -> int:
    import transferqueue as tq

    try:
        wanted = _config(args)
    except ConfigError as exc:
        print(f"python -m transferqueue serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        config = tq.init(wanted)
    except ConfigError as exc:  # the bind rule (no keys beyond loopback), a bad key file
        print(f"python -m transferqueue serve: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the address is out: a client may stop us
        signal.signal(sig, lambda *_: stop.set())
    address = (config.system or {})["controller"]["endpoint"]
    print(f"transferqueue serving at {address}", flush=True)
    if config.zmq.curve.enabled:
        print(
            f"clients: tq.init({{'transport': 'zmq', 'system': {{'controller': '{address}'}}, "
            "'zmq': {'curve': {'server_key_file': '<the server .key file>', "
            "'client_key_file': '<an allowed client .key_secret file>'}}})",
            flush=True,
        )
    else:
        print(f'clients: tq.init("{address}")', flush=True)
    stop.wait()
    tq.close()
    print("transferqueue stopped", flush=True)
    return 0
