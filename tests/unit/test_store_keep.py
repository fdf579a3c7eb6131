"""A store keeps a put's frames as a field buffer, no copy, when the request lets them go
(``memory.take_ownership``; the zmq transport offers its shared-memory frames): only a
whole new buffer, only frames named for the running request, each once; the kept memory is
never pooled and is released when the rows go."""

from __future__ import annotations

import contextlib
import gc
import itertools
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from transferqueue.runtime import memory
from transferqueue.storage.store import Store


class _Frames:
    """A request's frames as a transport names them: arrays by start address; consecutive
    ones are taken as one slice of the array they all view."""

    def __init__(self, base: np.ndarray, *cuts: int) -> None:
        edges = [0, *cuts, base.nbytes]
        self.base = base
        self.at = {base.ctypes.data + a: b - a for a, b in itertools.pairwise(edges)}

    def left(self) -> int:
        return sum(self.at.values())

    def take(self, start: int, nbytes: int) -> np.ndarray | None:
        at, end, parts = start, start + nbytes, []
        while at < end and at in self.at:
            parts.append(at)
            at += self.at[at]
        if at != end or not parts:
            return None
        for p in parts:
            del self.at[p]
        off = start - self.base.ctypes.data
        return self.base[off : off + nbytes]


@contextlib.contextmanager
def _request(frames: _Frames) -> Iterator[None]:
    """Name a request's frames while its handler runs, as the dispatcher does."""
    token = memory.request_frames(frames)
    try:
        yield
    finally:
        memory.reset_request_frames(token)


