"""``python -m transferqueue bench``: runs the suite in the checkout's ``benchmarks/`` folder.

Benchmarks are not part of the installed package; run this from a source checkout.
Each ``benchmarks/bench_<name>.py`` module defines ``run(quick: bool) -> dict`` that prints
its own table and returns its figures; ``--json FILE`` writes them all.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _folder() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "benchmarks").is_dir():
            return base / "benchmarks"
    raise SystemExit(
        "no benchmarks/ folder found: run `python -m transferqueue bench` from a source checkout"
    )


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tq_bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available() -> dict[str, Path]:
    return {p.stem[len("bench_") :]: p for p in sorted(_folder().glob("bench_*.py"))}


def run_benchmarks(
    names: list[str], json_path: str | None = None, quick: bool = False, **options: Any
) -> int:
    """Run the benchmarks ``names`` (all by default). ``options`` set (not None or False),
    such as ``transport`` or ``curve``, go to the modules whose ``run`` takes them."""
    found = available()
    unknown = [n for n in names if n not in found]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(found)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    for name in names or list(found):
        print(f"\n=== {name} ===", flush=True)
        run = _load(found[name]).run
        takes = inspect.signature(run).parameters
        given = {k: v for k, v in options.items() if v not in (None, False) and k in takes}
        results[name] = run(quick=quick, **given)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nresults written to {json_path}")
    return 0
