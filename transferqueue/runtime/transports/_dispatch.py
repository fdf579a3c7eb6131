"""The call protocol's server side, free of I/O: :class:`Dispatcher` runs an actor's methods
for request frames and answers them; :class:`RequestStats` counts them. The wire format,
the client side and the errors on the wire are in :mod:`._protocol`; what the server does
with each request is described there."""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from transferqueue import errors
from transferqueue.runtime import codec, memory
from transferqueue.runtime.transports._protocol import (
    CANCEL,
    LATENCY_BOUNDS,
    STATS,
    UNKNOWN_METHOD,
    Envelope,
    _deadline,
    encode_reply,
)

log = logging.getLogger("transferqueue.protocol")


class _MethodStats:
    __slots__ = ("buckets", "calls", "errors", "in_flight", "seconds")

    def __init__(self) -> None:
        self.calls = 0  # requests finished, failed ones included
        self.in_flight = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.errors: dict[str, int] = {}


class RequestStats:
    """The request counters of one :class:`Dispatcher`, cumulative since it started: per
    method the requests finished, in flight, failed (by exception type) and a latency
    histogram (:data:`LATENCY_BOUNDS`). Rates and windowed quantiles come from the difference
    of two snapshots."""

    def __init__(self) -> None:
        self.started = time.time()
        self._methods: dict[str, _MethodStats] = {}

    def _of(self, method: str) -> _MethodStats:
        stats = self._methods.get(method)
        if stats is None:
            stats = self._methods[method] = _MethodStats()
        return stats

    def begin(self, method: str) -> _MethodStats:
        stats = self._of(method)
        stats.in_flight += 1
        return stats

    def end(self, stats: _MethodStats, seconds: float, error: BaseException | None) -> None:
        stats.in_flight -= 1
        stats.calls += 1
        stats.seconds += seconds
        stats.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        if error is not None:
            name = type(error).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1

    def refused(self, method: str, error: BaseException) -> None:
        """A request answered with ``error`` before its method ran (it did not decode)."""
        self.end(self.begin(method), 0.0, error)

    def snapshot(self, actor: str) -> dict[str, Any]:
        """Plain data (codec-safe): ``{"actor", "pid", "started", "time", "bounds",
        "methods": {method: {"calls", "in_flight", "seconds", "buckets", "errors": {type:
        n}}}}``; ``buckets[i]`` counts requests that took at most ``bounds[i]`` seconds and
        more than ``bounds[i-1]`` (the last one: more than ``bounds[-1]``)."""
        return {
            "actor": actor,
            "pid": os.getpid(),
            "started": self.started,
            "time": time.time(),
            "bounds": list(LATENCY_BOUNDS),
            "methods": {
                name: {
                    "calls": m.calls,
                    "in_flight": m.in_flight,
                    "seconds": m.seconds,
                    "buckets": list(m.buckets),
                    "errors": dict(m.errors),
                }
                for name, m in self._methods.items()
            },
        }


async def _resume(coro: Any, yielded: Any) -> Any:
    """Go on with coroutine ``coro`` whose first step (run by hand) yielded ``yielded``."""
    return await _Resumed(coro, yielded)


