"""Process-wide memory tuning for the processes transferqueue owns (actor processes).

glibc serves every allocation above a dynamic threshold with a fresh ``mmap`` and unmaps it
on free, so each large message or buffer is written into fresh pages; on VMs a page fault
costs so much that copying into fresh pages runs at a fifth of memcpy speed. Raising the
mmap threshold to glibc's maximum (32 MiB) and the trim threshold to 1 GiB makes such
buffers come from the heap and be reused. The price: up to 1 GiB of freed memory stays
mapped in the process. Client processes are the user's: set the same with the environment
variables ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc_for_large_buffers() -> bool:
    """Apply the settings above where glibc is the allocator. Returns whether it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):  # not glibc
        return False
