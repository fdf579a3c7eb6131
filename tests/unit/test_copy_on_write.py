"""Copy on write of single cells (storage/_overlay.py): a write into slots that a live view
shows copies only the cells it writes, never the whole field buffer; what a reader holds
keeps its values; once the views are gone, reads of ranges are views again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferqueue.storage._field import Field, FieldData
from transferqueue.storage.store import Store

ROWS, ROW = 4096, 256  # a 4096-row field of 1 KiB rows (int32)
ROW_BYTES = ROW * 4


def _filled(n: int = ROWS) -> tuple[Store, torch.Tensor]:
    store = Store()
    data = torch.arange(n * ROW, dtype=torch.int32).view(n, ROW)
    store.write("p", range(n), {"x": data})
    return store, data


def test_a_write_under_a_live_view_copies_only_its_cells() -> None:
    store, data = _filled()
    view = store.read("p", range(ROWS), ["x"])["x"]  # a view of the whole buffer
    before = store.copied_bytes
    store.write("p", [17], {"x": torch.full((1, ROW), -1, dtype=torch.int32)})
    assert store.copied_bytes - before == ROW_BYTES  # the cell, not the 4 MiB buffer
    before = store.copied_bytes
    store.write("p", [5, 3000, 9], {"x": torch.full((3, ROW), -2, dtype=torch.int32)})
    assert store.copied_bytes - before == 3 * ROW_BYTES
    assert torch.equal(view, data)  # what the reader holds keeps its values
    got = store.read("p", [16, 17, 18, 5, 3000], ["x"])["x"]
    assert got[:, 0].tolist() == [16 * ROW, -1, 18 * ROW, -2, -2]
    whole = store.read("p", range(ROWS), ["x"])["x"]
    assert whole.data_ptr() != view.data_ptr() and torch.equal(view, data)  # a copy
    assert whole[17, 0] == -1 and whole[16, 0] == 16 * ROW
    assert store.nbytes == ROWS * ROW_BYTES


def test_write_cost_does_not_grow_with_the_buffer() -> None:
    copied = []
    for n in (1024, 16384):
        store, _ = _filled(n)
        view = store.read("p", range(n), ["x"])["x"]
        before = store.copied_bytes
        for r in range(8):  # eight single-row rewrites while the view lives
            store.write("p", [r * 7], {"x": torch.zeros(1, ROW, dtype=torch.int32)})
        copied.append(store.copied_bytes - before)
        assert view[0, 1] == 1
    assert copied == [8 * ROW_BYTES, 8 * ROW_BYTES]


def test_once_the_view_is_gone_reads_are_views_again() -> None:
    store, data = _filled()
    view = store.read("p", range(ROWS), ["x"])["x"]
    store.write("p", [1, 2], {"x": torch.full((2, ROW), 7, dtype=torch.int32)})
    held = store.read("p", [0, 1, 2, 3], ["x"])["x"]
    assert held[:, 0].tolist() == [0, 7, 7, 3 * ROW]
    del view
    before = store.copied_bytes
    again = store.read("p", range(ROWS), ["x"])["x"]  # folds the two cells back
    assert store.copied_bytes - before == 2 * ROW_BYTES
    buffer = store._partitions["p"].fields["x"].buffer
    assert again.data_ptr() == buffer.data_ptr()  # a view of the buffer again
    assert again[:4, 0].tolist() == [0, 7, 7, 3 * ROW]
    assert held[:, 0].tolist() == [0, 7, 7, 3 * ROW]  # a copy, the reader's own
    expected = data.clone()
    expected[1:3] = 7
    assert torch.equal(again, expected)


def test_rewriting_most_of_the_buffer_takes_a_new_one() -> None:
    store, data = _filled(64)
    view = store.read("p", range(64), ["x"])["x"]
    before = store.copied_bytes
    store.write("p", range(40), {"x": torch.zeros(40, ROW, dtype=torch.int32)})
    # 64 old rows moved to a new buffer, then the 40 written: at most twice the write
    assert store.copied_bytes - before == (64 + 40) * ROW_BYTES
    assert torch.equal(view, data)
    got = store.read("p", range(64), ["x"])["x"]
    assert got.data_ptr() != view.data_ptr()
    assert got[:40].count_nonzero() == 0 and torch.equal(got[40:], data[40:])


@pytest.mark.parametrize("clear", [False, True])
def test_overlay_cells_are_released_rewritten_and_cleared(clear: bool) -> None:
    store, data = _filled(256)
    view = store.read("p", range(256), ["x"])["x"]
    expected = data.clone()
    gen = torch.Generator().manual_seed(3)
    for step in range(40):
        rows = torch.randperm(256, generator=gen)[: 1 + step % 5].tolist()
        if clear and step % 3 == 0:
            store.clear_rows("p", rows)
            new = torch.full((len(rows), ROW), 1000 + step, dtype=torch.int32)
            store.write("p", rows, {"x": new})  # freed slots, reused
        else:
            new = torch.full((len(rows), ROW), step, dtype=torch.int32)
            store.write("p", rows, {"x": new})
        expected[rows] = new
        order = torch.randperm(256, generator=gen).tolist()
        assert torch.equal(store.read("p", order, ["x"])["x"], expected[order])
    assert torch.equal(view, data)
    assert store.nbytes == 256 * ROW_BYTES
    del view
    assert torch.equal(store.read("p", range(256), ["x"])["x"], expected)
    assert store._partitions["p"].fields["x"].moved == 0


def test_mixed_reads_and_promotion_keep_overlay_cells() -> None:
    store = Store()
    store.write("p", range(8), {"x": torch.arange(8.0).view(8, 1).repeat(1, 2)})
    view = store.read("p", range(8), ["x"])["x"]
    store.write("p", [3], {"x": torch.full((1, 2), 30.0)})
    store.write("p", [5], {"x": torch.full((1, 5), 50.0)})  # another shape: held per row
    mixed = store.read("p", [2, 3, 5], ["x"])["x"]
    assert isinstance(mixed, list) and [t.tolist() for t in mixed] == [
        [2.0, 2.0],
        [30.0, 30.0],
        [50.0] * 5,
    ]
    store.promote("p", {"x": torch.float64})  # moves to a new buffer, overlay folded in
    got = store.read("p", [3, 4], ["x"])["x"]
    assert got.dtype == torch.float64 and got.tolist() == [[30.0, 30.0], [4.0, 4.0]]
    assert view[3].tolist() == [3.0, 3.0]


def test_field_overlay_directly() -> None:
    field = Field(True, torch.int64)
    slots = np.arange(10, dtype=np.int64)
    field.write(slots, FieldData.from_column("x", torch.arange(10).view(10, 1), 10))
    view = field.gather_held(slots)
    field.release(np.array([4]))
    field.write(np.array([4]), FieldData.from_column("x", torch.tensor([[40]]), 1))
    assert field.moved == 1 and field.copies.nbytes == 10 * 8 + 8
    assert field.gather(np.array([4, 5]))[:, 0].tolist() == [40, 5]
    assert view[4, 0] == 4
    del view
    field.settle()
    assert field.moved == 0 and field.gather_held(slots)[4, 0] == 40
