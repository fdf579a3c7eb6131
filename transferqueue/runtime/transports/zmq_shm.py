"""Same-host shared memory for the zmq transport: large frames travel in memfd segments.

A message whose frames of at least ``zmq.shm_min_bytes`` go to a peer on this host (same
kernel, same pid namespace, same user: :func:`host_id`, which each side puts in its zmq
handshake metadata) travels as the small frames plus one *descriptor* frame; the large
frames are copied into a segment of the sender's pool (:class:`Pool`), and the receiver
decodes tensors straight over its mapping of that segment. See "Same-host shared memory" in
docs/architecture.md for the decision and the figures.

* A segment is an anonymous ``memfd`` (no name in ``/dev/shm``: nothing to leak, whoever is
  killed). The receiver opens it as ``/proc/<sender pid>/fd/<fd>``, which the kernel allows a
  process of the same user only.
* Ownership travels with an ``flock``: for each message the receiver takes a shared lock on
  an open of its own of the segment and maps that open's header page, a *lease* that every
  frame of the message holds (the frames are numpy views with the lease attached), so the
  lock lives as long as any tensor over them (the kernel drops it when the last one is
  freed, or when the receiver dies). The bytes are read through one mapping per sender
  segment kept across messages (:class:`Receiver`; :func:`sweep` forgets those whose sender
  closed them or died). The sender reuses a segment only once the receiver acknowledged it
  (an ``ack`` word in the segment's header page) *and* an exclusive lock succeeds: what you
  received is yours as long as you hold it; what you sent you may change at once (it was
  copied).
* A descriptor names a segment by ``(pid, fd, gen)``; ``gen`` is a random 63-bit number the
  sender writes in the header before each use: a receiver that finds another ``gen`` (the
  segment was reclaimed, or the fd number reused) refuses the message. A segment sent but
  never acknowledged (its receiver vanished) is reclaimed after :data:`RECLAIM_S`.

Descriptor frame: ``MARK + msgpack([pid, fd, gen, [[index, offset, length], ...]])``, placed
before the message's first protocol frame; each frame it moved is left as ``b""`` in place.
``MARK`` is 0xC1, a byte msgpack never uses, so no envelope or reply header starts with it.
A server names a request's shared-memory frames to its handler (:func:`owned`), which may
keep them instead of copying them (a storage unit's buffer; ``zmq.shm_keep``): the frames
hold the message's lease, so the sender stays off that segment until they are freed.

The sending side (segments, the pool) is in :mod:`.zmq_shm_pool`. Nothing here touches a
socket; ``tests/unit/test_zmq_shm_segments.py`` drives it in one process.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zmq

from transferqueue.errors import ActorDiedError, ProtocolError
from transferqueue.runtime.transports.zmq_shm_pool import (
    ACK,
    MARK,
    MEMFD_NAME,
    PAGE,
    RECLAIM_S,
    Pool,
    nbytes,
    pool,
)

__all__ = [
    "COUNTERS",
    "MARK",
    "RECLAIM_S",
    "Owned",
    "Pool",
    "Receiver",
    "ShmSettings",
    "host_id",
    "is_descriptor",
    "large_frames",
    "owned",
    "pack",
    "pool",
    "same_host",
    "sweep",
    "tag_host",
    "unpack",
]

#: the zmq handshake metadata property that carries :func:`host_id`
HOST_PROPERTY = "X-TQ-Host"


@dataclass(frozen=True)
class ShmSettings:
    """What the transport needs of ``zmq.shared_memory`` / ``shm_min_bytes`` / ``shm_pool_bytes``."""

    enabled: bool = True
    min_bytes: int = 1 << 20
    pool_bytes: int = 1 << 30
    keep: bool = True  # a server's handlers may keep request frames (``zmq.shm_keep``)

    @classmethod
    def of(cls, zmq_config: Any) -> ShmSettings:
        return cls(
            bool(zmq_config.shared_memory),
            int(zmq_config.shm_min_bytes),
            int(zmq_config.shm_pool_bytes),
            bool(zmq_config.shm_keep),
        )


_host_id: str | None = None


def host_id() -> str:
    """Who can open this process's memfds: same boot, pid namespace and user (and hostname,
    for a reader). Peers whose ids are equal use shared memory; others the socket."""
    global _host_id
    if _host_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            pidns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:  # no /proc (not Linux): never the same host as anyone
            boot, pidns = secrets.token_hex(16), 0
        raw = f"{boot}/{pidns}/{os.getuid()}/{os.uname().nodename}"
        _host_id = hashlib.sha256(raw.encode()).hexdigest()[:32]
    return _host_id


class Counters:
    """Bytes of large frames by path, for this process (tests and benchmarks read them)."""

    def __init__(self) -> None:
        self.sent_shm = self.sent_socket = self.received_shm = 0
        self.messages_shm = self.fallbacks = 0

    def snapshot(self) -> dict[str, int]:
        return dict(vars(self))


#: this process's counters (a forked child starts from its parent's figures)
COUNTERS = Counters()


def large_frames(frames: Sequence[Any], start: int, min_bytes: int) -> list[int]:
    """Indexes (from ``start``) of the frames that would travel in shared memory."""
    return [i for i in range(start, len(frames)) if nbytes(frames[i]) >= min_bytes]


def pack(
    frames: list[Any],
    start: int,
    settings: ShmSettings,
    same_host: bool,
    indexes: list[int] | None = None,
) -> list[Any]:
    """The frames to send: large ones through shared memory when the peer is on this host,
    else ``frames`` themselves. Counts the bytes of large frames by path. ``indexes``: the
    :func:`large_frames` of ``frames``, when the caller has them."""
    if indexes is None:
        indexes = large_frames(frames, start, settings.min_bytes)
    if not indexes:
        return frames
    size = sum(nbytes(frames[i]) for i in indexes)
    if settings.enabled and same_host:
        out = pool(settings.pool_bytes).pack(frames, indexes, start)
        if out is not None:
            COUNTERS.sent_shm += size
            COUNTERS.messages_shm += 1
            return out
        COUNTERS.fallbacks += 1
    COUNTERS.sent_socket += size
    return frames


def is_descriptor(buf: Any) -> bool:
    return nbytes(buf) > 0 and memoryview(buf)[0] == MARK


class _Leased(np.ndarray):
    """A received frame: a view of a cached segment mapping that holds its message's lease
    (a one-page mapping of the receiver's locked open of the segment)."""

    lease: mmap.mmap | None = None


@dataclass
class _Mapped:
    map: mmap.mmap
    ino: int


class Receiver:
    """The receiving side: one mapping per sender segment, kept across messages (mapping a
    segment afresh for each message, then unmapping it, cost as much as the copy out of it),
    at most ``cache_bytes`` of them; each message's frames hold a lease of their own."""

    def __init__(self, cache_bytes: int = 1 << 30) -> None:
        self.cache_bytes = cache_bytes
        self._maps: dict[tuple[int, int], _Mapped] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._maps)

    def unpack(self, bufs: list[Any], start: int) -> list[Any]:
        try:
            pid, fd, gen, parts = msgpack.unpackb(memoryview(bufs[start])[1:])
            end = max(off + n for _, off, n in parts)
        except Exception as exc:
            raise ProtocolError(f"a shared-memory descriptor could not be decoded: {exc}") from None
        path = f"/proc/{pid}/fd/{fd}"
        rfd = _open(path)
        try:
            lease, ino, size = _lease(rfd, path, gen, end)
            data = self._mapping(pid, fd, ino, size, path)
        finally:
            os.close(rfd)
        lease[ACK] = gen.to_bytes(8, "little")
        out = bufs[:start] + bufs[start + 1 :]
        for i, off, n in parts:
            view = np.frombuffer(data, np.uint8, n, PAGE + off).view(_Leased)
            view.lease = lease
            out[i] = view
        COUNTERS.received_shm += sum(n for _, _, n in parts)
        return out

    def _mapping(self, pid: int, fd: int, ino: int, size: int, path: str) -> mmap.mmap:
        with self._lock:
            known = self._maps.get((pid, fd))
            if known is not None and known.ino == ino and len(known.map) >= size:
                return known.map
            self._sweep(drop=(pid, fd))
            mfd = _open(path)  # an open of its own: the mapping must hold no message's lock
            try:
                mapped = _Mapped(mmap.mmap(mfd, os.fstat(mfd).st_size), ino)
            finally:
                os.close(mfd)
            self._maps[(pid, fd)] = mapped
            return mapped.map

    def _sweep(self, drop: tuple[int, int] | None = None) -> None:
        """Forget the mappings of segments their senders closed (or died with), of ``drop``,
        and the oldest beyond ``cache_bytes``; frames still alive keep theirs mapped."""
        for (pid, fd), m in list(self._maps.items()):
            try:
                gone = (pid, fd) == drop or os.stat(f"/proc/{pid}/fd/{fd}").st_ino != m.ino
            except OSError:
                gone = True
            if gone:
                del self._maps[(pid, fd)]
        while self._maps and sum(len(m.map) for m in self._maps.values()) > self.cache_bytes:
            del self._maps[next(iter(self._maps))]

    def sweep(self) -> None:
        with self._lock:
            self._sweep()


