"""The dtype rule: a field holds one dtype, ``torch.promote_types`` of every dtype put into
it (per partition); a per-row rank that differs, or tensors vs values, still raise."""

from __future__ import annotations

import pytest
import torch

from transferqueue.client.columns import assemble, cast_columns, common_dtype
from transferqueue.controller.partition import FieldSpec
from transferqueue.controller.puts import promoted
from transferqueue.controller.state import ControllerState
from transferqueue.errors import SchemaError
from transferqueue.storage.store import Store

F32, I64, F64 = (FieldSpec(f"torch.{d}", 1) for d in ("float32", "int64", "float64"))


@pytest.mark.parametrize(
    ("old", "new", "want"),
    [
        (F32, I64, "torch.float32"),  # upstream's example: float32, then int64
        (I64, F32, "torch.float32"),
        (F32, F64, "torch.float64"),
        (FieldSpec("torch.bool", 1), I64, "torch.int64"),
        (FieldSpec("torch.int8", 1), FieldSpec("torch.uint8", 1), "torch.int16"),
        (F32, F32, "torch.float32"),
    ],
)
def test_promoted_is_torch_promote_types(old: FieldSpec, new: FieldSpec, want: str) -> None:
    got = promoted(old, new)
    assert got == FieldSpec(want, 1)


def test_ranks_and_values_do_not_mix() -> None:
    assert promoted(F32, FieldSpec("torch.float32", 2)) is None
    assert promoted(F32, FieldSpec("object", -1)) is None
    assert promoted(FieldSpec("object", -1), FieldSpec("object", -1)) == FieldSpec("object", -1)


def test_the_controller_promotes_on_commit_and_tells_puts_the_dtype() -> None:
    state = ControllerState()
    a = state.begin_put("p", {"x": F32}, now=0, n=2)
    state.commit_put(a.lease)
    narrower = state.begin_put("p", {"x": I64}, now=0, n=1)
    assert state.target_dtypes("p", narrower.specs) == {"x": "torch.float32"}  # cast to it
    assert state.widened(narrower.lease) == {}  # nothing for the units to convert
    state.commit_put(narrower.lease)
    wider = state.begin_put("p", {"x": F64}, now=0, n=1)
    assert state.target_dtypes("p", wider.specs) == {}
    assert state.widened(wider.lease) == {"x": "torch.float64"}
    state.commit_put(wider.lease)
    assert state.field_specs("p") == {"x": F64}
    with pytest.raises(SchemaError, match="per-row rank 1"):
        state.begin_put("p", {"x": FieldSpec("torch.float64", 2)}, now=0, n=1)


def test_the_store_casts_narrower_writes_and_converts_on_a_wider_one() -> None:
    store = Store()
    store.write("p", [0, 1], {"x": torch.tensor([[1.5, 2.5], [3.5, 4.5]])})
    store.write("p", [2], {"x": torch.tensor([[7, 8]])})  # int64 into float32: cast
    got = store.read("p", [0, 1, 2], ["x"])["x"]
    assert got.dtype == torch.float32 and got.tolist() == [[1.5, 2.5], [3.5, 4.5], [7, 8]]
    assert store.nbytes == 3 * 2 * 4
    plan = store.prepare_write("p", [3], {"x": torch.tensor([[9.0, 9.0]], dtype=torch.float64)})
    assert plan.nbytes == 3 * 2 * 4 + 2 * 8  # the rows held double, plus the new row
    store.check_capacity(plan.nbytes)
    store.apply_write(plan)
    got = store.read("p", [0, 1, 2, 3], ["x"])["x"]
    assert got.dtype == torch.float64 and got[:, 0].tolist() == [1.5, 3.5, 7, 9]
    assert store.nbytes == 4 * 2 * 8
    with pytest.raises(SchemaError, match="holds tensors"):
        store.write("p", [4], {"x": ["a value"]})


def test_a_view_handed_out_keeps_its_values_when_the_field_is_promoted() -> None:
    store = Store()
    store.write("p", [0, 1], {"x": torch.tensor([[1], [2]], dtype=torch.int32)})
    view = store.read("p", [0, 1], ["x"])["x"]
    assert store.promote("p", {"x": "torch.int64"}) == 2 * 4
    store.write("p", [0], {"x": torch.tensor([[5]])})
    assert view.dtype == torch.int32 and view.tolist() == [[1], [2]]
    assert store.read("p", [0, 1], ["x"])["x"].tolist() == [[5], [2]]


def test_promote_converts_jagged_and_per_row_cells_and_sets_a_floor() -> None:
    store = Store()
    rows = [torch.arange(2, dtype=torch.int32), torch.arange(3, dtype=torch.int32)]
    store.write("p", [0, 1], {"j": rows, "odd": [torch.zeros(2, 2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)]})  # fmt: skip
    store.promote("p", {"j": torch.float64, "odd": "torch.float64", "new": "torch.float64"})
    got = store.read("p", [0, 1], ["j", "odd"])
    assert got["j"].dtype == torch.float64 and [t.tolist() for t in got["j"].unbind()] == [[0, 1], [0, 1, 2]]  # fmt: skip
    assert all(t.dtype == torch.float64 for t in got["odd"])
    store.write("p", [0], {"new": torch.ones(1, 2)})  # a field first written after the floor
    assert store.read("p", [0], ["new"])["new"].dtype == torch.float64
    with pytest.raises(SchemaError, match="unknown tensor dtype"):
        store.promote("p", {"j": "torch.float128"})
    store.clear_partition("p")
    store.write("p", [0], {"new": torch.ones(1, 2)})  # a clear forgets the floor
    assert store.read("p", [0], ["new"])["new"].dtype == torch.float32


def test_columns_of_units_caught_mid_promotion_are_promoted_on_read() -> None:
    parts = [
        ([0, 2], {"x": torch.tensor([[1], [3]], dtype=torch.int64)}),
        ([1], {"x": torch.tensor([[2.5]], dtype=torch.float64)}),
    ]
    td = assemble(3, ["x"], parts)
    assert td["x"].dtype == torch.float64 and td["x"][:, 0].tolist() == [1, 2.5, 3]
    assert common_dtype([torch.zeros(1), torch.zeros(1)]) is None
    assert common_dtype([["a"], torch.zeros(1, dtype=torch.int8)]) is None


def test_cast_columns_casts_tensor_columns_only() -> None:
    cols = {"a": torch.ones(2, dtype=torch.int64), "b": [torch.ones(1), torch.ones(2)], "s": ["x"]}
    out = cast_columns(cols, {"a": "torch.float32", "b": "torch.float64", "s": "torch.int8"})
    assert out["a"].dtype == torch.float32 and all(t.dtype == torch.float64 for t in out["b"])
    assert out["s"] == ["x"] and cols["a"].dtype == torch.int64  # the input is not changed
    assert cast_columns(cols, None) is cols


def test_promotion_into_a_longer_pooled_buffer() -> None:
    store = Store()
    store.write("old", list(range(10)), {"x": torch.zeros(10, 4, dtype=torch.float64)})
    store.clear_partition("old")  # its buffer goes to the pool, longer than 3 rows need
    assert store.pooled_bytes > 0
    store.write("p", [0, 1, 2], {"x": torch.tensor([[1, 2, 3, 4]] * 3, dtype=torch.int32)})
    store.write("p", [3], {"x": torch.full((1, 4), 0.5, dtype=torch.float64)})
    got = store.read("p", [0, 1, 2, 3], ["x"])["x"]
    assert got.dtype == torch.float64 and got[:, 0].tolist() == [1, 1, 1, 0.5]
