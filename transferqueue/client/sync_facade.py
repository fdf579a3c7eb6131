"""The synchronous client: a thin facade that runs the async client (the one
implementation) on the runtime's loop thread -- the library's one sync bridge."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from transferqueue.client.async_client import AsyncTransferQueueClient
from transferqueue.client.device import caller_cuda, on_caller_cuda
from transferqueue.config import Config
from transferqueue.runtime.loop import LoopThread, background, runtime_loop

T = TypeVar("T")


def finish_on(loop: LoopThread, coro: Coroutine[Any, Any, None]) -> asyncio.Future[Any] | None:
    """Run a clean-up coroutine: from the calling thread, or -- when a generator is
    finalised by the garbage collector on the loop thread itself -- in the background (kept
    alive until done; a failure is logged rather than lost)."""
    if loop.in_loop_thread():
        return background(coro, "closing a stream")
    loop.run(coro)
    return None


async def _anext(items: AsyncIterator[T]) -> T:
    return await items.__anext__()


async def _aclose(
    items: AsyncIterator[Any], on_close: Callable[[], Coroutine[Any, Any, None]] | None
) -> None:
    try:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
    finally:
        if on_close is not None:
            await on_close()


P = ParamSpec("P")
R = TypeVar("R")


def _sync(
    method: Callable[Concatenate[AsyncTransferQueueClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[TransferQueueClient, P], R]:
    """The sync twin of an async client method: the same signature (mypy checks the
    arguments and the result type; ``inspect.signature`` shows the async one's), run on
    the runtime's loop thread."""
    name = method.__name__

    @functools.wraps(method)
    def call(self: TransferQueueClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.run(getattr(self.async_client, name)(*args, **kwargs))

    return call


def _sync_cuda(
    method: Callable[Concatenate[AsyncTransferQueueClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[TransferQueueClient, P], R]:
    """:func:`_sync` for the calls that copy CUDA tensors: their copies run on the calling
    thread's current CUDA stream, not the loop thread's (client/device.py)."""
    name = method.__name__

    @functools.wraps(method)
    def call(self: TransferQueueClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        coro = getattr(self.async_client, name)(*args, **kwargs)
        cuda = caller_cuda()
        return self.run(coro if cuda is None else on_caller_cuda(coro, cuda))

    return call


class TransferQueueClient:
    """The synchronous client: every method runs the async client on the runtime's loop
    thread. Safe from plain code, from several threads, and from inside another running
    event loop's thread."""

    def __init__(self, async_client: AsyncTransferQueueClient) -> None:
        self._async = async_client

    @property
    def _loop(self) -> LoopThread:
        # looked up per call: after a fork the child has a loop thread of its own (the
        # parent's does not exist there), and the refs reconnect from the child
        return runtime_loop()

    @property
    def async_client(self) -> AsyncTransferQueueClient:
        return self._async

    @property
    def config(self) -> Config:
        return self._async.config

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine (of the async client, or one built on it) on the runtime loop
        and return its result: the one sync bridge everything synchronous goes through."""
        return self._loop.run(coro)

    def iterate(
        self,
        items: AsyncIterator[T],
        on_close: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> Iterator[T]:
        """Drive an async iterator (e.g. ``async_client.stream(...)``) from synchronous code.
        When the iteration ends, is abandoned or is garbage-collected, the async iterator is
        closed on the loop and then ``on_close()`` is awaited (e.g. to close a client owned
        by the iteration); a failure while closing on the loop itself is logged, not lost."""
        try:
            while True:
                try:
                    item = self.run(_anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self.finish(_aclose(items, on_close))

    def finish(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[Any] | None:
        """Run a clean-up coroutine now, or in the background when called on the loop
        thread itself (see :func:`finish_on`)."""
        return finish_on(self._loop, coro)

    def __enter__(self) -> TransferQueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        # closes this client's connections only (a later call connects again): the system
        # keeps running, so ``with tq.get_client() as c:`` is safe
        self.close()

    create_partition = _sync(AsyncTransferQueueClient.create_partition)
    reserve = _sync(AsyncTransferQueueClient.reserve)
    advance_version = _sync(AsyncTransferQueueClient.advance_version)
    ack = _sync(AsyncTransferQueueClient.ack)
    nack = _sync(AsyncTransferQueueClient.nack)
    seal = _sync(AsyncTransferQueueClient.seal)
    list_partitions = _sync(AsyncTransferQueueClient.list_partitions)
    partition_info = _sync(AsyncTransferQueueClient.partition_info)
    clear_partition = _sync(AsyncTransferQueueClient.clear_partition)
    clear_samples = _sync(AsyncTransferQueueClient.clear_samples)
    reset_consumption = _sync(AsyncTransferQueueClient.reset_consumption)
    check_consumption_status = _sync(AsyncTransferQueueClient.check_consumption_status)
    check_production_status = _sync(AsyncTransferQueueClient.check_production_status)
    get_consumption_status = _sync(AsyncTransferQueueClient.get_consumption_status)
    get_production_status = _sync(AsyncTransferQueueClient.get_production_status)
    set_tags = _sync(AsyncTransferQueueClient.set_tags)
    set_custom_meta = _sync(AsyncTransferQueueClient.set_custom_meta)
    get_partition_list = _sync(AsyncTransferQueueClient.get_partition_list)
    put = _sync_cuda(AsyncTransferQueueClient.put)
    get_meta = _sync(AsyncTransferQueueClient.get_meta)
    get_data = _sync_cuda(AsyncTransferQueueClient.get_data)
    kv_put = _sync_cuda(AsyncTransferQueueClient.kv_put)
    kv_get = _sync(AsyncTransferQueueClient.kv_get)
    kv_list = _sync(AsyncTransferQueueClient.kv_list)
    kv_clear = _sync(AsyncTransferQueueClient.kv_clear)
    save_checkpoint = _sync(AsyncTransferQueueClient.save_checkpoint)
    load_checkpoint = _sync(AsyncTransferQueueClient.load_checkpoint)
    close = _sync(AsyncTransferQueueClient.close)
