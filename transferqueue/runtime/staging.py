"""Pinned host buffers for copies between a device and the host, pooled and reused.

A copy between a CUDA device and host memory runs asynchronously (``non_blocking=True``) and
at full link speed only from or into *pinned* (page-locked) host memory; pinning costs far
more than the copy (``cudaHostAlloc`` of 1 GiB takes a few hundred ms), so a process keeps
the pinned buffers it used in a :class:`StagingPool` and reuses them.

A pooled buffer is in use, and never handed out again, while

* it is taken and not yet given back (:meth:`StagingPool.take` / :meth:`StagingPool.give`);
* the *fence* it was given back with (a ``torch.cuda.Event`` recorded after the copy from
  it) has not completed: a copy from it may still be in flight;
* a view of it is still alive somewhere (a zmq frame still being sent, a column a caller
  holds): counted with :func:`memory.storage_users`, as the storage's buffer pool does.

Bound: the pool holds at most ``max_bytes`` (default :data:`STAGING_POOL_BYTES`), free and in
use together. A request it cannot serve within the bound (bigger than the bound, or every
buffer busy) gets ``None``, and the caller copies without staging (a plain synchronous copy):
slower, never wrong. Idle buffers go oldest first to make room.

What pins memory is an injected detail (``allocate``): the default pins (``torch.empty(...,
pin_memory=True)``); tests on hosts without CUDA pass :func:`pageable` and exercise the same
pool logic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from transferqueue.runtime import memory

#: the most bytes of staging buffers one pool keeps (a 1 GiB put and a 1 GiB get in flight)
STAGING_POOL_BYTES = 2 << 30
_MAX_WASTE = 4  # a pooled buffer serves a request of at least 1/_MAX_WASTE of its size
#: where views into one staging buffer start (a multiple of every dtype's size)
ALIGN = 64

__all__ = ["ALIGN", "STAGING_POOL_BYTES", "Fence", "StagingPool", "aligned", "pageable", "pinned"]


class Fence(Protocol):
    """What a buffer is given back with: done once the copies from it have completed
    (``torch.cuda.Event`` is one)."""

    def query(self) -> bool: ...


def pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (needs CUDA)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def pageable(nbytes: int) -> torch.Tensor:
    """``nbytes`` of ordinary host memory: the allocator tests inject on hosts without CUDA."""
    return torch.empty(nbytes, dtype=torch.uint8)


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass
class _Entry:
    storage: torch.UntypedStorage
    out: bool = False  # taken and not given back
    fence: Fence | None = None


class StagingPool:
    """Host buffers for device copies, reused; thread-safe."""

    def __init__(
        self,
        max_bytes: int = STAGING_POOL_BYTES,
        allocate: Callable[[int], torch.Tensor] = pinned,
    ) -> None:
        self.max_bytes = max_bytes
        self._allocate = allocate
        self._entries: list[_Entry] = []  # least recently taken first
        self._lock = threading.Lock()
        #: bytes of buffers the pool holds (free and in use); <= max_bytes
        self.held_bytes = 0
        #: buffers allocated so far (a reused one is not counted again)
        self.allocations = 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A 1-D uint8 tensor of ``nbytes`` over a buffer no one else uses, or ``None`` when
        the bound leaves no room (copy without staging then). Give it back with
        :meth:`give` when the copies from or into it are enqueued."""
        if nbytes <= 0 or nbytes > self.max_bytes:
            return None
        with self._lock:
            entry = self._fitting(nbytes)
            if entry is None:
                entry = self._allocated(nbytes)
                if entry is None:
                    return None
            self._entries.remove(entry)
            self._entries.append(entry)
            entry.out, entry.fence = True, None
            return memory.on_storage(entry.storage, (nbytes,), torch.uint8)

    def give(self, buffer: torch.Tensor, fence: Fence | None = None) -> None:
        """``buffer`` (from :meth:`take`) is free once ``fence`` is done (no fence: now)."""
        ptr = buffer.untyped_storage().data_ptr()
        with self._lock:
            for entry in self._entries:
                if entry.storage.data_ptr() == ptr:
                    entry.out, entry.fence = False, fence
                    return
        raise ValueError("give() takes a buffer this pool handed out")

    def busy(self) -> int:
        """How many of the pool's buffers are in use now."""
        with self._lock:
            return sum(1 for e in self._entries if not self._idle(e))

    def clear(self) -> None:
        """Forget the idle buffers (their memory goes back when no view of them is left)."""
        with self._lock:
            for entry in [e for e in self._entries if self._idle(e)]:
                self._drop(entry)

    def _idle(self, entry: _Entry) -> bool:
        if entry.out or memory.storage_users(entry.storage) != 1:
            return False
        if entry.fence is not None:
            if not entry.fence.query():
                return False
            entry.fence = None
        return True

    def _fitting(self, nbytes: int) -> _Entry | None:
        best: _Entry | None = None
        for entry in self._entries:
            size = entry.storage.nbytes()
            if (
                nbytes <= size <= _MAX_WASTE * nbytes
                and (best is None or size < best.storage.nbytes())
                and self._idle(entry)
            ):
                best = entry
        return best

    def _allocated(self, nbytes: int) -> _Entry | None:
        """A new buffer, after dropping idle ones (oldest first) to make room; ``None``
        when the busy ones leave none."""
        while self.held_bytes + nbytes > self.max_bytes:
            victim = next((e for e in self._entries if self._idle(e)), None)
            if victim is None:
                return None
            self._drop(victim)
        storage = self._allocate(nbytes).untyped_storage()
        entry = _Entry(storage)
        self._entries.append(entry)
        self.held_bytes += storage.nbytes()
        self.allocations += 1
        return entry

    def _drop(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        self.held_bytes -= entry.storage.nbytes()
