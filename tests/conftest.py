"""Test fixtures: one test body, run on every transport.

``--transport inproc|zmq|ray|all`` (default: all) picks the transports that the
``transport_name`` fixture (and everything built on it) is parametrized over. Ray is
started once per test session, with ``num_cpus=2``, the first time a test needs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
ALL_TRANSPORTS = ("inproc", "zmq", "ray")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--transport",
        default="all",
        choices=[*ALL_TRANSPORTS, "all"],
        help="run transport-parametrized tests on this transport only (default: all)",
    )


def selected_transports(config: pytest.Config) -> list[str]:
    choice = config.getoption("--transport")
    return list(ALL_TRANSPORTS) if choice == "all" else [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport_name" in metafunc.fixturenames:
        names = selected_transports(metafunc.config)
        metafunc.parametrize("transport_name", names, scope="session", ids=names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests over the transports carry the ``transport`` mark; so do the Ray-only tests (they
    use ``ray_cluster`` without ``transport_name``), which run with the ray transport's suite
    -- on the cluster it starts anyway -- and are left out when ray is not selected."""
    with_ray = "ray" in selected_transports(config)
    kept, dropped = [], []
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "transport_name" in names or "ray_cluster" in names:
            item.add_marker(pytest.mark.transport)
        ray_only = "ray_cluster" in names and "transport_name" not in names
        (dropped if ray_only and not with_ray else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for the whole session (started on first use)."""
    import ray

    # actor classes defined in tests/ must be importable in Ray's worker processes
    paths = [str(TESTS_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if not ray.is_initialized():
        ray.init(
            # a cluster of this session's own (never one another test run on the machine
            # started), on loopback: tests address no interface but lo
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=2,
            namespace="transferqueue-tests",
            log_to_driver=False,
            include_dashboard=False,
        )
    # child processes (spawned producers, DataLoader workers) attach to this cluster, not
    # to whichever cluster on the machine started last ("auto")
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
    ray.shutdown()


@pytest.fixture(scope="session")
def base_config(transport_name: str, request: pytest.FixtureRequest) -> dict:
    if transport_name == "ray":
        request.getfixturevalue("ray_cluster")
    return {"transport": transport_name, "runtime": {"call_timeout": 60.0, "inproc_codec": True}}


@pytest.fixture
def python_env() -> dict[str, str]:
    """Environment for a child Python process that must import tests/ modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def system(base_config: dict):
    """A running system (controller + 2 storage units) on the transport under test."""
    from transferqueue.config import load_config
    from transferqueue.runtime.loop import runtime_loop
    from transferqueue.system import start_system

    started = runtime_loop().run(start_system(load_config(base_config)))
    yield started
    runtime_loop().run(started.aclose())


@pytest.fixture
def client(system):
    """The synchronous client of the session's system."""
    return system.client


@pytest.fixture
async def aclient(system):
    """An async client of the session's system, bound to this test's event loop."""
    c = system.new_async_client()
    yield c
    await c.close()


@pytest.fixture
def pid(request: pytest.FixtureRequest) -> str:
    """A partition id unique to this test."""
    return request.node.name
