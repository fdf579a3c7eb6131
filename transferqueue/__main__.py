"""``python -m transferqueue demo|bench|serve|status``."""

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

    serve = sub.add_parser("serve", help="run controller + storage units as a zmq service")
    serve.add_argument(
        "--config", metavar="FILE", help="a config file: YAML (.yaml, .yml) or TOML (.toml)"
    )
    serve.add_argument("--units", type=int, help="number of storage units")
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--protocol", choices=["tcp", "ipc"], help="zmq protocol (default tcp)")

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

        return run_benchmarks(args.names, json_path=args.json, quick=args.quick)
    if args.command == "status":
        from transferqueue.cli.status import run as run_status

        return run_status(args)
    from transferqueue.cli.serve import serve

    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