#: this process's receiving side
RECEIVER = Receiver()


def unpack(bufs: list[Any], start: int) -> list[Any]:
    """``bufs`` with a descriptor at ``start`` (if any) resolved: each moved frame becomes an
    array over the sender's segment, which stays this receiver's while any of them lives.
    Raises ProtocolError for a descriptor that does not resolve (ActorDiedError when its
    sender is gone)."""
    if len(bufs) <= start or not is_descriptor(bufs[start]):
        return bufs
    return RECEIVER.unpack(bufs, start)


class Owned:
    """The frames of a received message that :func:`unpack` put in shared memory, which
    nobody but the message holds (``memory.RequestFrames``: its handler may keep them)."""

    def __init__(self, bufs: Sequence[Any]) -> None:
        self._at = {b.ctypes.data: b for b in bufs if type(b) is _Leased and b.nbytes}

    def left(self) -> int:
        return sum(b.nbytes for b in self._at.values())

    def take(self, start: int, nbytes: int) -> Any | None:
        """A buffer over ``[start, start + nbytes)``: one frame, or consecutive frames (of
        one segment, as one message's are) as one view holding the message's lease."""
        parts, at, end = [], start, start + nbytes
        while at < end and at in self._at:
            parts.append(self._at[at])
            at += parts[-1].nbytes
        if at != end or not parts:
            return None
        for b in parts:
            del self._at[b.ctypes.data]
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        root: Any = first
        while isinstance(root, np.ndarray):  # down to the segment's mapping
            root = root.base
        base = np.frombuffer(root, np.uint8)
        view = base[start - base.ctypes.data : end - base.ctypes.data].view(_Leased)
        view.lease = first.lease
        return view