def _frame(rows: int, cols: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """A frame's bytes (an array a weakref can watch) and the tensor decoded over it."""
    arr = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    flat = arr.reshape(-1).view(np.uint8)
    return flat, torch.from_numpy(arr)


def test_a_whole_new_buffer_is_kept_not_copied_and_freed_with_its_rows() -> None:
    store = Store()
    flat, x = _frame(8, 1024, 0)
    expected = x.clone()
    with _request(_Frames(flat)):
        store.write("p", list(range(8)), {"x": x})
    assert store.copied_bytes == 0 and store.kept_bytes == x.nbytes == store.nbytes
    assert torch.equal(store.read("p", list(range(8)), ["x"])["x"], expected)
    store.write("p", [3], {"x": torch.full((1, 1024), 7.0)})  # rewritten in place
    assert store.kept_bytes == x.nbytes and store.copied_bytes == 4096
    assert torch.equal(store.read("p", [3], ["x"])["x"], torch.full((1, 1024), 7.0))
    watch = weakref.ref(flat.base)  # the array that owns the bytes
    del flat, x
    gc.collect()
    assert watch() is not None  # the store's buffer holds the frame's memory
    store.clear_partition("p")
    gc.collect()
    assert watch() is None and store.pooled_bytes == 0  # released, not pooled
    assert store.kept_bytes == 0


def test_consecutive_frames_become_one_buffer() -> None:
    flat, x = _frame(12, 512, 1)
    store = Store()
    with _request(_Frames(flat, 4 * 512 * 4, 9 * 512 * 4)):  # three frames: 4, 5 and 3 rows
        store.write("p", list(range(12)), {"x": {"pieces": [x[:4], x[4:9], x[9:]]}})
    assert store.copied_bytes == 0 and store.kept_bytes == x.nbytes
    assert torch.equal(store.read("p", list(range(12)), ["x"])["x"], x)


def test_a_grown_buffer_copies_and_lets_the_kept_one_go() -> None:
    store = Store()
    flat, x = _frame(4, 1024, 2)
    with _request(_Frames(flat)):
        store.write("p", [0, 1, 2, 3], {"x": x})
    more = torch.ones(4, 1024)
    store.write("p", [4, 5, 6, 7], {"x": more})  # not its frame: grows into the store's memory
    assert store.kept_bytes == 0 and store.copied_bytes == x.nbytes + more.nbytes
    watch = weakref.ref(flat.base)  # the array that owns the bytes
    want = torch.cat([x, more])
    del flat, x
    gc.collect()
    assert watch() is None and store.pooled_bytes == 0  # the kept memory went, unpooled
    assert torch.equal(store.read("p", list(range(8)), ["x"])["x"], want)


def test_what_is_not_a_whole_named_frame_is_copied() -> None:
    flat, x = _frame(8, 256, 3)
    frames = _Frames(flat)
    store = Store()
    store.write("outside", list(range(8)), {"x": x})  # no request names frames
    with _request(frames):
        store.write("grows", list(range(8)), {"x": x.clone()})
        store.write("grows", list(range(8, 16)), {"x": x})  # into a buffer that exists
        store.write("part", list(range(7)), {"x": x[:7]})  # a part of the frame
        store.write("other", list(range(8)), {"x": x.clone()})  # memory it did not bring
        # outside, grows (8 rows, then 8 grown into 16, then 8), part, other
        copied = x.nbytes * 5 + x[:7].nbytes
        assert store.kept_bytes == 0 and store.copied_bytes == copied
        store.write("whole", list(range(8)), {"x": x})  # the frame itself: kept, once
        store.write("again", list(range(8)), {"x": x})
        assert store.kept_bytes == x.nbytes and store.copied_bytes == copied + x.nbytes
        assert memory.take_ownership(x) is None and frames.at == {}
    assert memory.take_ownership(x) is None  # and none outside a request


def test_a_kept_buffer_read_as_a_view_is_copied_on_write() -> None:
    store = Store()
    flat, x = _frame(8, 512, 4)
    with _request(_Frames(flat)):
        store.write("p", list(range(8)), {"x": x})
    view = store.read("p", list(range(8)), ["x"])["x"]  # a reader still holds it
    held = view.clone()
    store.write("p", list(range(8)), {"x": torch.zeros(8, 512)})  # all rows rewritten
    assert torch.equal(view, held)  # the reader's rows did not change under it
    assert torch.equal(store.read("p", [0, 7], ["x"])["x"], torch.zeros(2, 512))
    assert store.kept_bytes == 0  # the rows moved to a buffer of the store's own


def test_nothing_is_kept_when_much_of_the_message_was_copied() -> None:
    """A kept frame holds its whole message's segment: with the message's other frames
    copied (here a field whose buffer exists), keeping would hold their bytes twice."""
    both = np.random.default_rng(5).standard_normal(8 * 1024 + 8 * 256).astype(np.float32)
    x = torch.from_numpy(both[: 8 * 1024]).view(8, 1024)
    y = torch.from_numpy(both[8 * 1024 :]).view(8, 256)  # a quarter of x's bytes
    store = Store()
    store.write("p", list(range(8)), {"y": torch.zeros(8, 256)})  # y's buffer exists
    before = store.copied_bytes
    with _request(_Frames(both.view(np.uint8), x.nbytes)):
        store.write("p", list(range(8)), {"x": x, "y": y})
    assert store.kept_bytes == 0 and store.copied_bytes == before + x.nbytes + y.nbytes
    got = store.read("p", list(range(8)), ["x", "y"])
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)


def test_a_little_left_over_does_not_stop_the_keeping() -> None:
    both = np.random.default_rng(6).standard_normal(8 * 1024 + 8 * 64).astype(np.float32)
    x = torch.from_numpy(both[: 8 * 1024]).view(8, 1024)
    y = torch.from_numpy(both[8 * 1024 :]).view(8, 64)  # 1/16 of x's bytes, copied
    store = Store()
    store.write("p", list(range(8)), {"y": torch.zeros(8, 64)})
    with _request(_Frames(both.view(np.uint8), x.nbytes)):
        store.write("p", list(range(8)), {"x": x, "y": y})
    assert store.kept_bytes == x.nbytes
