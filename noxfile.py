"""nox sessions: tests on each transport, lint, typecheck.

Every session runs in the Python environment nox itself runs in -- the one README's test
command installed into (``pip install "torch==2.13.0" -e ".[test,ray]" && nox``). No session
creates a virtualenv or installs anything: the installed torch, ray and test tools are used
as they are, so set-up costs nothing and no session can download a second (CUDA) torch.
"""

from __future__ import annotations

import importlib.util
import sys

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "tests_multinode"]

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


@nox.session(python=False)
@nox.parametrize("transport", ["inproc", "zmq", "ray"])
def tests(session: nox.Session, transport: str) -> None:
    """The test suite on one transport (inproc also runs the transport-free unit tests)."""
    check_environment(session)
    args = ["-m", "pytest", f"--transport={transport}", *session.posargs]
    if transport != "inproc":
        args += ["-m", "transport"]
    session.run(PYTHON, *args)


@nox.session(python=False)
def tests_multinode(session: nox.Session) -> None:
    """The ray transport on a 3-node local Ray cluster (tests/test_ray_multinode.py starts it;
    it cannot share a process with the single-node cluster of the other ray tests)."""
    check_environment(session)
    session.run(PYTHON, "-m", "pytest", "-m", "multinode", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    check_environment(session)
    session.run(PYTHON, "-m", "ruff", "check", ".")
    session.run(PYTHON, "-m", "ruff", "format", "--check", ".")


@nox.session(python=False)
def typecheck(session: nox.Session) -> None:
    check_environment(session)
    session.run(PYTHON, "-m", "mypy")
