"""Store: the synchronous columnar storage of one storage unit."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from transferqueue.errors import PartitionNotFoundError, SchemaError, StorageFullError
from transferqueue.storage.store import Store

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (*shape, torch.empty(0, dtype=dtype).element_size()),
        dtype=torch.uint8,
        generator=gen,
    )
    if dtype == torch.bool:
        return (raw[..., 0] & 1).bool()
    return raw.view(dtype).reshape(shape)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_round_trip_every_dtype(dtype: torch.dtype) -> None:
    store = Store()
    data = _random((6, 3, 2), dtype)
    store.write("p", [0, 2, 4, 6, 8, 10], {"x": data})
    whole = store.read("p", [0, 2, 4, 6, 8, 10], ["x"])["x"]
    assert isinstance(whole, torch.Tensor) and _same(whole, data)
    picked = store.read("p", [8, 0, 4], ["x"])["x"]
    assert isinstance(picked, torch.Tensor) and _same(picked, data[[4, 0, 2]])
    # scattered overwrite (not a contiguous slot range) works for every dtype too
    new = _random((2, 3, 2), dtype, seed=1)
    store.write("p", [10, 2], {"x": new})
    got = store.read("p", [2, 10], ["x"])["x"]
    assert isinstance(got, torch.Tensor) and _same(got, new[[1, 0]])


def test_write_copies_the_data() -> None:
    store = Store()
    data = torch.arange(12).view(4, 3)
    items = [torch.arange(2), torch.arange(5)]
    store.write("p", [0, 1, 2, 3], {"x": data})
    store.write("p", [0, 1], {"j": items, "v": [{"a": [1]}, "s"]})
    values = store.read("p", [0], ["v"])["v"]
    data.zero_()
    items[0].fill_(9)
    values[0]["a"].append(2)
    assert torch.equal(store.read("p", [0, 1, 2, 3], ["x"])["x"], torch.arange(12).view(4, 3))
    assert torch.equal(store.read("p", [0], ["j"])["j"][0], torch.arange(2))
    assert store.read("p", [0], ["v"])["v"] == [{"a": [1]}]


def _rows(col: object) -> list[torch.Tensor]:
    assert isinstance(col, torch.Tensor) and col.is_nested and col.layout == torch.jagged
    return list(col.unbind())


def test_jagged_list_and_nested_tensor_come_back_nested() -> None:
    store = Store()
    rows = [torch.randn(n, 4).to(torch.bfloat16) for n in (3, 1, 7)]
    store.write("p", [5, 6, 7], {"j": rows})
    nested = torch.nested.nested_tensor([torch.arange(n) for n in (2, 0, 4)], layout=torch.jagged)
    store.write("p", [5, 6, 7], {"n": nested})
    got = store.read("p", [7, 5], ["j", "n"])
    assert all(_same(a, b) for a, b in zip(_rows(got["j"]), [rows[2], rows[0]], strict=True))
    assert [t.tolist() for t in _rows(got["n"])] == [[0, 1, 2, 3], [0, 1]]
    assert [t.tolist() for t in _rows(store.read("p", [6], ["n"])["n"])] == [[]]
    assert store.nbytes == 11 * 4 * 2 + 6 * 8


def test_nested_tensor_with_offset_values() -> None:
    store = Store()
    values = torch.arange(10)
    nested = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([2, 5, 9]))
    store.write("p", [0, 1], {"n": nested})
    assert [t.tolist() for t in _rows(store.read("p", [1, 0], ["n"])["n"])] == [
        [5, 6, 7, 8],
        [2, 3, 4],
    ]
    assert store.nbytes == 7 * 8


def test_jagged_field_stays_jagged_when_shapes_agree() -> None:
    store = Store()
    store.write("p", [0, 1], {"j": [torch.ones(3), torch.ones(3)]})
    store.write("p", [2], {"j": torch.ones(1, 3)})  # a dense write into a jagged field
    assert [t.shape for t in _rows(store.read("p", [0, 1, 2], ["j"])["j"])] == [(3,)] * 3


def test_jagged_overwrites_and_clears_are_compacted() -> None:
    store = Store()
    expected = {}
    for step in range(50):
        rows = list(range(step % 7, 40, 7))
        data = [torch.full((1 + (r * step) % 9, 2), step * 100 + r) for r in rows]
        store.write("p", rows, {"j": data})
        expected.update(zip(rows, data, strict=True))
        if step % 5 == 4:
            store.clear_rows("p", rows[:2])
            for r in rows[:2]:
                expected.pop(r)
    order = sorted(expected, reverse=True)
    got = _rows(store.read("p", order, ["j"])["j"])
    assert all(torch.equal(g, expected[r]) for g, r in zip(got, order, strict=True))
    assert store.nbytes == sum(t.numel() * 8 for t in expected.values())
    arena = store._partitions["p"].fields["j"].arena
    assert arena is not None and arena.end <= 3 * arena.live  # garbage was compacted


def test_rows_of_different_ndim_come_back_as_list() -> None:
    store = Store()
    rows = [torch.zeros(2, 3), torch.zeros(4), torch.tensor(1.0)]
    store.write("p", [0, 1, 2], {"x": rows})
    got = store.read("p", [2, 0, 1], ["x"])["x"]
    assert isinstance(got, list) and [tuple(t.shape) for t in got] == [(), (2, 3), (4,)]


def test_non_tensor_values() -> None:
    store = Store()
    values = ["a" * 10, {"k": [1, 2]}, 3, 2.5, None, b"\x00\x01", [1, "x"]]
    store.write("p", list(range(7)), {"v": values})
    assert store.read("p", [6, 0, 4], ["v"])["v"] == [[1, "x"], "a" * 10, None]
    assert store.read("p", list(range(7)), ["v"])["v"] == values


def test_read_follows_requested_order() -> None:
    store = Store()
    rows = [9, 1, 5, 3, 7]
    store.write("p", rows, {"x": torch.tensor(rows) * 10, "v": [str(r) for r in rows]})
    order = [3, 9, 7, 1, 5, 3]
    got = store.read("p", order, ["x", "v"])
    assert got["x"].tolist() == [r * 10 for r in order]
    assert got["v"] == [str(r) for r in order]


def test_overwrite_and_rows_gain_fields() -> None:
    store = Store()
    store.write("p", [0, 1, 2], {"a": torch.zeros(3, 2)})
    store.write("p", [1], {"a": torch.ones(1, 2), "b": ["late"]})
    assert store.read("p", [0, 1], ["a"])["a"].tolist() == [[0, 0], [1, 1]]
    assert store.read("p", [1], ["b"])["b"] == ["late"]
    assert sorted(store.fields("p")) == ["a", "b"]
    assert store.nbytes == 3 * 2 * 4 + len("late")


def test_dense_field_later_written_with_another_shape() -> None:
    store = Store()
    store.write("p", [0, 1, 2, 3], {"x": torch.zeros(4, 2)})
    store.write("p", [1, 3], {"x": torch.ones(2, 5)})
    dense_old = store.read("p", [2, 0], ["x"])["x"]
    dense_new = store.read("p", [3, 1], ["x"])["x"]
    assert isinstance(dense_old, torch.Tensor) and dense_old.shape == (2, 2)
    assert isinstance(dense_new, torch.Tensor) and dense_new.tolist() == [[1.0] * 5] * 2
    mixed = store.read("p", [0, 1, 2], ["x"])["x"]
    assert isinstance(mixed, list) and [tuple(t.shape) for t in mixed] == [(2,), (5,), (2,)]
    assert mixed[1].tolist() == [1.0] * 5
    # rewriting every row with the new shape makes it dense again
    store.write("p", [0, 2], {"x": torch.full((2, 5), 2.0)})
    dense = store.read("p", [0, 1, 2, 3], ["x"])["x"]
    assert isinstance(dense, torch.Tensor) and dense.shape == (4, 5)
    assert dense[:, 0].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert store.nbytes == 4 * 5 * 4


def test_missing_cells_and_partitions() -> None:
    store = Store()
    store.write("p", [0, 2], {"x": torch.zeros(2), "y": ["a", "b"]})
    with pytest.raises(PartitionNotFoundError, match="'q'"):
        store.read("q", [0], ["x"])
    with pytest.raises(KeyError, match=r"row 1 .*'x'"):
        store.read("p", [0, 1], ["x"])
    with pytest.raises(KeyError, match=r"row 99 .*'y'"):
        store.read("p", [99], ["y"])
    with pytest.raises(KeyError, match="field 'z'"):
        store.read("p", [0], ["z"])
    # a field that only some held rows have (reads of fields all rows have skip the states)
    store.write("p", [5], {"x": torch.ones(1), "z": torch.ones(1, 2)})
    assert store.read("p", [5, 0, 2], ["x"])["x"].tolist() == [1.0, 0.0, 0.0]
    assert store.read("p", [5], ["z"])["z"].tolist() == [[1.0, 1.0]]
    with pytest.raises(KeyError, match=r"row 2 .*'z'"):
        store.read("p", [5, 2], ["x", "z"])
    store.clear_rows("p", [0])
    with pytest.raises(KeyError, match=r"row 0 .*'y'"):
        store.read("p", [2, 0], ["y"])


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"x": torch.zeros(3)}, "one entry per row"),
        ({"x": ["a"]}, "1 entries for 2 rows"),
        ({"x": [torch.zeros(1), "a"]}, "mixes tensors"),
        ({"x": [torch.zeros(1), torch.zeros(1, dtype=torch.int64)]}, "one dtype"),
        ({"x": 5}, "got int"),
        ({"x": torch.tensor(1.0)}, "one entry per row"),
    ],
)
def test_bad_columns_raise_schema_error(columns: dict, match: str) -> None:
    store = Store()
    with pytest.raises(SchemaError, match=match):
        store.write("p", [0, 1], columns)
    assert store.nbytes == 0 and store.partition_ids() == []


@pytest.mark.parametrize(
    ("rows", "match"), [([0, 0], "unique"), ([-1], r"\[0, "), ([0.5], "integers"), ([[0]], "1-D")]
)
def test_bad_rows_raise_schema_error(rows: list, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        Store().write("p", rows, {"x": torch.zeros(len(rows))})


def test_schema_conflicts_write_nothing() -> None:
    store = Store()
    store.write("p", [0], {"x": torch.zeros(1), "v": ["a"]})
    before = store.nbytes
    with pytest.raises(SchemaError, match="holds tensors"):  # tensor dtypes promote
        store.write("p", [1], {"y": torch.ones(1), "x": ["not a tensor"]})
    with pytest.raises(SchemaError, match="non-tensor"):
        store.write("p", [0], {"v": torch.zeros(1)})
    assert store.nbytes == before and store.fields("p") == ["x", "v"]
    with pytest.raises(KeyError):
        store.read("p", [1], ["x"])


def test_capacity_raises_with_numbers_and_writes_nothing() -> None:
    store = Store(capacity_bytes=1000)
    store.write("p", range(100), {"x": torch.zeros(100, 2, dtype=torch.int32)})  # 800 bytes
    with pytest.raises(StorageFullError, match="needs 400 more bytes, 800 of 1000"):
        store.write("p", range(100, 150), {"x": torch.zeros(50, 2, dtype=torch.int32)})
    with pytest.raises(StorageFullError):
        store.write("q", [0, 1], {"a": torch.zeros(2), "b": ["x" * 300, "y"]})
    assert store.nbytes == 800 and store.partition_ids() == ["p"]
    with pytest.raises(KeyError):
        store.read("p", [100], ["x"])
    # overwriting counts net bytes: a full store can still rewrite cells in place
    store.write("p", range(100), {"x": torch.ones(100, 2, dtype=torch.int32)})
    assert store.nbytes == 800


def test_clear_rows_frees_bytes_and_reuses_slots() -> None:
    store = Store()
    store.write("p", range(10), {"x": torch.arange(10), "v": list("abcdefghij")})
    assert store.clear_rows("p", [1, 3, 3, 99]) == 2 * 8 + 2
    assert store.nbytes == 8 * 8 + 8
    with pytest.raises(KeyError, match="row 3"):
        store.read("p", [3], ["x"])
    store.write("p", [20, 21], {"x": torch.tensor([20, 21]), "v": ["u", "w"]})
    assert store.read("p", [0, 21, 20, 9], ["x"])["x"].tolist() == [0, 21, 20, 9]
    assert store.clear_rows("p", list(range(30))) == 10 * 9
    assert store.nbytes == 0 and store.partition_ids() == []
    assert store.clear_rows("p", [0]) == 0 and store.clear_partition("p") == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_clearing_a_1gib_partition_returns_memory() -> None:
    store = Store()
    src = torch.ones(1, 256 * 1024, dtype=torch.int32).expand(1024, -1)  # 1 GiB, not allocated
    gc.collect()
    before = _rss_bytes()
    store.write("big", range(1024), {"x": src})
    buffer_ref = weakref.ref(store._partitions["big"].fields["x"].buffer)
    assert store.nbytes == 1 << 30
    assert _rss_bytes() - before > (1 << 30) * 0.9
    ptr = store._partitions["big"].fields["x"].buffer.data_ptr()
    assert store.clear_partition("big") == 1 << 30
    assert store.nbytes == 0
    gc.collect()
    assert buffer_ref() is None
    # the buffer is pooled (not stored data) and the next step's write of that size reuses it
    assert store.pooled_bytes == 1 << 30
    store.write("big2", range(1024), {"y": src})
    assert store._partitions["big2"].fields["y"].buffer.data_ptr() == ptr
    assert store.pooled_bytes == 0
    assert _rss_bytes() - before < (1 << 30) * 1.1
    assert store.clear_partition("big2") == 1 << 30
    store.trim()  # drops the pool: the memory goes back
    gc.collect()
    assert store.pooled_bytes == 0
    assert _rss_bytes() - before < (1 << 30) * 0.1


def test_buffer_pool_is_bounded_and_outside_capacity() -> None:
    store = Store(capacity_bytes=1 << 20)
    store.write("a", range(4), {"x": torch.ones(4, 1024)})
    store.clear_rows("a", range(4))  # field left empty: its buffer is pooled
    assert store.nbytes == 0 and store.pooled_bytes == 4 * 4096
    store.write("b", range(2), {"x": torch.zeros(2, 2048, dtype=torch.int32)})
    assert store.pooled_bytes == 0 and store.nbytes == 2 * 8192
    assert torch.equal(store.read("b", [1, 0], ["x"])["x"], torch.zeros(2, 2048, dtype=torch.int32))
    store.write("c", range(1), {"x": torch.ones(1, 8)})  # too small for a 16 KiB storage: fresh
    store.clear_partition("b")
    store.clear_partition("c")
    assert store.pooled_bytes == 2 * 8192 + 32
    store.write("d", range(16), {"x": torch.ones(16, 4, dtype=torch.float64)})
    assert store.pooled_bytes == 2 * 8192 + 32  # 32 bytes too small, 16 KiB too big: fresh
    assert torch.equal(
        store.read("d", range(16), ["x"])["x"], torch.ones(16, 4, dtype=torch.float64)
    )


@cuda
def test_cuda_tensors_are_copied_to_host() -> None:
    store = Store()
    lengths = (1, 4, 0, 3, 2, 5)
    nested = torch.nested.nested_tensor(
        [torch.arange(n, device="cuda") for n in lengths], layout=torch.jagged
    )
    columns = {
        "d": torch.arange(12, device="cuda").view(6, 2).to(torch.bfloat16),
        "j": [torch.ones(n, 2, device="cuda") for n in lengths],
        "n": nested,
    }
    store.write("p", range(6), columns)
    store.write("p", [4, 0], {"d": torch.full((2, 2), 7, device="cuda").to(torch.bfloat16)})
    store.write("p", [1], {"d": torch.zeros(1, 3, device="cuda").to(torch.bfloat16)})
    got = store.read("p", [0, 2, 4], ["d", "j", "n"])
    assert got["d"].device.type == "cpu" and got["d"][:, 0].tolist() == [7, 4, 7]
    assert [tuple(t.shape) for t in _rows(got["j"])] == [(1, 2), (0, 2), (2, 2)]
    assert [t.tolist() for t in _rows(got["n"])] == [[0], [], [0, 1]]
    assert all(t.device.type == "cpu" for t in _rows(got["n"]))
    mixed = store.read("p", [0, 1], ["d"])["d"]
    assert isinstance(mixed, list) and [tuple(t.shape) for t in mixed] == [(2,), (3,)]


def test_pieces_are_written_as_one_column() -> None:
    store = Store()
    dense = _random((10, 3), torch.float32)
    rows = [torch.arange(k) for k in (2, 0, 3, 1, 4, 2, 2, 1, 0, 5)]
    lengths = torch.tensor([t.numel() for t in rows])
    store.write(
        "p",
        list(range(10)),
        {
            "dense": {"pieces": [dense[:4], dense[4:9], dense[9:]]},
            "jagged": {"values": [torch.cat(rows[:3]), torch.cat(rows[3:])], "lengths": lengths},
        },
    )
    got = store.read("p", list(range(10)), ["dense", "jagged"])
    assert torch.equal(got["dense"], dense)
    assert [t.tolist() for t in got["jagged"].unbind()] == [t.tolist() for t in rows]


@pytest.mark.parametrize(
    ("column", "match"),
    [
        ({"pieces": [torch.ones(2, 2)]}, "pieces hold 2 rows for 3 rows"),
        ({"chunks": [torch.ones(3, 2)]}, "a dict column is"),
        ({"pieces": []}, "a dict column is"),
        ({"pieces": [["a", "b", "c"]]}, "plain tensors"),
        ({"pieces": [torch.ones(1, 2), torch.ones(2, 3)]}, "differ in dtype or trailing shape"),
        ({"values": [torch.ones(5)], "lengths": torch.tensor([1, 1])}, "one entry per row"),
        ({"values": [torch.ones(5)], "lengths": torch.tensor([1, 1, 1])}, "do not add up"),
        ({"values": [torch.ones(5)]}, "a dict column is"),
    ],
)
def test_bad_pieces_raise_schema_error(column: dict, match: str) -> None:
    store = Store()
    with pytest.raises(SchemaError, match=match):
        store.write("p", [0, 1, 2], {"x": column})
    assert store.nbytes == 0


def test_reads_are_views_and_writes_never_change_a_live_view() -> None:
    store = Store()
    first = _random((64, 8), torch.int64, seed=1)
    store.write("p", list(range(64)), {"x": first})
    view = store.read("p", list(range(64)), ["x"])["x"]
    # a range of slots is read as a view of the store's buffer: no copy
    assert torch.equal(view, first)
    assert view.data_ptr() == store.read("p", list(range(64)), ["x"])["x"].data_ptr()
    # overwriting the rows while the view is alive: the store copies before writing
    second = _random((64, 8), torch.int64, seed=2)
    store.write("p", list(range(64)), {"x": second})
    assert torch.equal(view, first)
    assert torch.equal(store.read("p", list(range(64)), ["x"])["x"], second)
    # a cleared partition's buffer is not reused for the next one while a view of it lives
    held = store.read("p", list(range(64)), ["x"])["x"]
    pooled = {held.data_ptr()}
    store.clear_partition("p")
    store.write("q", list(range(64)), {"x": first})
    assert torch.equal(held, second)
    # once no view is alive, cleared buffers are reused (no fresh pages)
    del view, held
    pooled.add(store.read("q", list(range(64)), ["x"])["x"].data_ptr())
    store.clear_partition("q")
    store.write("r", list(range(64)), {"x": second})
    assert store.read("r", list(range(64)), ["x"])["x"].data_ptr() in pooled
