"""Runtime conformance: one body per behaviour, run on every transport."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from actors import Echo, FailingStart
from tensordict import NonTensorData, NonTensorStack, TensorDict

from transferqueue.config import load_config
from transferqueue.errors import (
    ActorClosedError,
    ActorDiedError,
    ActorError,
    PartitionSealedError,
    RemoteError,
    TransportUnavailableError,
)
from transferqueue.runtime.actor import ActorRef
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import transport_class
from transferqueue.runtime.transports.base import ActorHandle, Transport


def make_transport(base_config: dict) -> Transport:
    config = load_config(base_config)
    return transport_class(config.transport)(config)


@pytest.fixture(scope="session")
def echo_handle(base_config: dict) -> Iterator[ActorHandle]:
    transport = make_transport(base_config)
    handle = runtime_loop().run(transport.spawn(Echo, ("hi",), name="echo"))
    yield handle
    runtime_loop().run(handle.stop())


@pytest.fixture
async def echo(echo_handle: ActorHandle) -> AsyncIterator[ActorRef]:
    ref = ActorRef(echo_handle.ref.address, echo_handle.ref.config)  # its own connections
    yield ref
    await ref.aclose()


def assert_same(a: object, b: object) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.is_nested == b.is_nested  # type: ignore[union-attr]
        if a.is_nested:
            for x, y in zip(a.unbind(), b.unbind()):  # type: ignore[union-attr]
                assert torch.equal(x, y)
        elif a.shape != b.shape:  # type: ignore[union-attr]
            raise AssertionError((a.shape, b.shape))  # type: ignore[union-attr]
        elif a.is_floating_point() and a.element_size() == 1:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # type: ignore[union-attr]
        else:
            assert torch.equal(a, b)  # type: ignore[arg-type]
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b):  # type: ignore[call-overload]
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # type: ignore[call-overload]
        for k in a:
            assert_same(a[k], b[k])  # type: ignore[index]
    else:
        assert a == b


PAYLOADS = {
    "none": None,
    "scalars": [True, False, 0, -(2**63), 2**63 - 1, 1.5, float("inf"), "text", "", b"\x00bytes"],
    "nested": {"a": [1, {"b": (2, 3.0, "x")}], 7: None, "t": (1, [2, (3,)])},
    "float": torch.randn(3, 4),
    "bf16": torch.randn(5, 2).to(torch.bfloat16),
    "fp8": torch.randn(8).to(torch.float8_e4m3fn),
    "bool": torch.tensor([True, False, True]),
    "complex": torch.randn(3, dtype=torch.complex64),
    "int64": torch.arange(10),
    "uint8": torch.arange(200, dtype=torch.uint8),
    "zero_dim": torch.tensor(3.5),
    "empty": torch.empty(0, 7),
    "non_contiguous": torch.arange(24.0).reshape(4, 6).t()[::2],
    "jagged": torch.nested.nested_tensor(
        [torch.arange(3), torch.arange(5), torch.arange(1)], layout=torch.jagged
    ),
}


@pytest.mark.parametrize("name", list(PAYLOADS))
async def test_round_trip_every_codec_type(echo: ActorRef, name: str) -> None:
    value = PAYLOADS[name]
    assert_same(await echo.call("echo", value), value)


async def test_round_trip_tensordict_with_non_tensor_entries(echo: ActorRef) -> None:
    td = TensorDict(
        {
            "ids": torch.arange(6).reshape(3, 2),
            "nested": TensorDict({"x": torch.ones(3, 2)}, batch_size=[3]),
            "text": NonTensorStack("a", "bb", "ccc"),
            "meta": NonTensorData({"k": 1}),
        },
        batch_size=[3],
    )
    out = await echo.call("echo", td)
    assert isinstance(out, TensorDict) and out.batch_size == td.batch_size
    assert torch.equal(out["ids"], td["ids"]) and torch.equal(out["nested", "x"], td["nested", "x"])
    assert out["text"] == ["a", "bb", "ccc"]
    assert out.get_non_tensor("meta") == {"k": 1}


async def test_keyword_arguments_and_defaults(echo: ActorRef) -> None:
    assert await echo.call("greet", "bob") == "hi bob!"
    assert await echo.call("greet", "bob", punctuation="?") == "hi bob?"


async def test_thousand_concurrent_calls_are_matched_to_their_requests(echo: ActorRef) -> None:
    results = await asyncio.gather(*(echo.call("delayed", i, i % 7) for i in range(1000)))
    assert results == list(range(1000))


async def test_large_multi_tensor_payload(echo: ActorRef) -> None:
    tensors = [torch.full((64 * 2**20 // 8,), i, dtype=torch.int64) for i in range(4)]  # 256 MiB
    out = await echo.call("echo", tensors)
    assert [t.shape for t in out] == [t.shape for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(out, tensors))


@pytest.mark.parametrize(
    ("kind", "exc_type"),
    [
        ("value", ValueError),
        ("type", TypeError),
        ("key", KeyError),
        ("timeout", TimeoutError),
        ("sealed", PartitionSealedError),
    ],
)
async def test_errors_keep_their_type(echo: ActorRef, kind: str, exc_type: type) -> None:
    with pytest.raises(exc_type):
        await echo.call("raise_error", kind)
    assert await echo.call("echo", 1) == 1  # the actor keeps serving


async def test_other_errors_arrive_as_remote_error_with_traceback(echo: ActorRef) -> None:
    with pytest.raises(RemoteError) as info:
        await echo.call("raise_error", "custom")
    assert "CustomError" in info.value.remote_type
    assert "something custom" in info.value.remote_traceback
    assert await echo.call("echo", 2) == 2


async def test_unknown_and_private_methods_are_refused(echo: ActorRef) -> None:
    with pytest.raises(ActorError, match="no remote method"):
        await echo.call("nope")
    with pytest.raises(ActorError, match="no remote method"):
        await echo.call("_private")


async def test_unencodable_argument_raises_type_error_in_caller(echo: ActorRef) -> None:
    with pytest.raises(TypeError, match="set"):
        await echo.call("echo", {"x": {1, 2}})
    assert await echo.call("echo", 3) == 3


async def test_unencodable_result_becomes_an_error_reply(echo: ActorRef) -> None:
    with pytest.raises(TypeError, match="set"):
        await echo.call("unencodable_result")
    assert await echo.call("echo", 4) == 4


async def test_call_times_out(echo: ActorRef) -> None:
    with pytest.raises(TimeoutError):
        await echo.call("never_returns", timeout=0.2)
    assert await echo.call("echo", 5) == 5


async def test_default_timeout_comes_from_config(
    echo_handle: ActorHandle, base_config: dict
) -> None:
    config = load_config({**base_config, "runtime": {"call_timeout": 0.2}})
    ref = ActorRef(echo_handle.ref.address, config)
    try:
        with pytest.raises(TimeoutError):
            await ref.call("never_returns")
    finally:
        await ref.aclose()


async def test_stop_is_idempotent_and_later_calls_fail_typed(base_config: dict) -> None:
    handle = await make_transport(base_config).spawn(Echo)
    assert await handle.ref.call("echo", 1) == 1
    await handle.stop()
    await handle.stop()
    with pytest.raises(ActorError):
        await handle.ref.call("echo", 1, timeout=10)


async def test_failing_constructor_is_reported_at_spawn(base_config: dict) -> None:
    with pytest.raises((ActorError, RuntimeError)):
        handle = await make_transport(base_config).spawn(FailingStart)
        await handle.ref.call("ping", timeout=10)


async def test_killed_actor_process_raises_typed_error_fast(
    base_config: dict, transport_name: str
) -> None:
    if transport_name == "inproc":
        pytest.skip("an inproc actor has no process of its own; see the stop test")
    handle = await make_transport(base_config).spawn(Echo)
    try:
        pid = await handle.ref.call("pid")
        pending = asyncio.ensure_future(handle.ref.call("never_returns", timeout=30))
        await handle.ref.call("echo", 0)  # the pending call has reached the actor
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ActorDiedError):
            await pending
        with pytest.raises(ActorDiedError):
            await handle.ref.call("echo", 1, timeout=30)
        assert time.monotonic() - started < 2.0  # well below the 30 s timeout
    finally:
        await handle.stop()


async def test_channel_close_twice_is_harmless(echo: ActorRef) -> None:
    assert await echo.call("echo", 1) == 1
    await echo.aclose()
    await echo.aclose()
    assert await echo.call("echo", 2) == 2  # a closed ref reconnects on next use


def test_sync_callers_from_other_threads(echo_handle: ActorHandle) -> None:
    loop = runtime_loop()
    ref = echo_handle.ref
    assert loop.run(ref.call("echo", "x")) == "x"


CHILD = """
import asyncio, pickle, sys
ref = pickle.loads(sys.stdin.buffer.read())
print(asyncio.run(ref.call("greet", "child")))
"""


def test_ref_pickled_into_spawned_subprocess(
    echo_handle: ActorHandle, transport_name: str, python_env: dict, base_config: dict
) -> None:
    if transport_name == "ray":
        python_env["RAY_NAMESPACE"] = "transferqueue-tests"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=pickle.dumps(echo_handle.ref),
        capture_output=True,
        env=python_env,
        timeout=90,
    )
    if transport_name == "inproc":
        assert proc.returncode != 0
        assert b"zmq" in proc.stderr and b"ray" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == "hi child!"


def test_inproc_ref_in_forked_child_says_what_to_do(base_config: dict) -> None:
    if base_config["transport"] != "inproc":
        pytest.skip("inproc only")
    handle = runtime_loop().run(make_transport(base_config).spawn(Echo))
    try:
        with pytest.raises(TransportUnavailableError, match="zmq"):
            type(handle.ref)  # same process works
            from transferqueue.runtime.transports.inproc import InprocTransport

            addr = handle.ref.address
            InprocTransport.connect(
                type(addr)(addr.transport, addr.endpoint, pid=addr.pid + 1), handle.ref.config
            )
    finally:
        runtime_loop().run(handle.stop())


async def test_stopped_inproc_actor_raises_closed(base_config: dict) -> None:
    if base_config["transport"] != "inproc":
        pytest.skip("inproc only")
    handle = await make_transport(base_config).spawn(Echo)
    await handle.stop()
    with pytest.raises(ActorClosedError):
        await handle.ref.call("echo", 1)
