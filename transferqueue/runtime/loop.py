"""The runtime's background event loop: one thread per process, started on first use.

In-process actors run on it, and the synchronous client facade runs the async client on it.
It uses uvloop where available. After a fork the child gets a fresh loop of its own (the
parent's thread does not exist there).
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("transferqueue.loop")
_background: set[asyncio.Future[Any]] = set()  # fire-and-forget tasks, kept until done


def background(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Future[Any]:
    """Run ``coro`` on the running loop without awaiting it: the task is kept alive until it
    ends, and a failure is logged as ``what`` (nobody else will see it)."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(lambda t: _finished(t, what))
    return task


def _finished(task: asyncio.Future[Any], what: str) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %s", what, task.exception())


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop where it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


class LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self, name: str = "transferqueue-loop") -> None:
        self.loop = new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block the calling thread for its result."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "a synchronous transferqueue call was made from the runtime's own loop thread; "
                "use the async client (tq.get_async_client()) there"
            )
        # a task and a bare lock, not run_coroutine_threadsafe: its chained futures and
        # Condition cost ~30-50 us a call, a good part of a small put
        done = _thread.allocate_lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        self.loop.call_soon_threadsafe(start)
        try:
            if not done.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f"the call did not finish within {timeout} s")
        except BaseException:  # Ctrl-C or timeout in the caller: the call must not go on
            self.loop.call_soon_threadsafe(lambda: box[0].cancel() if box else coro.close())
            raise
        task = box[0]
        if task.cancelled():
            raise concurrent.futures.CancelledError()
        return task.result()


_lock = threading.Lock()
_current: tuple[int, LoopThread] | None = None


def runtime_loop() -> LoopThread:
    """This process's runtime loop thread (started on first use, restarted after a fork)."""
    global _current
    with _lock:
        if _current is None or _current[0] != os.getpid():
            _current = (os.getpid(), LoopThread())
        return _current[1]
