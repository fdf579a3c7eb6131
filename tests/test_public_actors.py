"""The public actor API (transferqueue.actors) on every transport, and its shape."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from actors import CustomError, Echo
from conftest import ROOT

import transferqueue.actors as public
from transferqueue.actors import (
    Actor,
    ActorClosedError,
    ActorError,
    ActorHandle,
    ActorRef,
    RemoteError,
    connect,
    run,
    spawn,
)
from transferqueue.errors import ConfigError

pytestmark = pytest.mark.timeout(120)


class Counter(Actor):
    """A user-defined actor with lifecycle hooks (importable by actor processes: tests/ is
    on their path)."""

    def __init__(self, start: int = 0, *, step: int = 1) -> None:
        self.value = start
        self.step = step
        self.started = False

    async def on_start(self) -> None:
        self.started = True

    async def add(self, times: int = 1) -> int:
        self.value += self.step * times
        return self.value

    async def was_started(self) -> bool:
        return self.started


@pytest.fixture(scope="module")
def echo(base_config: dict) -> Iterator[ActorHandle]:
    """One Echo actor for the module, started and stopped through the sync helper."""
    handle = run(spawn(Echo, "hi", config=base_config), timeout=90)
    yield handle
    run(handle.aclose(), timeout=30)


async def test_spawn_call_and_aclose(base_config: dict) -> None:
    async with spawn(Counter, 10, step=5, config=base_config, name="counter") as counter:
        assert isinstance(counter, ActorHandle)
        assert await counter.call("was_started") is True  # on_start ran before the first call
        assert await counter.call("add") == 15
        assert await counter.ref.call("add", times=2) == 25
        assert isinstance(counter.ref, ActorRef)
        assert (counter.pid is None) == (base_config["transport"] == "inproc")
    with pytest.raises(ActorClosedError):
        await counter.call("add")
    with pytest.raises(ActorClosedError):
        counter.ref  # noqa: B018 - the property raises
    await counter.aclose()  # idempotent


async def test_await_spawn_then_stop(base_config: dict) -> None:
    handle = spawn(Counter, config=base_config)
    with pytest.raises(RuntimeError, match="not started"):
        handle.ref  # noqa: B018 - the property raises
    assert await handle is handle
    assert await handle is handle  # starts once
    assert await handle.call("add", 3) == 3
    await handle.stop()
    await handle.stop()
    with pytest.raises(ActorClosedError):
        await handle.start()


async def test_transport_argument_overrides_config(transport_name: str) -> None:
    config: dict[str, Any] = {"transport": "inproc", "runtime": {"call_timeout": 60.0}}
    if transport_name == "ray":
        config["ray"] = {"namespace": "transferqueue-tests"}
    handle = spawn(Counter, transport=transport_name, config=config)
    assert handle.config.transport == transport_name
    if transport_name == "inproc":  # spawning on the others is covered above
        async with handle:
            assert await handle.call("add") == 1


@pytest.mark.parametrize(
    ("kind", "error"),
    [("value", ValueError), ("type", TypeError), ("key", KeyError), ("timeout", TimeoutError)],
)
async def test_error_travels_with_its_type(
    echo: ActorHandle, kind: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await echo.call("raise_error", kind)
    assert await echo.call("echo", 1) == 1  # the actor goes on serving


async def test_other_errors_arrive_as_remote_error(echo: ActorHandle) -> None:
    with pytest.raises(RemoteError) as info:
        await echo.call("raise_error", "custom")
    assert info.value.remote_type.endswith(CustomError.__name__)
    assert "something custom" in str(info.value)
    with pytest.raises(ActorError, match="no remote method"):
        await echo.call("no_such_method")
    with pytest.raises(TypeError):  # not a codec payload: refused before it is sent
        await echo.call("echo", {1, 2, 3})


async def test_timeout_raises_timeout_error(echo: ActorHandle) -> None:
    with pytest.raises(TimeoutError):
        await echo.call("never_returns", timeout=0.2)
    assert await echo.call("greet", "you", punctuation="?", timeout=None) == "hi you?"


async def test_connect_by_url_and_by_address(echo: ActorHandle, base_config: dict) -> None:
    for where in (echo.url, echo.address):
        ref = connect(where, config=base_config)
        assert isinstance(ref, ActorRef) and ref.address == echo.address
        assert await ref.call("echo", "x") == "x"
        await ref.aclose()


@pytest.mark.parametrize(
    "url",
    ["", "tcp://127.0.0.1:1", "zmq+udp://h:1", "ray://only-one-part", "inproc://x/key", "x://a/b"],
)
def test_connect_rejects_what_is_not_an_actor_url(url: str) -> None:
    with pytest.raises(ConfigError, match="not an actor url"):
        connect(url)


def test_spawn_refuses_what_zmq_cannot_import() -> None:
    main_class = type("InMain", (Actor,), {"__module__": "__main__"})
    with pytest.raises(ConfigError, match="__main__"):
        spawn(main_class, transport="zmq")
    with pytest.raises(ConfigError, match="transport must be one of"):
        spawn(Counter, transport="carrier-pigeon")
    with pytest.raises(TypeError, match="actor class"):
        spawn(Counter(), transport="inproc")  # type: ignore[arg-type]


def test_run_is_the_sync_way_in() -> None:
    handle = run(spawn(Counter, 1))
    try:
        assert run(handle.call("add", 2)) == 3
    finally:
        run(handle.aclose())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tutorial_09_on_the_transport_under_test(
    transport_name: str, python_env: dict[str, str]
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            str(ROOT / "tutorials" / "09_your_own_actor.py"),
            "--transport",
            transport_name,
        ],
        capture_output=True,
        text=True,
        env=python_env,
        cwd=ROOT,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"your own actor ({transport_name}): OK" in proc.stdout


# ------------------------------------------------------------------------ the API's shape

PUBLIC = [
    "TRANSPORTS",
    "Actor",
    "ActorClosedError",
    "ActorDiedError",
    "ActorError",
    "ActorHandle",
    "ActorRef",
    "Address",
    "ProtocolError",
    "RemoteError",
    "TransportUnavailableError",
    "connect",
    "current_deadline",
    "run",
    "spawn",
]

SIGNATURES = {
    "spawn": "(cls: 'type', /, *args: 'Any', transport: 'str | None' = None, "
    "config: 'Config | Mapping[str, Any] | None' = None, name: 'str | None' = None, "
    "**kwargs: 'Any') -> 'ActorHandle'",
    "connect": "(address: 'Address | str', *, config: 'Config | Mapping[str, Any] | None' = None)"
    " -> 'ActorRef'",
    "run": "(awaitable: 'Awaitable[T]', timeout: 'float | None' = None) -> 'T'",
    "current_deadline": "() -> 'float | None'",
    "ActorRef.call": "(self, method: 'str', /, *args: 'Any', timeout: 'Any' = <DEFAULT>, "
    "**kwargs: 'Any') -> 'Any'",
    "ActorRef.aclose": "(self) -> 'None'",
    "ActorHandle.call": "(self, method: 'str', /, *args: 'Any', timeout: 'Any' = <DEFAULT>, "
    "**kwargs: 'Any') -> 'Any'",
    "ActorHandle.start": "(self) -> 'ActorHandle'",
    "ActorHandle.aclose": "(self) -> 'None'",
    "ActorHandle.stop": "(self) -> 'None'",
    "Actor.on_start": "(self) -> 'None'",
    "Actor.on_stop": "(self) -> 'None'",
}
PROPERTIES = {"ActorHandle": ["address", "pid", "ref", "url"]}


def _signature(obj: Any) -> str:
    text = str(inspect.signature(obj))
    return text.replace(repr(public.DEFAULT), "<DEFAULT>")


def test_public_names_do_not_change_by_accident() -> None:
    assert public.__all__ == PUBLIC
    for name in PUBLIC:
        assert hasattr(public, name), name


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_public_signatures_do_not_change_by_accident(name: str) -> None:
    obj: Any = public
    for part in name.split("."):
        obj = getattr(obj, part)
    assert _signature(obj) == SIGNATURES[name]


def test_public_properties_do_not_change_by_accident() -> None:
    for cls_name, names in PROPERTIES.items():
        cls = getattr(public, cls_name)
        found = sorted(n for n, v in vars(cls).items() if isinstance(v, property))
        assert found == names, cls_name


RUNTIME = {
    "transferqueue.runtime.actor",
    "transferqueue.config",
    "transferqueue.errors",
    "transferqueue.runtime.loop",
    "transferqueue.runtime.transports",
}


def test_the_module_stands_on_the_runtime_only() -> None:
    """Nothing of the domain (partitions, storage, clients) leaks into the public actor API."""
    tree = ast.parse(Path(public.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {m for m in imported if m.split(".")[0] == "transferqueue"}
    assert ours <= RUNTIME, ours - RUNTIME
