"""Columns between a CUDA device and the host: what a put of CUDA tensors and
``get_data(meta, device="cuda")`` do (docs/gpu.md).

* **put** (:func:`to_host`): every CUDA tensor of the batch is copied with
  ``non_blocking=True`` into a pinned buffer of the process's :class:`StagingPool`, one
  stream sync per device waits for those copies, and the put goes on with host tensors as a
  CPU put does. The copies are enqueued on each device's current stream, so they follow the
  kernels that produced the tensors there; once put returns, the caller may change its
  tensors (the bytes were copied). The buffers go back to the pool when the write is done
  (:meth:`Staged.release`); one still viewed (a frame being sent) is not reused.
* **get** (:class:`ToDevice`): a dense field is gathered from the units' replies into one
  pinned buffer (one host copy), moved to the device with ``non_blocking=True`` on the
  current stream, and put in batch order there (a device scatter) when several units
  answered; other tensor fields are assembled on the host and moved the same way. An event
  recorded on the current stream after the copies is the buffers' fence: the pool does not
  hand them out again before the copies from them are done. The tensors returned are fresh
  device tensors, safe to use on the current stream (another stream: ``wait_stream`` it).

"The current stream" is the caller's: the sync client runs the async one on the runtime's
loop thread, so its ``put`` and ``get_data`` capture the calling thread's CUDA device and
current stream (:func:`caller_cuda`) and the copies run on that stream
(:func:`on_caller_cuda`), as they would if the call ran in the calling thread.

Where the pool has no room (every buffer busy, or a field bigger than its bound) the copy is
a plain synchronous one: slower, never wrong. A CPU-only put pays one device check per
column and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

from transferqueue.client.routing import dense_pieces, jagged_parts
from transferqueue.runtime.staging import StagingPool, aligned

_pool: StagingPool | None = None
_pool_lock = threading.Lock()


def staging_pool() -> StagingPool:
    """This process's pool of pinned staging buffers (made on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = StagingPool()
        return _pool


def _forget_pool() -> None:
    """In a forked child: no pool (CUDA state does not survive a fork) and a fresh lock."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


T = TypeVar("T")

#: the CUDA device index and current stream of the thread that made a sync call
_caller: ContextVar[tuple[int, Any] | None] = ContextVar("tq_caller_cuda", default=None)


def caller_cuda() -> tuple[int, Any] | None:
    """The calling thread's current CUDA device and its current stream; ``None`` where
    CUDA is not initialised in this process (then no tensor is on a CUDA device)."""
    if not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device()
    return index, torch.cuda.current_stream(index)


async def on_caller_cuda(coro: Coroutine[Any, Any, T], cuda: tuple[int, Any] | None) -> T:
    """Await ``coro`` (on the loop thread) with the copies it makes on ``cuda``'s stream."""
    if cuda is not None:
        _caller.set(cuda)  # this task's context only
    return await coro


def stream_of(dev: torch.device) -> Any:
    """The stream copies to or from ``dev`` run on: the caller's current one."""
    if dev.type != "cuda":
        return None  # no streams: copies are synchronous
    caller = _caller.get()
    index = dev.index
    if index is None:
        index = caller[0] if caller is not None else torch.cuda.current_device()
    if caller is not None and caller[0] == index:
        return caller[1]
    return torch.cuda.current_stream(index)


def resolved(dev: torch.device) -> torch.device:
    """``dev`` with its index (``cuda`` -> the caller's current device)."""
    if dev.type != "cuda" or dev.index is not None:
        return dev
    caller = _caller.get()
    return torch.device("cuda", caller[0] if caller is not None else torch.cuda.current_device())


