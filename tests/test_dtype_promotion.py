"""A field whose dtype changes between puts of one partition is accepted: a get returns the
field's one dtype, ``torch.promote_types`` of every dtype put into it (docs/migrating.md),
wherever its rows live; another per-row rank still raises SchemaError. Every transport."""

from __future__ import annotations

import pytest
import torch

from transferqueue.errors import SchemaError
from transferqueue.metadata import BatchMeta


def test_float32_then_int64_reads_as_float32(client, pid) -> None:
    first = client.put({"x": torch.tensor([[0.5, 1.5], [2.5, 3.5]])}, partition_id=pid)
    second = client.put({"x": torch.tensor([[4, 5], [6, 7]])}, partition_id=pid)
    assert set(first.units).isdisjoint(second.units)  # the rows live on different units
    meta = client.get_meta(["x"], 4, pid, "t", timeout=60)
    x = client.get_data(meta)["x"]
    assert x.dtype == torch.float32 and x.tolist() == [[0.5, 1.5], [2.5, 3.5], [4, 5], [6, 7]]
    assert client.get_data(second)["x"].dtype == torch.float32
    assert client.partition_info(pid).produced == {"x": 4}


def test_a_wider_put_converts_rows_on_every_unit(client, pid) -> None:
    first = client.put({"x": torch.tensor([[1], [2]], dtype=torch.int32)}, partition_id=pid)
    second = client.put({"x": torch.tensor([[0.25], [0.75]])}, partition_id=pid)
    assert set(first.units).isdisjoint(second.units)
    # rows only on the unit the float32 put never wrote to: converted too
    old = client.get_data(first)["x"]
    assert old.dtype == torch.float32 and old.tolist() == [[1.0], [2.0]]
    third = client.put({"x": torch.tensor([[9]], dtype=torch.int8)}, partition_id=pid)
    rows = BatchMeta(pid, first.rows + second.rows + third.rows, ["x"])
    x = client.get_data(rows)["x"]  # units looked up by the controller
    assert x.dtype == torch.float32 and x[:, 0].tolist() == [1, 2, 0.25, 0.75, 9]


def test_updates_of_existing_rows_and_jagged_fields_promote(client, pid) -> None:
    meta = client.put({"a": torch.zeros(3, 1)}, partition_id=pid)
    client.put({"r": [torch.arange(2), torch.arange(1), torch.arange(3)]}, metadata=meta)
    client.put({"r": [torch.ones(1, dtype=torch.float64)] * 3}, metadata=meta)  # rewrite
    r = client.get_data(meta, fields=["r"])["r"]
    assert r.is_nested and r.dtype == torch.float64
    assert [t.tolist() for t in r.unbind()] == [[1.0]] * 3


def test_kv_put_promotes_by_key(client, pid) -> None:
    client.kv_put(["a", "b"], pid, {"s": torch.tensor([1, 2])})
    client.kv_put(["c"], pid, {"s": torch.tensor([0.5], dtype=torch.float64)})
    got = client.kv_get(["a", "b", "c"], pid)["s"]
    assert got.dtype == torch.float64 and got.tolist() == [1, 2, 0.5]


def test_another_rank_or_values_still_raise(client, pid) -> None:
    client.put({"x": torch.zeros(2, 3)}, partition_id=pid)
    with pytest.raises(SchemaError, match="per-row rank 1"):
        client.put({"x": torch.zeros(2, 3, 4, dtype=torch.int64)}, partition_id=pid)
    with pytest.raises(SchemaError, match="object"):
        client.put({"x": ["a", "b"]}, partition_id=pid)
    assert client.partition_info(pid).size == 2
    assert client.get_data(client.get_meta(["x"], 2, pid, "t"))["x"].dtype == torch.float32
