"""nox sessions: tests on each transport, lint, typecheck.

Every session runs in the Python environment nox itself runs in -- the one README's test
command installed into (``pip install "torch==2.13.0" -e ".[test,ray]" && nox``). No session
creates a virtualenv or installs anything: the installed torch, ray and test tools are used
as they are, so set-up costs nothing and no session can download a second (CUDA) torch.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nox

#: `nox` alone: lint, typecheck, and the three transports' suites run side by side
nox.options.sessions = ["lint", "typecheck", "tests"]
TRANSPORTS = ("inproc", "zmq", "ray")
#: the runs of the tests session: each transport's suite, and the 3-node Ray cluster's tests
#: (tests/test_ray_multinode.py starts that cluster: it cannot share a process with the
#: single-node cluster of the other ray tests)
#: (the longest first: with TQ_TEST_JOBS runs at a time, the others fill in beside it)
RUNS = ("ray", "inproc", "zmq", "multinode")
#: runs at a time by default: two on a 2-core machine keep both cores busy while one run
#: waits on processes; four at once overloaded it enough to blow a 30 s test timeout
DEFAULT_JOBS = 2

#: the interpreter running nox: the environment README's pip command installed into
PYTHON = sys.executable
#: what ``pip install -e ".[test,ray]"`` provides; a session refuses to start without it
REQUIRED = ("transferqueue", "torch", "pytest", "ruff", "mypy", "ray")


def check_environment(session: nox.Session) -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        session.error(
            f"{PYTHON} lacks {', '.join(missing)}: nox runs the sessions in its own environment; "
            'install the project there first: pip install "torch==2.13.0" -e ".[test,ray]"'
        )


#: every run: no cache files in the checkout; the 15 slowest tests listed (where time goes)
COMMON = ("-p", "no:cacheprovider", "--durations=15")


def pytest_args(run: str, posargs: list[str]) -> list[str]:
    if run == "multinode":
        return ["-m", "pytest", "-m", "multinode", *COMMON, *posargs]
    args = ["-m", "pytest", f"--transport={run}", *COMMON, *posargs]
    if run != "inproc":  # inproc also runs the transport-free unit tests
        args += ["-m", "transport"]
    return args


@nox.session(python=False)
@nox.parametrize("transport", list(TRANSPORTS))
def transport(session: nox.Session, transport: str) -> None:
    """The test suite on one transport: ``nox -s "transport(transport='zmq')"``."""
    check_environment(session)
    session.run(PYTHON, *pytest_args(transport, session.posargs))


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The test suite on every transport and the multinode tests, the runs side by side
    (much of a run is waiting on other processes: actor start-up, Ray, deadlines), each
    logged to a file that is printed when it ends. ``TQ_TEST_JOBS=1`` runs them one after
    the other."""
    check_environment(session)
    jobs = max(1, int(os.environ.get("TQ_TEST_JOBS", DEFAULT_JOBS)))
    logs = Path(tempfile.mkdtemp(prefix="tq-tests-"))

    def run(name: str) -> tuple[str, int, float]:
        cmd = [PYTHON, *pytest_args(name, session.posargs)]
        session.log(f"[{name}] {' '.join(cmd)}  (log: {logs / name}.log)")
        started = time.monotonic()
        with (logs / f"{name}.log").open("w") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        return name, code, time.monotonic() - started

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(run, n) for n in RUNS]):
            name, code, took = future.result()
            session.log(f"[{name}] exit {code} after {took:.0f} s")
            if code != 0:
                failed.append(name)  # printed last: a CI that keeps only the tail shows it
            else:
                print((logs / f"{name}.log").read_text(), flush=True)
    for name in failed:
        text = (logs / f"{name}.log").read_text()
        print(text, flush=True)
        print(failure_recap(name, text), flush=True)
    if failed:
        session.error(f"tests failed on: {', '.join(sorted(failed))} (logs in {logs})")


#: lines of a failing run's tracebacks repeated at the very end of the tests session
RECAP_LINES = 80


def failure_recap(name: str, log: str) -> str:
    """The end of a failing run's FAILURES/ERRORS section and its FAILED/ERROR lines, so
    the last screen of the session says which test failed and why (the durations and skip
    list pytest prints after them would otherwise push them out of a kept tail)."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip("= ") in ("FAILURES", "ERRORS")]
    ends = [i for i, line in enumerate(lines) if "slowest" in line and line.startswith("=")]
    body: list[str] = []
    if starts:
        stop = next((e for e in ends if e > starts[0]), len(lines))
        body = lines[starts[0] : stop][-RECAP_LINES:]
    verdicts = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if not body and not verdicts:  # no test failed: pytest itself did (collection, a crash)
        body = lines[-RECAP_LINES:]
    return "\n".join([f"==== [{name}] failed: recap ====", *body, *verdicts])


@nox.session(python=False)
def tests_multinode(session: nox.Session) -> None:
    """Only the 3-node Ray cluster's tests: ``nox -s tests_multinode``."""
    check_environment(session)
    session.run(PYTHON, *pytest_args("multinode", session.posargs))


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    check_environment(session)
    session.run(PYTHON, "-m", "ruff", "check", ".")
    session.run(PYTHON, "-m", "ruff", "format", "--check", ".")


@nox.session(python=False)
def typecheck(session: nox.Session) -> None:
    check_environment(session)
    session.run(PYTHON, "-m", "mypy")
