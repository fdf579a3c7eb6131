"""``python -m transferqueue demo|bench|serve|status|keygen``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m transferqueue", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the RL-style pipeline demo")
    from transferqueue.cli.demo import add_arguments

    add_arguments(demo)

    bench = sub.add_parser("bench", help="run benchmarks (from a source checkout)")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    bench.add_argument(
        "--transport", choices=["inproc", "zmq", "ray"], help="only this transport (data)"
    )
    bench.add_argument(
        "--curve", action="store_true", help="the cost of CURVE on zmq (data --transport zmq)"
    )

    serve = sub.add_parser("serve", help="run controller + storage units as a zmq service")
    serve.add_argument(
        "--config", metavar="FILE", help="a config file: YAML (.yaml, .yml) or TOML (.toml)"
    )
    serve.add_argument("--units", type=int, help="number of storage units")
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--protocol", choices=["tcp", "ipc"], help="zmq protocol (default tcp)")
    serve.add_argument(
        "--advertise-host",
        help="the address clients connect to (default: --host; for 0.0.0.0 the address of "
        "the interface of the default route)",
    )
    serve.add_argument(
        "--server-key", metavar="FILE", help="the server's CURVE .key_secret file (from keygen)"
    )
    serve.add_argument(
        "--allowed-clients", metavar="DIR", help="a folder of allowed clients' .key files"
    )
    serve.add_argument(
        "--allow-client",
        action="append",
        metavar="KEY",
        help="an allowed client's public key (Z85); repeatable",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve beyond loopback without CURVE authentication (anyone may call it)",
    )

    keygen = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret)")
    keygen.add_argument("dir", help="the folder to write the key files into")
    keygen.add_argument("--name", default="transferqueue", help="file name stem")

    status = sub.add_parser("status", help="watch a running system (read-only)")
    from transferqueue.cli.status import add_arguments as add_status_arguments

    add_status_arguments(status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from transferqueue.cli.demo import run

        return run(args)
    if args.command == "bench":
        from transferqueue.cli.bench import run_benchmarks

        return run_benchmarks(
            args.names,
            json_path=args.json,
            quick=args.quick,
            transport=args.transport,
            curve=args.curve,
        )
    if args.command == "status":
        from transferqueue.cli.status import run as run_status

        return run_status(args)
    if args.command == "keygen":
        return _keygen(args.dir, args.name)
    from transferqueue.cli.serve import serve

    return serve(args)


def _keygen(folder: str, name: str) -> int:
    from transferqueue.errors import ConfigError
    from transferqueue.runtime.transports.zmq_auth import write_key_pair

    try:
        public, secret = write_key_pair(folder, name)
    except ConfigError as exc:
        print(f"python -m transferqueue keygen: error: {exc}", file=sys.stderr)
        return 2
    import zmq.auth

    value = zmq.auth.load_certificate(public)[0].decode()
    print(f"public key: {public} (give it to whoever must allow or reach this key)")
    print(f"public key value (Z85, for zmq.curve.allowed_clients): {value}")
    print(f"secret key: {secret} (mode 0600: keep it on this host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
