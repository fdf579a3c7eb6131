"""The call protocol, written once and free of I/O: every transport only moves its frames.

A request is ``[envelope, *body]``: the envelope is one small msgpack frame
``[id, method, deadline, token]`` (:class:`Envelope`), decoded apart from the body, which is
``[args, kwargs]`` through :mod:`transferqueue.runtime.codec`. A reply is ``[header, *body]``: the
header is msgpack ``[id, "r" | "e"]`` and the body the codec frames of the result or of the
error (:func:`error_to_wire`).

* Server side (:mod:`._dispatch`), :meth:`Dispatcher.serve` turns every failure into an error reply: an
  envelope that does not decode (answered with id ``None``), an unknown method, a body that
  does not decode, a handler that raises. A request whose ``deadline`` (wall-clock seconds,
  ``time.time()``: peers are other processes and hosts) has passed when it arrives is not
  executed; a handler still running at its deadline is cancelled. Both answer
  ``TimeoutError``. :func:`current_deadline` tells a handler the deadline of its request.
  A request for method :data:`CANCEL` cancels the running requests that carry its token.
  A request for method :data:`STATS` answers the dispatcher's request counters
  (:class:`RequestStats`): calls, errors by type, in flight and a latency histogram per
  method. Every actor on every transport answers it; it changes nothing.
* Client side, :class:`Calls` numbers requests and matches replies to them by id; a reply
  whose body does not decode fails that one call with :class:`~transferqueue.errors.ProtocolError`.

Nothing here opens a socket; ``tests/unit/test_protocol.py`` drives it with in-memory frames.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import itertools
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from transferqueue import errors
from transferqueue.runtime import codec

log = logging.getLogger("transferqueue.protocol")

#: the method of a request that cancels the running requests carrying its token
CANCEL = "__cancel__"
#: the method of a built-in request every actor answers with :meth:`RequestStats.snapshot`
STATS = "__stats__"
#: upper bounds (seconds) of the request latency histogram's buckets (one more: +Inf):
#: 100 us to about 3.5 min, doubling
LATENCY_BOUNDS: tuple[float, ...] = tuple(1e-4 * 2**k for k in range(22))
#: the method name requests for a method the actor does not have are counted under
UNKNOWN_METHOD = "?"
_TRAVELLING_BUILTINS = ("ValueError", "TypeError", "KeyError", "TimeoutError")
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "transferqueue_deadline", default=None
)


def current_deadline() -> float | None:
    """The deadline (``time.time()`` seconds) of the request being handled, or None when it
    has none (or when called outside a request handler)."""
    return _deadline.get()


@dataclass(frozen=True)
class Envelope:
    """What a request is, apart from its arguments."""

    id: int
    method: str
    #: wall-clock seconds (``time.time()``) after which the answer is no use; None: never
    deadline: float | None = None
    #: requests that share a token are cancelled together by a :data:`CANCEL` request
    token: int | None = None

    def encode(self) -> bytes:
        return msgpack.packb([self.id, self.method, self.deadline, self.token])  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, frame: Any) -> Envelope:
        """The envelope in ``frame``; :class:`~transferqueue.errors.ProtocolError` if none."""
        try:
            rid, method, deadline, token = msgpack.unpackb(frame)
        except Exception as exc:
            raise errors.ProtocolError(f"a request envelope could not be decoded: {exc}") from None
        if (
            not isinstance(rid, int)
            or not isinstance(method, str)
            or not isinstance(deadline, (int, float, type(None)))
            or not isinstance(token, (int, type(None)))
        ):
            raise errors.ProtocolError(
                "a request envelope must be [id: int, method: str, deadline: float | None, "
                f"token: int | None], got {[rid, method, deadline, token]!r:.200}"
            )
        return cls(rid, method, deadline, token)


def encode_request(envelope: Envelope, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    """The frames of a request. Raises ``TypeError`` for arguments the codec cannot carry."""
    return [envelope.encode(), *codec.encode([list(args), dict(kwargs)])]


def encode_reply(rid: int | None, ok: bool, value: Any) -> list[Any]:
    """The frames of a reply: ``value`` is the result, or an exception when not ``ok``."""
    if ok:
        try:
            return [msgpack.packb([rid, "r"]), *codec.encode(value)]
        except Exception as exc:  # a result the codec cannot carry: answer with its error
            value = exc
    return [msgpack.packb([rid, "e"]), *codec.encode(error_to_wire(value))]


def decode_reply(frames: Sequence[Any]) -> tuple[int | None, Any, BaseException | None]:
    """``(id, result, error)`` of a reply. Raises ProtocolError when the header does not
    decode; a body that does not decode is returned as the error of that id."""
    try:
        rid, kind = msgpack.unpackb(frames[0])
        if kind not in ("r", "e") or not isinstance(rid, (int, type(None))):
            raise ValueError(f"unexpected header {[rid, kind]!r:.100}")
    except Exception as exc:
        raise errors.ProtocolError(f"a reply header could not be decoded: {exc}") from None
    try:
        body = codec.decode(frames[1:])
    except Exception as exc:
        what = "result" if kind == "r" else "error"
        return (
            rid,
            None,
            errors.ProtocolError(f"the {what} of reply {rid} could not be decoded: {exc}"),
        )
    if kind == "e":
        if not isinstance(body, dict):
            return rid, None, errors.ProtocolError(f"the error of reply {rid} is not a mapping")
        return rid, None, error_from_wire(body)
    return rid, body, None


# ------------------------------------------------------------------------ client side


class Calls:
    """Client side: numbers requests and matches replies to them by id."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}

    def request(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        deadline: float | None,
        token: int | None = None,
    ) -> tuple[Envelope, list[Any]]:
        """A new request's envelope and frames (raises ``TypeError`` for arguments the codec
        cannot carry). Call :meth:`expect` to wait for its reply. ``token=-1``: the
        request's own id, so that a CANCEL for that id cancels it."""
        rid = next(self._ids)
        envelope = Envelope(rid, method, deadline, rid if token == -1 else token)
        return envelope, encode_request(envelope, args, kwargs)

    def expect(self, rid: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        return fut

    def forget(self, rid: int) -> None:
        self._pending.pop(rid, None)

    def receive(self, frames: Sequence[Any]) -> None:
        """Settle the call that ``frames`` answers (a reply nobody waits for is dropped)."""
        try:
            rid, result, error = decode_reply(frames)
        except errors.ProtocolError as exc:
            log.warning("dropped a reply from %s: %s", self.where, exc)
            return
        fut = self._pending.pop(rid, None) if rid is not None else None
        if fut is None:
            if error is not None and rid is None:
                log.warning("%s could not read a request: %s", self.where, error)
            return
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)


