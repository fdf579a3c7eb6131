"""nox sessions: tests on each transport, lint, typecheck.

Sessions run in virtualenvs that see the system site-packages, so the torch that is
already installed is reused: no session downloads a second torch.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

VENV_PARAMS = ["--system-site-packages"]


def install(session: nox.Session) -> None:
    # torch is satisfied from the system site-packages; pip installs nothing it already has
    session.install("-e", ".[test,ray]")


@nox.session(venv_params=VENV_PARAMS)
@nox.parametrize("transport", ["inproc", "zmq", "ray"])
def tests(session: nox.Session, transport: str) -> None:
    """The test suite on one transport (inproc also runs the transport-free unit tests)."""
    install(session)
    args = ["-m", "pytest", f"--transport={transport}", *session.posargs]
    if transport != "inproc":
        args += ["-m", "transport"]
    session.run("python", *args)


@nox.session(venv_params=VENV_PARAMS)
def lint(session: nox.Session) -> None:
    install(session)
    session.run("python", "-m", "ruff", "check", ".")
    session.run("python", "-m", "ruff", "format", "--check", ".")


@nox.session(venv_params=VENV_PARAMS)
def typecheck(session: nox.Session) -> None:
    install(session)
    session.run("python", "-m", "mypy")