class _Resumed:
    def __init__(self, coro: Any, yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        return _drive(self.coro, self.yielded)


def _drive(coro: Any, yielded: Any) -> Generator[Any, Any, Any]:
    """Everything the awaiting task sends or throws in is passed on to ``coro``."""
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation (or another throw) goes on to it
            try:
                yielded = coro.throw(exc)
            except StopIteration as finished:
                return finished.value
            continue
        try:
            yielded = coro.send(value)
        except StopIteration as finished:
            return finished.value


class Dispatcher:
    """Server side: turns requests into method calls on the actor, and every outcome into
    a reply."""

    def __init__(self, actor: Any, clock: Callable[[], float] = time.time) -> None:
        self.actor = actor
        self._clock = clock
        self._methods = {
            name: getattr(actor, name)
            for name, fn in inspect.getmembers(type(actor))
            if not name.startswith("_")
            and inspect.iscoroutinefunction(fn)
            and name not in ("on_start", "on_stop")
        }
        self._running: dict[int, list[Callable[[str], None]]] = {}
        self.stats = RequestStats()

    def serve_now(
        self, frames: Sequence[Any], owned: memory.RequestFrames | None = None
    ) -> list[Any] | asyncio.Future[list[Any]]:
        """The reply frames to request ``frames``, here and now when its handler finishes
        without suspending (most do: no task, no timer); else a future of them, the handler
        going on in a task of its own. Never raises (but the future may be cancelled).
        ``owned``: the frames nobody but this request holds, which its handler may keep
        (:func:`~transferqueue.runtime.memory.take_ownership`).

        A caller that sends an inline reply at once lets the caller of a ``commit`` hear back
        before the waiters it woke run: give the loop a turn first, as :meth:`serve` does."""
        begun = self._begin(frames, owned)
        if isinstance(begun, list):
            return begun
        rid, done, value = begun
        if done:
            return encode_reply(rid, True, value)
        return asyncio.ensure_future(self._reply_later(rid, value))

    async def serve(self, frames: Sequence[Any]) -> list[Any]:
        """The reply frames to request ``frames``. Never raises (but may be cancelled)."""
        begun = self._begin(frames)
        if isinstance(begun, list):  # refused: nothing ran
            return begun
        rid, done, value = begun
        if done:
            # one loop turn before the reply, as a task of its own took: waiters this call
            # woke (a commit's consumers) run before its caller hears back
            await asyncio.sleep(0)
            return encode_reply(rid, True, value)
        # awaited here, not in a task of its own (each task hop is a loop turn of latency);
        # a cancel of the serving coroutine cancels the handler too
        return await self._reply_later(rid, value)

    def _begin(
        self, frames: Sequence[Any], owned: memory.RequestFrames | None = None
    ) -> list[Any] | tuple[int, bool, Any]:
        """Decode request ``frames`` and start its call (:meth:`_start`): ``(request id,
        done, result or awaitable)``, or the reply frames of a request refused or failed at
        once."""
        try:
            envelope = Envelope.decode(frames[0]) if frames else None
        except errors.ProtocolError as exc:
            self.stats.refused(UNKNOWN_METHOD, exc)
            return encode_reply(None, False, exc)
        if envelope is None:
            empty = errors.ProtocolError("an empty request")
            self.stats.refused(UNKNOWN_METHOD, empty)
            return encode_reply(None, False, empty)
        if envelope.method == CANCEL:
            self.cancel(envelope.token)
            return encode_reply(envelope.id, True, None)
        try:
            args, kwargs = self._body(envelope, frames[1:])
        except errors.ProtocolError as exc:
            self.stats.refused(self._counted_as(envelope.method), exc)
            return encode_reply(envelope.id, False, exc)
        try:
            done, value = self._start(envelope, args, kwargs, owned)
        except Exception as exc:
            return encode_reply(envelope.id, False, exc)
        return envelope.id, done, value

    @staticmethod
    async def _reply_later(rid: int, result: Any) -> list[Any]:
        try:
            return encode_reply(rid, True, await result)
        except Exception as exc:
            return encode_reply(rid, False, exc)

    def _body(self, envelope: Envelope, frames: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        try:
            args, kwargs = codec.decode(frames)
            if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
                raise ValueError("the body must be [args: list, kwargs: dict]")
        except Exception as exc:
            raise errors.ProtocolError(
                f"the arguments of call {envelope.id} ({envelope.method!r}) could not be "
                f"decoded: {exc}"
            ) from None
        return list(args), kwargs

    def _counted_as(self, method: str) -> str:
        # only the actor's own methods get counters of their own: the set stays bounded
        return method if method in self._methods else UNKNOWN_METHOD

    async def run(self, envelope: Envelope, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Call the method of ``envelope`` within its deadline; raises what it raises. Every
        call is counted in :attr:`stats`; a :data:`STATS` request answers them (and the
        actor's ``remote_methods``, so a watcher asks only what it can answer) uncounted."""
        done, value = self._start(envelope, args, kwargs)
        if done:
            await asyncio.sleep(0)  # one loop turn, as in serve
            return value
        return await value

    def _start(
        self,
        envelope: Envelope,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        owned: memory.RequestFrames | None = None,
    ) -> tuple[bool, Any]:
        """Start the call of ``envelope``: ``(True, result)`` when its handler finished
        without suspending, else ``(False, awaitable of the result)``; raises what a handler
        that finished at once raised (or ``TimeoutError`` for a request past its deadline)."""
        if envelope.method == STATS:
            snapshot = self.stats.snapshot(type(self.actor).__name__)
            snapshot["remote_methods"] = sorted(self._methods)
            return True, snapshot
        counter = self.stats.begin(self._counted_as(envelope.method))
        start = time.perf_counter()
        try:
            fn = self._method(envelope.method)
            deadline = envelope.deadline
            left = None if deadline is None else deadline - self._clock()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"call {envelope.method!r} arrived {-left:.3f} s after its deadline; "
                    "it was not executed (raise the caller's timeout)"
                )
            reset = _deadline.set(deadline)
            # every handler sees its own request's frames only (None: a transport, inproc,
            # whose frames may be the caller's)
            reset_owned = memory.request_frames(owned)
            try:
                # most handlers finish without suspending: run the first step here, and
                # only one that suspends goes on in a task of its own, supervised (deadline
                # timer, cancel token)
                coro = fn(*args, **kwargs)
                try:
                    first = coro.send(None)
                except StopIteration as finished:
                    self.stats.end(counter, time.perf_counter() - start, None)
                    return True, finished.value
                if left is None and envelope.token is None:
                    # nothing to supervise (no deadline timer, no cancel token): the caller
                    # awaits the rest itself, no task (a task hop is a loop turn of latency)
                    return False, self._finish(envelope, _resume(coro, first), counter, start)
                # the task copies the context: the handler sees its deadline
                task = asyncio.ensure_future(_resume(coro, first))
            finally:
                memory.reset_request_frames(reset_owned)
                _deadline.reset(reset)
        except BaseException as exc:  # a failed call is counted too
            self.stats.end(counter, time.perf_counter() - start, exc)
            raise
        return False, self._finish(envelope, self._supervise(envelope, task, left), counter, start)

    async def _finish(
        self, envelope: Envelope, supervised: Any, counter: _MethodStats, start: float
    ) -> Any:
        error: BaseException | None = None
        try:
            return await supervised
        except BaseException as exc:  # a cancelled call is counted too
            error = exc
            raise
        finally:
            self.stats.end(counter, time.perf_counter() - start, error)

    def _supervise(self, envelope: Envelope, task: asyncio.Future[Any], left: float | None) -> Any:
        """Arm the deadline timer and the CANCEL token of ``task`` now (a CANCEL may come
        before the awaiting coroutine first runs); the coroutine returned awaits it."""
        why: list[str] = []

        def stop(reason: str) -> None:
            if not task.done():
                why.append(reason)
                task.cancel()

        timer = (
            None if left is None else asyncio.get_running_loop().call_later(left, stop, "deadline")
        )
        token = envelope.token
        if token is not None:
            self._running.setdefault(token, []).append(stop)
        return self._await_supervised(envelope, task, why, stop, timer)

    async def _await_supervised(
        self,
        envelope: Envelope,
        task: asyncio.Future[Any],
        why: list[str],
        stop: Callable[[str], None],
        timer: asyncio.TimerHandle | None,
    ) -> Any:
        token = envelope.token
        try:
            return await task  # a cancel of the serving task cancels the handler too
        except asyncio.CancelledError:
            if not why:
                raise
            if why[0] == "deadline":
                raise TimeoutError(
                    f"call {envelope.method!r} was still running at its deadline and was cancelled"
                ) from None
            raise errors.ActorError(
                f"call {envelope.method!r} was cancelled by its caller"
            ) from None
        finally:
            if timer is not None:
                timer.cancel()
            if token is not None:
                stops = self._running.get(token, [])
                if stop in stops:
                    stops.remove(stop)
                if not stops:
                    self._running.pop(token, None)

    def cancel(self, token: int | None) -> None:
        """Cancel the running requests that carry ``token``."""
        for stop in self._running.pop(token, []) if token is not None else []:
            stop("caller")

    def _method(self, method: str) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            raise errors.ActorError(
                f"{type(self.actor).__name__} has no remote method {method!r}; "
                f"available: {', '.join(sorted(self._methods))}"
            )
        return fn

    async def handle(self, method: Any, args: Any, kwargs: Any) -> Any:
        """Call ``method`` directly, without envelope or deadline."""
        if not isinstance(method, str):
            raise errors.ActorError(f"a method name must be a string, got {method!r:.100}")
        return await self._method(method)(*args, **kwargs)

    async def start(self) -> None:
        hook = getattr(self.actor, "on_start", None)
        if hook is not None:
            await hook()

    async def stop(self) -> None:
        hook = getattr(self.actor, "on_stop", None)
        if hook is not None:
            await hook()
