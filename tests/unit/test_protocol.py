"""The call protocol, driven directly: a test transport that moves frames in memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
import torch

from transferqueue.errors import ActorError, PartitionSealedError, ProtocolError, RemoteError
from transferqueue.runtime import codec
from transferqueue.runtime.transports import _protocol as protocol
from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports._protocol import (
    CANCEL,
    Calls,
    Envelope,
    current_deadline,
    decode_reply,
    encode_reply,
)


class Worker:
    def __init__(self) -> None:
        self.writes: list[Any] = []
        self.started = asyncio.Event()
        self.gates: dict[str, asyncio.Event] = {}

    async def echo(self, value: Any) -> Any:
        return value

    async def deadline(self) -> float | None:
        return current_deadline()

    async def write_after(self, gate: str, value: Any) -> None:
        """Waits for ``gate``, then records ``value`` (a storage write)."""
        self.started.set()
        await self.gates.setdefault(gate, asyncio.Event()).wait()
        self.writes.append(value)

    async def open(self, gate: str) -> None:
        self.gates.setdefault(gate, asyncio.Event()).set()

    async def sealed(self) -> None:
        raise PartitionSealedError("sealed")

    async def custom(self) -> None:
        raise LookupError("odd")


class MemoryTransport:
    """Moves frames between one client (:class:`Calls`) and one :class:`Dispatcher`:
    each request is served in a task of its own, replies arrive in completion order."""

    def __init__(self, actor: Any) -> None:
        self.dispatcher = Dispatcher(actor)
        self.calls = Calls("memory")
        self.sent: list[list[Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def deliver(self, frames: Sequence[Any]) -> None:
        task = asyncio.ensure_future(self._serve(list(frames)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, frames: list[Any]) -> None:
        reply = await self.dispatcher.serve(frames)
        # bytes on the way back, as a socket would hand them over
        self.calls.receive([bytes(memoryview(f)) for f in reply])

    async def call(self, method: str, *args: Any, timeout: float | None = 5.0, **kw: Any) -> Any:
        deadline = protocol.deadline_of(timeout)
        envelope, frames = self.calls.request(method, args, kw, deadline, token=-1)
        fut = self.calls.expect(envelope.id)
        self.sent.append(frames)
        self.deliver(frames)
        try:
            return await fut
        finally:
            self.calls.forget(envelope.id)


@pytest.fixture
def wire() -> MemoryTransport:
    return MemoryTransport(Worker())


def test_envelope_round_trip_and_refusal() -> None:
    env = Envelope(7, "put", 123.5, 7)
    assert Envelope.decode(env.encode()) == env
    with pytest.raises(ProtocolError, match="envelope"):
        Envelope.decode(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="must be"):
        Envelope.decode(msgpack.packb([1, 2, 3, 4]))


async def test_dispatch_and_errors_keep_their_type(wire: MemoryTransport) -> None:
    assert await wire.call("echo", {"t": torch.arange(3)}) is not None
    assert (await wire.call("echo", [1, "x"])) == [1, "x"]
    with pytest.raises(PartitionSealedError):
        await wire.call("sealed")
    with pytest.raises(RemoteError, match="LookupError"):
        await wire.call("custom")
    with pytest.raises(ActorError, match="no remote method 'nope'"):
        await wire.call("nope")
    with pytest.raises(ActorError, match="no remote method"):
        await wire.call("__init__")


async def test_handler_sees_its_deadline(wire: MemoryTransport) -> None:
    before = time.time()
    seen = await wire.call("deadline", timeout=30)
    assert before + 30 <= seen <= time.time() + 30
    assert await wire.call("deadline", timeout=None) is None
    assert current_deadline() is None  # nothing leaks out of the handler


async def test_expired_request_is_not_executed() -> None:
    worker = Worker()
    dispatcher = Dispatcher(worker)
    env = Envelope(1, "write_after", time.time() - 0.5)
    reply = await dispatcher.serve(protocol.encode_request(env, ["g", "late"], {}))
    rid, _, error = decode_reply(reply)
    assert rid == 1 and isinstance(error, TimeoutError) and "not executed" in str(error)
    assert not worker.started.is_set() and worker.writes == []


async def test_handler_running_at_its_deadline_is_cancelled_and_never_writes() -> None:
    worker = Worker()
    dispatcher = Dispatcher(worker)
    env = Envelope(2, "write_after", time.time() + 0.05)
    reply = await dispatcher.serve(protocol.encode_request(env, ["g", "late"], {}))
    _, _, error = decode_reply(reply)
    assert isinstance(error, TimeoutError) and "deadline" in str(error)
    assert worker.started.is_set()
    # the handler's task has ended (cancelled) before the reply: it can never write later
    assert worker.writes == [] and not dispatcher._running


async def test_handler_that_suspends_goes_on_under_its_deadline(wire: MemoryTransport) -> None:
    # its first step runs inline; once it suspends it goes on in a task of its own
    worker = wire.dispatcher.actor
    call = asyncio.ensure_future(wire.call("write_after", "g", "v", timeout=30))
    await worker.started.wait()
    assert worker.writes == [] and not call.done()
    await wire.call("open", "g", timeout=30)
    assert await call is None
    assert worker.writes == ["v"] and not wire.dispatcher._running


async def test_cancel_request_cancels_by_token() -> None:
    worker = Worker()
    dispatcher = Dispatcher(worker)
    env = Envelope(3, "write_after", None, token=3)
    serving = asyncio.ensure_future(dispatcher.serve(protocol.encode_request(env, ["g", "x"], {})))
    await worker.started.wait()
    await dispatcher.serve(protocol.encode_request(Envelope(4, CANCEL, None, 3), [], {}))
    _, _, error = decode_reply(await serving)
    assert isinstance(error, ActorError) and "cancelled by its caller" in str(error)
    assert worker.writes == []


async def test_serve_now_answers_a_handler_that_does_not_suspend_at_once() -> None:
    # no task: the reply frames come back from the call itself, the call counted
    dispatcher = Dispatcher(Worker())
    env = Envelope(7, "echo", time.time() + 30, None)
    reply = dispatcher.serve_now(protocol.encode_request(env, [{"a": 1}], {}))
    assert isinstance(reply, list)
    assert decode_reply(reply) == (7, {"a": 1}, None)
    failed = dispatcher.serve_now(protocol.encode_request(Envelope(8, "sealed"), [], {}))
    assert isinstance(failed, list)
    assert isinstance(decode_reply(failed)[2], PartitionSealedError)
    methods = dispatcher.stats.snapshot("w")["methods"]
    assert methods["echo"]["calls"] == 1 and methods["sealed"]["errors"] == {
        "PartitionSealedError": 1
    }


async def test_serve_now_hands_a_handler_that_suspends_to_a_task() -> None:
    # its CANCEL token is armed before the loop runs again: a CANCEL that comes at once
    # still finds it
    worker = Worker()
    dispatcher = Dispatcher(worker)
    env = Envelope(3, "write_after", time.time() + 30, token=5)
    pending = dispatcher.serve_now(protocol.encode_request(env, ["g", "x"], {}))
    assert isinstance(pending, asyncio.Future) and worker.started.is_set()
    assert dispatcher.stats.snapshot("w")["methods"]["write_after"]["in_flight"] == 1
    cancel = dispatcher.serve_now(protocol.encode_request(Envelope(4, CANCEL, None, 5), [], {}))
    assert decode_reply(cancel) == (4, None, None)
    rid, _, error = decode_reply(await pending)
    assert rid == 3 and isinstance(error, ActorError) and "cancelled by its caller" in str(error)
    assert worker.writes == [] and not dispatcher._running
    assert dispatcher.stats.snapshot("w")["methods"]["write_after"]["in_flight"] == 0


async def test_serve_awaits_an_unsupervised_handler_that_suspends_without_a_task() -> None:
    # no deadline and no cancel token: nothing to supervise, so the serving coroutine goes
    # on with the handler itself (a task hop would cost a waiter's wake-up a loop turn);
    # with a deadline the handler runs in a task of its own, under its timer
    for deadline, tasks_while_waiting in ((None, 1), (time.time() + 30, 2)):
        worker = Worker()
        dispatcher = Dispatcher(worker)
        env = Envelope(1, "write_after", deadline, None)
        serving = asyncio.ensure_future(
            dispatcher.serve(protocol.encode_request(env, ["g", "x"], {}))
        )
        await worker.started.wait()
        mine = asyncio.current_task()
        assert len(asyncio.all_tasks() - {mine}) == tasks_while_waiting
        await worker.open("g")
        assert decode_reply(await serving) == (1, None, None)
        assert worker.writes == ["x"]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xff\xfe garbage"],
        [b"\x93\x01\x02", b"x" * 100],
        [b"\xc1"] * 5,
    ],
)
async def test_undecodable_envelope_is_answered_without_an_id(frames: list[bytes]) -> None:
    rid, _, error = decode_reply(await Dispatcher(Worker()).serve(frames))
    assert rid is None and isinstance(error, ProtocolError)


async def test_undecodable_body_is_answered_with_what_failed() -> None:
    env = Envelope(9, "echo", None)
    for body in ([b"\xc1"], [msgpack.packb({"not": "a list"})], []):
        rid, _, error = decode_reply(await Dispatcher(Worker()).serve([env.encode(), *body]))
        assert rid == 9 and isinstance(error, ProtocolError)
        assert "arguments of call 9 ('echo')" in str(error)


async def test_unencodable_result_becomes_an_error_reply() -> None:
    env = Envelope(1, "echo", None)
    reply = await Dispatcher(Worker()).serve(protocol.encode_request(env, [0], {}))
    assert decode_reply(reply) == (1, 0, None)
    _, _, error = decode_reply(encode_reply(5, True, {1, 2}))
    assert isinstance(error, TypeError)


async def test_reply_with_undecodable_body_fails_that_call_only() -> None:
    calls = Calls("memory")
    a, _ = calls.request("echo", [1], {}, None)
    b, _ = calls.request("echo", [2], {}, None)
    fa, fb = calls.expect(a.id), calls.expect(b.id)
    calls.receive([msgpack.packb([a.id, "r"]), b"\xc1"])
    calls.receive([msgpack.packb([b.id, "r"]), *codec.encode(2)])
    with pytest.raises(ProtocolError, match=f"result of reply {a.id}"):
        await fa
    assert await fb == 2
    calls.receive([b"garbage header"])  # no id: nothing to fail, nothing breaks


async def test_replies_out_of_order_are_matched_by_id(wire: MemoryTransport) -> None:
    slow = asyncio.ensure_future(wire.call("write_after", "g", "slow"))
    await wire.dispatcher.actor.started.wait()
    assert await wire.call("echo", "fast") == "fast"  # answered while the first waits
    await wire.call("open", "g")
    assert await slow is None
    assert wire.dispatcher.actor.writes == ["slow"]
    results = await asyncio.gather(*(wire.call("echo", i) for i in range(200)))
    assert results == list(range(200))


async def test_replies_for_nobody_are_dropped() -> None:
    calls = Calls("memory")
    calls.receive(encode_reply(42, True, "late"))  # the caller gave up already
    env, _ = calls.request("echo", [], {}, None)
    fut = calls.expect(env.id)
    calls.fail_all(ActorError("gone"))
    with pytest.raises(ActorError, match="gone"):
        await fut
