"""Memory: huge-page buffers, and malloc tuning of actor processes (checked in a child, so
this process keeps its settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from transferqueue.memory import HUGE_MIN_BYTES, empty

CODE = "from transferqueue.memory import tune_malloc_for_large_buffers as t; print(t())"


def test_malloc_tuning_applies_on_glibc(python_env) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=python_env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    expected = sys.platform.startswith("linux")
    assert out.stdout.strip() == str(expected)


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
