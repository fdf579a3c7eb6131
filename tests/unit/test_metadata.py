"""BatchMeta and PartitionInfo: construction, split/join, field selection, wire and pickle."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transferqueue.metadata import BatchMeta, PartitionInfo


def make(n: int, pid: str = "p", fields: tuple[str, ...] = ("a", "b")) -> BatchMeta:
    return BatchMeta(pid, list(range(n)), list(fields), [{"i": i} for i in range(n)])


def test_defaults_and_basics() -> None:
    meta = BatchMeta("p", [3, 1, 2], ["x"])
    assert len(meta) == meta.size == 3
    assert meta.tags == [{}, {}, {}]
    assert not meta.is_empty
    empty = BatchMeta.empty("p", ["x"])
    assert empty.is_empty and len(empty) == 0 and empty.fields == ["x"]


def test_rows_keep_batch_order_and_normalise_integer_scalars() -> None:
    meta = BatchMeta("p", [np.int64(5), torch.tensor(2), 7], ["x"])
    assert meta.rows == [5, 2, 7]
    assert all(type(r) is int for r in meta.rows)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"partition_id": 1, "rows": [0]}, TypeError),
        ({"partition_id": "p", "rows": ["0"]}, TypeError),
        ({"partition_id": "p", "rows": [True]}, TypeError),
        ({"partition_id": "p", "rows": [0], "fields": [1]}, TypeError),
        ({"partition_id": "p", "rows": [0, 1], "tags": [{}]}, ValueError),
        ({"partition_id": "p", "rows": [0], "tags": ["x"]}, TypeError),
    ],
)
def test_invalid_construction(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        BatchMeta(**kwargs)


def test_tags_are_copied() -> None:
    tags = [{"uid": 1}]
    meta = BatchMeta("p", [0], ["x"], tags)
    tags[0]["uid"] = 2
    assert meta.tags == [{"uid": 1}]
    part = meta.chunk(1)[0]
    part.tags[0]["uid"] = 3
    assert meta.tags == [{"uid": 1}]


def test_chunk_sizes_follow_public_transferqueue() -> None:
    parts = make(10).chunk(3)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert [p.rows for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert parts[1].tags == [{"i": 4}, {"i": 5}, {"i": 6}]
    assert all(p.fields == ["a", "b"] and p.partition_id == "p" for p in parts)


def test_chunk_more_parts_than_rows_gives_trailing_empties() -> None:
    parts = make(2).chunk(4)
    assert [len(p) for p in parts] == [1, 1, 0, 0]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_chunk_rejects_bad_counts(n: object) -> None:
    with pytest.raises(ValueError):
        make(4).chunk(n)  # type: ignore[arg-type]


def test_split() -> None:
    parts = make(6).split([1, 0, 5])
    assert [p.rows for p in parts] == [[0], [], [1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="sum"):
        make(6).split([1, 2])
    with pytest.raises(ValueError):
        make(6).split([7, -1])


def test_concat() -> None:
    meta = make(7)
    assert BatchMeta.concat(meta.chunk(3)) == meta
    assert BatchMeta.concat([BatchMeta.empty("p", ["zzz"]), meta]) == meta
    with pytest.raises(ValueError, match="one partition"):
        BatchMeta.concat([make(2, "p"), make(2, "q")])
    with pytest.raises(ValueError, match="same fields"):
        BatchMeta.concat([make(2, fields=("a",)), make(2, fields=("b",))])
    with pytest.raises(ValueError):
        BatchMeta.concat([])


@given(st.integers(0, 40), st.integers(1, 12))
def test_chunk_then_concat_is_identity(n: int, chunks: int) -> None:
    meta = make(n)
    parts = meta.chunk(chunks)
    assert len(parts) == chunks
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert BatchMeta.concat(parts) == meta


def test_select_fields() -> None:
    meta = make(3).select_fields(["b"])
    assert meta.fields == ["b"] and meta.rows == [0, 1, 2] and meta.tags[2] == {"i": 2}
    with pytest.raises(ValueError, match="zzz"):
        make(3).select_fields(["zzz"])


def _is_plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_wire_and_pickle_round_trip() -> None:
    meta = make(5)
    plain = meta.to_plain()
    assert _is_plain(plain)
    assert BatchMeta.from_plain(plain) == meta
    assert pickle.loads(pickle.dumps(meta)) == meta


def test_partition_info() -> None:
    info = PartitionInfo("p", 4, 8, False, {"x": 3}, {"train": 1}, {"train": 2})
    with pytest.raises(AttributeError):
        info.size = 5  # type: ignore[misc]
    plain = info.to_plain()
    assert _is_plain(plain)
    assert PartitionInfo.from_plain(plain) == info
    assert pickle.loads(pickle.dumps(info)) == info