def outcome(frames: Sequence[Any]) -> Any:
    """The result of a lone reply (no id to match): returns it or raises its error."""
    _, result, error = decode_reply(frames)
    if error is not None:
        raise error
    return result


def deadline_of(timeout: float | None) -> float | None:
    """The absolute deadline of a call that may take ``timeout`` seconds from now."""
    return None if timeout is None else time.time() + timeout


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (at least 0), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.time())


# ------------------------------------------------------------------------ errors on the wire


_SCALARS = (str, int, float, bool, type(None))


def _plain_arg(value: Any) -> bool:
    """An exception argument that travels as it is: a scalar, or a list of scalars (e.g.
    the rows a :class:`~transferqueue.errors.RowsLostError` names)."""
    if isinstance(value, list):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """An exception as plain data (codec-safe)."""
    cls = type(exc)
    args = [a for a in exc.args if _plain_arg(a)]
    if len(args) != len(exc.args):
        args = [str(exc)]
    if isinstance(exc, errors.RemoteError):
        args = [exc.args[0] if exc.args else "", exc.remote_type, exc.remote_traceback]
    return {
        "type": cls.__name__,
        "module": cls.__module__,
        "args": args,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def error_from_wire(data: dict[str, Any]) -> BaseException:
    """Rebuild an exception: same type for transferqueue errors and a few builtins."""
    name, module = data.get("type", ""), data.get("module", "")
    cls: Any = None
    if module == errors.__name__:
        cls = getattr(errors, name, None)
    elif module == "builtins" and name in _TRAVELLING_BUILTINS:
        cls = getattr(builtins, name)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return cls(*data.get("args", []))  # type: ignore[no-any-return]
        except Exception:  # an exotic constructor: fall back to RemoteError below
            pass
    return errors.RemoteError(
        f"{module}.{name}: {data.get('message', '')}", f"{module}.{name}", data.get("traceback", "")
    )
