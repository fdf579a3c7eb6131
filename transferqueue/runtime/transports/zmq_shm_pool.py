"""The sending side of same-host shared memory (:mod:`.zmq_shm`): a process's pool of memfd
segments, into which large frames are copied and which are reused once their receivers let
go (see the ownership rules there)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

#: the first byte of a descriptor frame: msgpack's never-used byte
MARK = 0xC1
#: seconds after which a segment sent but never acknowledged may be reused
RECLAIM_S = 120.0
PAGE = mmap.PAGESIZE  # a segment's header page: the gen and ack words
ALIGN = 64  # each frame starts on a cache line
ROUND = 2 << 20  # segment capacities are rounded up to 2 MiB
MEMFD_NAME = "tq-shm"
GEN, ACK = slice(0, 8), slice(8, 16)


def nbytes(frame: Any) -> int:
    if type(frame) is memoryview:
        return frame.nbytes
    if type(frame) is bytes:
        return len(frame)
    return memoryview(frame).nbytes


class _Segment:
    def __init__(self, capacity: int) -> None:
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, PAGE + capacity)
            self.map = mmap.mmap(self.fd, PAGE + capacity)
        except OSError:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)
        self.capacity = capacity
        self.gen = 0  # 0: never sent
        self.sent_at = 0.0

    def kept(self) -> bool:
        """Whether its receiver took the message and still holds it (a storage unit that
        keeps a put's frames as its buffers): the receiver's memory now, not the pool's."""
        if not self.gen or int.from_bytes(self.view[ACK], "little") != self.gen:
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def reusable(self, now: float) -> bool:
        """Take the segment for a new message (an exclusive lock, held until :meth:`sent`)
        if its receiver is done with it."""
        acked = int.from_bytes(self.view[ACK], "little") == self.gen
        if self.gen and not acked and now - self.sent_at < RECLAIM_S:
            return False  # sent, and the receiver has not taken it yet
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a receiver still maps it
        return True

    def sent(self, gen: int) -> None:
        self.gen, self.sent_at = gen, time.monotonic()
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


#: set in a forked child: torch's intra-op thread pool may hang there (what DataLoader
#: workers avoid with ``torch.set_num_threads(1)``), so copies are plain memcpy
_forked = False


def _copy(view: memoryview, at: int, src: memoryview) -> None:
    """``view[at:] = src``: torch's copy (vectorised; ~1.4x a memoryview assignment here)."""
    if src.readonly or _forked:  # torch wants writable sources
        view[at : at + src.nbytes] = src
        return
    dst = torch.frombuffer(view, dtype=torch.uint8, count=src.nbytes, offset=at)
    dst.copy_(torch.frombuffer(src, dtype=torch.uint8))


class Pool:
    """The sending side's segments, reused once their receivers let go; at most
    ``pool_bytes`` in all (beyond that a message takes the socket), not counting those their
    receivers keep (:meth:`_Segment.kept`): of those the pool remembers at most
    ``pool_bytes`` more, the newest (to reuse once their receivers let go: a storage unit
    that kept a step's puts drops them when the step is cleared), and closes its own handle
    of older ones (their memory then lives as long as the receiver holds it)."""

    def __init__(self, pool_bytes: int) -> None:
        self.pool_bytes = pool_bytes
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._segments)

    def _take(self, need: int) -> _Segment | None:
        now = time.monotonic()
        free = [s for s in self._segments if s.capacity >= need and s.reusable(now)]
        if free:
            best = min(free, key=lambda s: s.capacity)
            for s in free:
                if s is not best:
                    fcntl.flock(s.fd, fcntl.LOCK_UN)
            return best
        capacity = -(-need // ROUND) * ROUND
        kept = [s for s in self._segments if s.kept()]
        self._forget_oldest(kept)
        held = sum(s.capacity for s in self._segments) - sum(s.capacity for s in kept)
        if held + capacity > self.pool_bytes:  # drop free segments too small
            for s in list(self._segments):
                if s.reusable(now):
                    self._segments.remove(s)
                    s.close()
                    held -= s.capacity
                if held + capacity <= self.pool_bytes:
                    break
            else:
                return None
        seg = _Segment(capacity)
        fcntl.flock(seg.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segments.append(seg)
        return seg

    def _forget_oldest(self, kept: list[_Segment]) -> None:
        """Close this side of the oldest kept segments beyond ``pool_bytes`` of them."""
        total = sum(s.capacity for s in kept)
        while kept and total > self.pool_bytes:
            s = kept.pop(0)
            self._segments.remove(s)
            total -= s.capacity
            with contextlib.suppress(OSError, BufferError):
                s.close()

    def pack(self, frames: Sequence[Any], indexes: Sequence[int], start: int) -> list[Any] | None:
        """``frames`` with those at ``indexes`` moved into a segment and a descriptor frame
        inserted at ``start``; None when no segment can be had (full, or no memfd)."""
        parts, offset = [], 0
        for i in indexes:
            n = nbytes(frames[i])
            parts.append([i, offset, n])
            offset += -(-n // ALIGN) * ALIGN
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: its parent's segments are not its own
                self._segments, self._pid = [], os.getpid()
            try:
                seg = self._take(offset)
            except OSError:
                return None
            if seg is None:
                return None
            gen = secrets.randbits(63) | 1
            view = seg.view
            try:
                for (_, off, _n), frame in zip(parts, (frames[i] for i in indexes)):
                    _copy(view, PAGE + off, memoryview(frame).cast("B"))
            except BaseException:
                fcntl.flock(seg.fd, fcntl.LOCK_UN)  # never sent: free for the next message
                raise
            view[GEN] = gen.to_bytes(8, "little")
            seg.sent(gen)
        out = list(frames)
        for i in indexes:
            out[i] = b""
        out.insert(start, bytes([MARK]) + msgpack.packb([self._pid, seg.fd, gen, parts]))
        return out

    def close(self) -> None:
        with self._lock:
            for s in self._segments:
                with contextlib.suppress(OSError, BufferError):
                    s.close()
            self._segments = []


_pools: dict[int, Pool] = {}
_pools_lock = threading.Lock()


def pool(pool_bytes: int) -> Pool:
    """This process's pool (one per process; the first caller sizes it)."""
    pid = os.getpid()
    with _pools_lock:
        p = _pools.get(pid)
        if p is None:
            p = _pools[pid] = Pool(pool_bytes)
        return p


def _after_fork_in_child() -> None:
    """A forked child starts with fresh locks (a parent thread may have held one) and makes
    its own pool (:func:`pool` is per process)."""
    global _pools_lock, _forked
    _pools_lock, _forked = threading.Lock(), True
    for p in _pools.values():
        p._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