@contextlib.contextmanager
def _on(stream: Any) -> Iterator[None]:
    with torch.cuda.stream(stream):
        yield


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``get_data``'s ``device=`` as a ``torch.device`` (None stays None); ValueError for
    one that is not a device, has no data (``meta``) or is not there (CUDA absent)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ValueError(
            f"device must be a torch.device or a string like 'cuda:0'; got {type(device).__name__}"
        )
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device {device!r} is not a device (try 'cpu', 'cuda', 'cuda:0')"
        ) from None
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data: get the data on 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available in this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this process sees {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def on_device(columns: Mapping[str, Any]) -> bool:
    """Whether a column holds CUDA tensors (a list column: judged by its first value)."""
    for col in columns.values():
        if isinstance(col, torch.Tensor):
            if col.is_cuda:
                return True
        elif col and isinstance(col[0], torch.Tensor) and col[0].is_cuda:
            return True
    return False


class Staged:
    """Host columns of a put whose CUDA tensors were staged; release the buffers after
    the write."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self.buffers: list[torch.Tensor] = []
        self.devices: set[torch.device] = set()

    def release(self) -> None:
        for buf in self.buffers:
            self.pool.give(buf)
        self.buffers.clear()

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor with ``t``'s values, copied with non_blocking into a staging buffer
        (plain ``.cpu()`` where the pool has no room)."""
        if not t.is_cuda:
            return t
        buf = self.pool.take(t.nbytes)
        if buf is None:
            with _on(stream_of(t.device)):
                return t.cpu()
        self.buffers.append(buf)
        self.devices.add(t.device)
        with _on(stream_of(t.device)):
            return _typed(buf, t.dtype, t.shape).copy_(t, non_blocking=True)

    def _rows_copy(self, rows: list[Any]) -> list[Any]:
        """Per-row tensors (a jagged field as a list): their CUDA ones in one buffer."""
        cuda = [r for r in rows if isinstance(r, torch.Tensor) and r.is_cuda]
        if not cuda:
            return rows
        buf = self.pool.take(sum(aligned(r.nbytes) for r in cuda))
        if buf is None:
            return [self._host_copy(r) if isinstance(r, torch.Tensor) else r for r in rows]
        self.buffers.append(buf)
        out, at = [], 0
        for r in rows:
            if isinstance(r, torch.Tensor) and r.is_cuda:
                view = _typed(buf[at : at + r.nbytes], r.dtype, r.shape)
                with _on(stream_of(r.device)):
                    out.append(view.copy_(r, non_blocking=True))
                self.devices.add(r.device)
                at += aligned(r.nbytes)
            else:
                out.append(r)
        return out

    def column(self, col: Any) -> Any:
        if isinstance(col, list):
            return self._rows_copy(col)
        if not col.is_cuda:
            return col
        if col.is_nested:
            with _on(stream_of(col.device)):
                parts = jagged_parts(col)  # its offsets come to the host: small, synchronous
                if parts is None:
                    return col.cpu()
            values = self._host_copy(parts[0])
            return torch.nested.nested_tensor_from_jagged(values, parts[1])
        return self._host_copy(col)


def to_host(
    columns: dict[str, Any], pool: StagingPool | None = None
) -> tuple[dict[str, Any], Staged]:
    """``columns`` with every CUDA tensor copied to the host through staging buffers; the
    copies are complete when it returns. Release the :class:`Staged` after the write."""
    staged = Staged(pool or staging_pool())
    try:
        out = {name: staged.column(col) for name, col in columns.items()}
        for dev in staged.devices:  # one sync per device before the bytes go out
            stream_of(dev).synchronize()
    except BaseException:
        for dev in staged.devices:
            stream_of(dev).synchronize()  # no copy into a buffer given back
        staged.release()
        raise
    return out, staged


class ToDevice:
    """Moves one result's columns to a CUDA device through staging buffers; :meth:`close`
    (always, ``with``) fences the buffers behind the copies."""

    def __init__(self, device: torch.device, pool: StagingPool | None = None) -> None:
        self.device = resolved(device)
        self.stream = stream_of(self.device)
        self.pool = pool or staging_pool()
        self.buffers: list[torch.Tensor] = []
        self._context = contextlib.ExitStack()

    def __enter__(self) -> ToDevice:
        self._context.enter_context(_on(self.stream))  # allocations and copies on it
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self._context.close()

    def close(self) -> None:
        """Give the buffers back, fenced by an event recorded after the copies from them."""
        if not self.buffers:
            return
        fence = None
        if self.stream is not None:
            fence = torch.cuda.Event()
            fence.record(self.stream)
        for buf in self.buffers:
            self.pool.give(buf, fence)
        self.buffers.clear()

    def dense(self, pieces: Sequence[tuple[Any, Any]], n: int) -> torch.Tensor | None:
        """The ``n`` rows of a dense field from per-unit pieces ``(positions, tensor)``, on
        the device in batch order; ``None``: not dense host pieces of one shape and dtype."""
        kind = dense_pieces(list(pieces))
        if kind is None or kind[2] != n:
            return None
        row_shape, dtype, _ = kind
        buf = self.pool.take(sum(c.nbytes for _, c in pieces))
        if buf is None:
            staged = torch.cat([c for _, c in pieces]) if len(pieces) > 1 else pieces[0][1]
            moved = staged.to(self.device, copy=True)
        else:
            self.buffers.append(buf)
            host = _typed(buf, dtype, (n, *row_shape))
            at = 0
            for _, col in pieces:
                host[at : at + col.shape[0]].copy_(col)
                at += col.shape[0]
            moved = host.to(self.device, non_blocking=True, copy=True)
        index = torch.cat([torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p, _ in pieces])
        if bool((index == torch.arange(n)).all()):
            return moved
        out = torch.empty_like(moved)
        return out.index_copy_(0, index.to(self.device, non_blocking=True), moved)

    def column(self, col: Any) -> Any:
        """A host column (tensor, nested tensor, or anything else: left as is) on the
        device."""
        if not isinstance(col, torch.Tensor):
            return col
        if col.is_nested:
            parts = jagged_parts(col)
            if parts is not None:
                values = self._moved(parts[0])
                offsets = parts[1].to(self.device, non_blocking=True)
                return torch.nested.nested_tensor_from_jagged(values, offsets)
            return col.to(self.device)
        return self._moved(col)

    def _moved(self, t: torch.Tensor) -> torch.Tensor:
        buf = self.pool.take(t.nbytes)
        if buf is None:
            return t.to(self.device, copy=True)
        self.buffers.append(buf)
        host = _typed(buf, t.dtype, t.shape).copy_(t)
        return host.to(self.device, non_blocking=True, copy=True)


def _typed(buf: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The first bytes of the uint8 ``buf`` as a contiguous ``dtype`` tensor of ``shape``."""
    n = math.prod(int(s) for s in shape)
    return buf[: n * dtype.itemsize].view(dtype).view(tuple(shape))
