"""Row routing: rows of a partition striped across storage units, and reassembly."""

from __future__ import annotations

import time
import zlib

import pytest
import torch

from transferqueue.errors import ConfigError, SchemaError
from transferqueue.storage.routing import (
    assemble,
    split_rows,
    take,
    unit_for_row,
    units_for_rows,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_unit_for_row_is_stable_and_striped() -> None:
    offset = zlib.crc32(b"train@0")
    assert [unit_for_row("train@0", r, 4) for r in range(8)] == [(offset + r) % 4 for r in range(8)]
    assert unit_for_row("train@0", 5, 1) == 0
    # vectorised form agrees with the scalar one
    rows = torch.arange(1000)
    assert units_for_rows("train@0", rows, 3).tolist() == [
        unit_for_row("train@0", r, 3) for r in range(1000)
    ]


def test_partitions_start_on_different_units() -> None:
    firsts = {unit_for_row(f"step_{i}", 0, 4) for i in range(32)}
    assert len(firsts) > 1


@pytest.mark.parametrize("num_units", [1, 2, 3, 8])
def test_split_rows_is_balanced_and_keeps_batch_order(num_units: int) -> None:
    rows = torch.randperm(10_000)[:4096]
    parts = split_rows("p", rows, num_units)
    sizes = [p[0].numel() for p in parts.values()]
    assert sum(sizes) == 4096 and max(sizes) - min(sizes) <= 4096 // num_units // 5 + 2
    seen = torch.zeros(4096, dtype=torch.bool)
    for unit, (pos, unit_rows) in parts.items():
        assert torch.equal(unit_rows, rows[pos])
        assert bool((pos.diff() > 0).all())  # ascending: batch order kept
        assert set(units_for_rows("p", unit_rows, num_units).tolist()) == {unit}
        seen[pos] = True
    assert bool(seen.all())


def test_split_rows_edge_cases() -> None:
    assert split_rows("p", [], 4) == {}
    parts = split_rows("p", [7], 4)
    assert list(parts) == [unit_for_row("p", 7, 4)]
    with pytest.raises(ConfigError):
        split_rows("p", [1], 0)
    with pytest.raises(SchemaError):
        split_rows("p", [-1], 2)
    with pytest.raises(SchemaError):
        split_rows("p", [0.5], 2)


@pytest.mark.parametrize("num_units", [1, 2, 3, 8])
def test_split_rows_of_a_short_list_matches_the_tensor_path(num_units: int) -> None:
    rows = torch.randperm(1000)[:100].tolist()
    short = split_rows("q", rows, num_units)  # a list of < 256 ints: plain Python
    big = split_rows("q", torch.tensor(rows), num_units)
    assert list(short) == list(big)
    for unit, (pos, unit_rows) in short.items():
        assert pos.dtype == unit_rows.dtype == torch.int64
        assert torch.equal(pos, big[unit][0]) and torch.equal(unit_rows, big[unit][1])


def test_split_rows_64k_is_fast() -> None:
    rows = torch.arange(65536)
    split_rows("p", rows, 4)
    t0 = time.perf_counter()
    split_rows("p", rows, 4)
    assert time.perf_counter() - t0 < 0.5  # ~ms normally; generous for slow CI machines


def _round_trip(column: object, rows: list[int], num_units: int) -> object:
    """Split a batch column by unit, then put the pieces back together."""
    parts = split_rows("p", rows, num_units)
    pieces = [(pos, take(column, pos)) for pos, _ in parts.values()]
    return assemble(pieces, len(rows))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint16]
)
@pytest.mark.parametrize("n", [50, 600])  # short batches take plain-Python paths
def test_take_and_assemble_dense(dtype: torch.dtype, n: int) -> None:
    data = torch.randint(0, 100, (n, 3)).to(dtype)
    out = _round_trip(data, list(range(100, 100 + n)), 3)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype
    assert torch.equal(out.view(torch.uint8), data.view(torch.uint8))


def test_take_and_assemble_jagged_and_values() -> None:
    rows = [torch.arange(n * 2).view(n, 2) for n in (3, 0, 5, 1, 2, 4, 7)]
    nested = torch.nested.nested_tensor(rows, layout=torch.jagged)
    out = _round_trip(nested, list(range(7)), 3)
    assert isinstance(out, torch.Tensor) and out.is_nested
    assert all(torch.equal(a, b) for a, b in zip(out.unbind(), rows, strict=True))
    values = ["a", None, {"x": 1}, 2, "e", "f", "g"]
    assert _round_trip(values, list(range(7)), 2) == values


def test_assemble_mixed_pieces() -> None:
    pos_a, pos_b = torch.tensor([0, 2]), torch.tensor([1])
    # dense pieces of different lengths -> jagged
    out = assemble([(pos_a, torch.zeros(2, 3)), (pos_b, torch.ones(1, 5))], 3)
    assert isinstance(out, torch.Tensor) and out.is_nested
    assert [t.shape[0] for t in out.unbind()] == [3, 5, 3]
    # rows of different ndim -> list
    out = assemble([(pos_a, [torch.zeros(2, 2), torch.zeros(2)]), (pos_b, torch.ones(1, 5))], 3)
    assert isinstance(out, list) and [tuple(t.shape) for t in out] == [(2, 2), (5,), (2,)]
    assert assemble([], 0) == []


@cuda
def test_take_and_assemble_cuda_columns() -> None:
    rows = [torch.arange(n, device="cuda") for n in (3, 0, 5, 1, 2, 4, 7)]
    nested = torch.nested.nested_tensor(rows, layout=torch.jagged)
    dense = torch.arange(14, device="cuda").view(7, 2)
    pos = torch.tensor([5, 1, 6])
    taken = take(nested, pos)
    assert taken.is_cuda and [t.tolist() for t in taken.unbind()] == [
        rows[5].tolist(),
        [],
        rows[6].tolist(),
    ]
    assert torch.equal(take(dense, pos), dense[pos.cuda()])
    out = _round_trip(nested, list(range(7)), 3)
    assert all(torch.equal(a, b) for a, b in zip(out.unbind(), rows, strict=True))
    assert torch.equal(_round_trip(dense, list(range(7)), 2), dense)