def owned(bufs: Sequence[Any]) -> Owned | None:
    """:class:`Owned` of ``bufs`` (None when no frame came in shared memory)."""
    frames = Owned(bufs)
    return frames if frames._at else None


def _after_fork_in_child() -> None:
    """A forked child starts with a fresh lock (a parent thread may have held one)."""
    RECEIVER._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def sweep() -> None:
    """Unmap what this process keeps mapped of segments their senders closed or died with."""
    RECEIVER.sweep()


def _open(path: str) -> int:
    try:
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
            raise ProtocolError(f"{path} is not a transferqueue segment")
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ActorDiedError(f"the sender of a shared-memory message ({path}) is gone") from None
    except OSError as exc:
        raise ProtocolError(f"cannot open the shared-memory segment {path}: {exc}") from None


def _lease(rfd: int, path: str, gen: int, end: int) -> tuple[mmap.mmap, int, int]:
    """Lock ``rfd`` shared and map its header page (which holds the open file, and so the
    lock, while the message's frames live): (lease, inode, bytes needed)."""
    try:
        fcntl.flock(rfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ProtocolError(f"the shared-memory segment {path} was reclaimed") from None
    st = os.fstat(rfd)
    if int.from_bytes(os.pread(rfd, 8, 0), "little") != gen or st.st_size < PAGE + end:
        raise ProtocolError(f"the shared-memory segment {path} was reclaimed")
    return mmap.mmap(rfd, PAGE), st.st_ino, PAGE + end


# ------------------------------------------------ the host, named in the zmq handshake


def tag_host(sock: zmq.Socket[bytes], shm: ShmSettings) -> None:
    """Name this host in ``sock``'s handshake metadata, so peers on it use shared memory."""
    if shm.enabled:
        sock.setsockopt(zmq.METADATA, f"{HOST_PROPERTY}:{host_id()}".encode())


def same_host(frame: zmq.Frame) -> bool:
    """Whether the peer that sent ``frame`` named this host in its handshake."""
    try:
        return frame.get(HOST_PROPERTY) == host_id()
    except zmq.ZMQError:  # the peer sent no such property
        return False
