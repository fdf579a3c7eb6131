"""Memory for big buffers: huge-page allocations, and malloc tuning in actor processes.

:func:`empty` is ``torch.empty`` for the big CPU buffers transferqueue fills itself (the
tensors ``get_data`` returns, storage buffers): from ``HUGE_MIN_BYTES`` on, it maps them on
transparent huge pages (``madvise(MADV_HUGEPAGE)``; kernels in ``madvise`` mode, the common
default, give huge pages to no one else). Filling fresh 4 KiB pages faults once per page and
runs at 1-1.5 GB/s on a VM; on 2 MiB pages it runs at 4-5 GB/s. Such a tensor owns an
anonymous ``mmap``, unmapped when the tensor is freed; it behaves like any other CPU tensor
(shared memory for DataLoader workers and pinning copy it as usual). Where huge pages are
off (``never``) or the platform lacks ``madvise``, it is plain ``torch.empty``.

glibc serves every allocation above a dynamic threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so each large message or buffer is written into fresh pages;
on VMs a page fault costs so much that copying into fresh pages runs at a fifth of memcpy
speed. Raising the mmap threshold to 1 GiB (32 MiB where glibc refuses more) and the trim
threshold to 1 GiB makes such buffers come from the heap and be reused: a zmq get of a
128 MiB batch ran ~1.6x faster in the consumer with it. The price: up to 1 GiB of freed
memory stays mapped in the process. zmq and Ray actor processes always apply it; a process
that connects to zmq actors, or hosts an inproc system's actors, does unless
``zmq.tune_malloc`` is false (then the environment variables
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824`` do the same).

:func:`take_ownership` lets a request's handler keep memory the request brought with it
instead of copying it: a transport whose received frames nobody else holds (the zmq
transport's shared-memory frames) names them around the handler's call
(:func:`request_frames`), and a storage unit then keeps a frame as a field buffer as is.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import functools
import math
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

#: CPU buffers from this size on are mapped on transparent huge pages (see the docstring)
HUGE_MIN_BYTES = 4 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_malloc_for_large_buffers() -> bool:
    """Apply the settings above where glibc is the allocator, once per process (a forked
    child inherits them). Returns whether it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mmap_ok = any(libc.mallopt(_M_MMAP_THRESHOLD, v) == 1 for v in (2**30, 32 * 2**20))
        return mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):  # not glibc
        return False


def _huge_pages_available() -> bool:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


_HUGE = _huge_pages_available()


def empty(
    shape: tuple[int, ...] | list[int],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; big CPU ones on huge pages."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    on_cpu = device is None or torch.device(device).type == "cpu"
    if not (_HUGE and on_cpu and nbytes >= HUGE_MIN_BYTES):
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    return on_storage(torch.frombuffer(region, dtype=torch.uint8).untyped_storage(), shape, dtype)


def storage_users(storage: torch.UntypedStorage) -> int:
    """How many tensors and storage objects hold ``storage``'s memory (the Python object
    passed in counts once): how the store tells whether views it handed out are alive."""
    return int(torch._C._storage_Use_Count(storage._cdata))


def on_storage(
    storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A contiguous tensor of ``shape`` at the start of ``storage`` that is not a view of
    another tensor (no ``_base``): it alone holds the storage."""
    strides = torch.empty(shape, dtype=dtype, device="meta").stride()  # allocates nothing
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


class RequestFrames(Protocol):
    """Frames of a request that nobody but the request holds (a transport makes one)."""

    def take(self, start: int, nbytes: int) -> Any | None:
        """A buffer over exactly ``[start, start + nbytes)`` when that is one frame or
        consecutive frames (keeping their memory alive as long as it lives; they are not
        offered again); else None."""

    def left(self) -> int:
        """Bytes of the frames not taken."""


#: the frames of the request being handled that its handler may keep
_request_frames: contextvars.ContextVar[RequestFrames | None] = contextvars.ContextVar(
    "tq_request_frames", default=None
)


def request_frames(frames: RequestFrames | None) -> contextvars.Token[RequestFrames | None]:
    """Name the frames of the request whose handler runs next in this context that nobody
    but the request holds (None: none), for :func:`take_ownership`. Returns the token for
    :func:`reset_request_frames`."""
    return _request_frames.set(frames)


def reset_request_frames(token: contextvars.Token[RequestFrames | None]) -> None:
    _request_frames.reset(token)


def frames_left() -> int:
    """Bytes of the running request's frames that :func:`take_ownership` did not hand out
    (a handler that kept some holds the others' memory too, where they share a segment)."""
    frames = _request_frames.get()
    return 0 if frames is None else frames.left()


def take_ownership(chunks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor of the rows of ``chunks`` (a tensor, or consecutive chunks of rows) that
    alone holds their memory, when that memory is exactly frames of the running request
    that :func:`request_frames` named, end to end (they are then no longer offered); else
    None (copy them). The memory stays alive, and its sender keeps off it, as long as the
    returned tensor lives."""
    frames = _request_frames.get()
    parts = [chunks] if isinstance(chunks, torch.Tensor) else list(chunks)
    if frames is None or not parts:
        return None
    first = parts[0]
    start = at = first.data_ptr()
    for t in parts:
        if (
            t.device.type != "cpu"
            or not t.is_contiguous()
            or t.dtype != first.dtype
            or t.shape[1:] != first.shape[1:]
            or t.data_ptr() != at
        ):
            return None
        at += t.nbytes
    if at == start:
        return None
    buf = frames.take(start, at - start)
    if buf is None:
        return None
    storage = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()
    rows = sum(t.shape[0] for t in parts)
    return on_storage(storage, (rows, *first.shape[1:]), first.dtype)
