"""Memory: huge-page buffers, and malloc tuning of actor processes (checked in a child, so
this process keeps its settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from transferqueue.runtime.memory import HUGE_MIN_BYTES, empty

CODE = "from transferqueue.runtime.memory import tune_malloc_for_large_buffers as t; print(t())"

# In a child: how many bytes a 64 MiB malloc adds to glibc's mmapped regions (mallinfo2's
# hblkhd), after ``SETUP`` ran. Untuned glibc maps it fresh; tuned, it comes from the heap.
MAPPED = """
import ctypes, ctypes.util
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
{setup}
before = libc.mallinfo2().hblkhd
p = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(p)
"""
CONNECT = """
import asyncio
from transferqueue.runtime.actor import Address
from transferqueue.config import load_config
from transferqueue.runtime.transports.zmq import ZmqTransport
config = load_config({{"transport": "zmq", "zmq": {{"tune_malloc": {tune}}}}})
async def connect():
    await ZmqTransport.connect(Address("zmq", "tcp://127.0.0.1:9"), config).aclose()
asyncio.run(connect())
"""

INPROC = """
import transferqueue as tq
tq.init({{"transport": "inproc", "zmq": {{"tune_malloc": {tune}}}}})
tq.close()
"""


def _mapped_by_big_malloc(setup: str, env: dict[str, str]) -> int:
    code = MAPPED.format(setup=setup)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_malloc_tuning_applies_on_glibc(python_env) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=python_env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    expected = sys.platform.startswith("linux")
    assert out.stdout.strip() == str(expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_zmq_client_and_inproc_processes_take_big_buffers_from_the_heap(python_env) -> None:
    assert _mapped_by_big_malloc("", python_env) >= 64 << 20  # glibc's default: a fresh map
    assert _mapped_by_big_malloc(CODE.replace("print", "assert "), python_env) == 0
    # connecting to zmq actors tunes the process, unless the config says not to
    assert _mapped_by_big_malloc(CONNECT.format(tune=True), python_env) == 0
    assert _mapped_by_big_malloc(CONNECT.format(tune=False), python_env) >= 64 << 20
    # so does hosting an inproc system's actors
    assert _mapped_by_big_malloc(INPROC.format(tune=True), python_env) == 0
    assert _mapped_by_big_malloc(INPROC.format(tune=False), python_env) >= 64 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64])
@pytest.mark.parametrize("shape", [(0, 3), (7,), (HUGE_MIN_BYTES // 4, 2)])
def test_empty_is_a_plain_contiguous_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t._base is None
    t.fill_(1)
    assert bool((t == 1).all())
    # it alone holds its memory: a view counts, and so does the pool's check
    storage = t.untyped_storage()
    assert torch._C._storage_Use_Count(storage._cdata) == 2
    del t
    assert torch._C._storage_Use_Count(storage._cdata) == 1


def test_big_empty_tensor_travels_to_another_process() -> None:
    t = empty((HUGE_MIN_BYTES // 8,), torch.int64)
    t.copy_(torch.arange(t.numel()))
    t.share_memory_()  # what a DataLoader worker's queue does with a batch
    assert t.is_shared() and int(t[-1]) == t.numel() - 1
