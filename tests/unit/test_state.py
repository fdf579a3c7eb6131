"""ControllerState: partitions, slots, seal, exhaustion, status, keys, memory (no I/O)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transferqueue.controller.state import ControllerState, FieldSpec, parse_pre_allocate
from transferqueue.errors import (
    ConfigError,
    PartitionNotFoundError,
    PartitionSealedError,
    SchemaError,
)
from transferqueue.metadata import BatchMeta

F32 = FieldSpec("torch.float32", 1)
SPECS = {"x": F32, "y": FieldSpec("torch.int64", 2)}


def put(
    state: ControllerState, pid: str, n: int, fields: Any = ("x",), tags: Any = None
) -> list[int]:
    rows = state.allocate(pid, n)
    state.commit(pid, rows, {f: SPECS[f] for f in fields}, tags)
    return rows


def rows_of(meta: BatchMeta | None) -> list[int] | None:
    return None if meta is None else meta.rows


# ------------------------------------------------------------------ pre-allocation setting


@pytest.mark.parametrize(("text", "value"), [("", 0), ("0", 0), (" 64 ", 64), (128, 128)])
def test_parse_pre_allocate(text: Any, value: int) -> None:
    assert parse_pre_allocate(text) == value


@pytest.mark.parametrize("text", ["-1", "abc", "1.5", "8x"])
def test_parse_pre_allocate_rejects_with_advice(text: str) -> None:
    with pytest.raises(ConfigError, match="global batch size") as info:
        parse_pre_allocate(text)
    assert isinstance(info.value, ValueError)
    assert "TQ_PRE_ALLOC_SAMPLE_NUM" in str(info.value)


# ------------------------------------------------------------------ reservation


def test_reservation_creates_pending_slots() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=4)
    info = state.partition_info("p")
    assert (info.size, info.expected_size, info.sealed) == (4, 4, False)
    rows, produced = state.get_production_status(["x"], "p")
    assert rows.tolist() == [0, 1, 2, 3] and rows.dtype == torch.int64
    assert produced.shape == (4, 1) and not produced.any()
    rows, consumed = state.get_consumption_status("t", "p")
    assert rows.tolist() == [0, 1, 2, 3] and consumed.dtype == torch.bool and not consumed.any()
    assert not state.check_production_status(["x"], "p")
    assert not state.check_consumption_status("t", "p")


def test_create_partition_same_size_is_a_no_op_larger_extends() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    put(state, "p", 1)
    state.create_partition("p", expected_size=2)
    assert state.partition_info("p").size == 2
    state.create_partition("p", expected_size=5)
    assert state.partition_info("p").size == 5
    assert state.allocate("p", 5) == [1, 2, 3, 4, 5]  # pending slots first, then append


def test_create_partition_below_produced_rows_raises() -> None:
    state = ControllerState()
    put(state, "p", 3)
    with pytest.raises(ValueError, match="already produced"):
        state.create_partition("p", expected_size=2)
    state.create_partition("p", expected_size=3)  # equal to produced: fine
    with pytest.raises(ValueError):
        state.create_partition("p", expected_size=-1)
    with pytest.raises(TypeError):
        state.create_partition("p", expected_size="3")  # type: ignore[arg-type]


def test_smaller_reservation_drops_pending_slots_beyond_it() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=6)
    put(state, "p", 2)
    state.create_partition("p", expected_size=3)
    assert state.partition_info("p").size == 3
    assert state.allocate("p", 2) == [2, 3]  # slot 2, then a dead row reused (lowest first)


def test_insert_fills_lowest_slots_then_appends_beyond_the_reservation() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=3)
    assert state.allocate("p", 2) == [0, 1]
    assert state.allocate("p", 3) == [2, 3, 4]
    info = state.partition_info("p")
    assert info.size == 5 and info.expected_size == 3


def test_partitions_touched_first_get_the_default_reservation() -> None:
    state = ControllerState(default_expected_size=4)
    assert state.get_meta("p", "t", ["x"], 2) is None  # waits: 4 rows are coming
    assert state.partition_info("p").expected_size == 4
    assert state.allocate("q", 1) == [0]
    assert state.partition_info("q").size == 4
    no_default = ControllerState()
    assert no_default.get_meta("p", "t", ["x"], 2) is None  # a never-ending stream: wait
    assert no_default.partition_info("p").size == 0


def test_rows_are_partition_local() -> None:
    state = ControllerState()
    assert put(state, "a", 3) == [0, 1, 2]
    assert put(state, "b", 2) == [0, 1]
    assert put(state, "a", 1) == [3]


# ------------------------------------------------------------------ allocate / release / commit


def test_allocate_validation() -> None:
    state = ControllerState()
    with pytest.raises(ValueError):
        state.allocate("p", -1)
    with pytest.raises(TypeError):
        state.allocate("p", 1, keys=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="repeated"):
        state.allocate("p", 2, keys=["a", "a"])
    state.allocate("p", 1, keys=["a"])
    with pytest.raises(ValueError, match="already present"):
        state.allocate("p", 2, keys=["b", "a"])
    with pytest.raises(ValueError, match="one key per row"):
        state.allocate("p", 2, keys=["c"])
    assert state.rows_for_keys("p", ["a"]) == [0]
    assert state.partition_info("p").size == 1  # failed calls changed nothing
    with pytest.raises(TypeError):
        state.allocate("", 1)


def test_in_flight_rows_are_live_but_not_produced() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    state.allocate("p", 3)
    put(state, "p", 1)
    _, produced = state.get_production_status(["x"], "p")
    assert produced[:, 0].tolist() == [False, False, False, True]
    assert state.partition_info("p").size == 4


def test_release_returns_reserved_rows_to_pending_and_drops_appended_ones() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    rows = state.allocate("p", 4, keys=["a", "b", "c", "d"])
    assert rows == [0, 1, 2, 3]
    state.release("p", rows)
    assert state.partition_info("p").size == 2  # slots 0, 1 pending again
    assert state.kv_list("p") == {"p": {}}
    assert state.allocate("p", 3, keys=["a", "b", "c"]) == [0, 1, 2]  # slots, then row 2 reused
    state.release("p", [0])
    put(state, "p", 1)  # fills slot 0 again
    assert state.get_production_status(["x"], "p")[0].tolist() == [0, 1, 2]


def test_release_leaves_committed_rows_and_unknown_rows_alone() -> None:
    state = ControllerState()
    rows = put(state, "p", 2)
    state.release("p", [*rows, 57, -1])
    state.release("nope", [0])
    assert state.partition_info("p").produced == {"x": 2}


def test_commit_requires_allocated_rows() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    with pytest.raises(ValueError, match="pending"):
        state.commit("p", [0], {"x": F32})
    rows = state.allocate("p", 2)
    with pytest.raises(ValueError, match="repeat"):
        state.commit("p", [rows[0], rows[0]], {"x": F32})
    with pytest.raises(ValueError):
        state.commit("p", [5], {"x": F32})
    with pytest.raises(PartitionNotFoundError):
        state.commit("q", [0], {"x": F32})


def test_dtype_or_rank_conflict_raises_and_changes_nothing() -> None:
    state = ControllerState()
    rows = put(state, "p", 2, tags=[{"a": 1}, {"a": 2}])
    more = state.allocate("p", 2)
    for bad in (FieldSpec("object", -1), FieldSpec("torch.float32", 2)):  # dtypes promote
        with pytest.raises(SchemaError, match="'x'"):
            state.commit("p", more, {"y": SPECS["y"], "x": bad}, [{"a": 9}, {"a": 9}])
    with pytest.raises(ValueError, match="tag dicts"):
        state.commit("p", more, {"y": SPECS["y"]}, [{"a": 9}])
    with pytest.raises(TypeError):
        state.commit("p", rows, {"y": SPECS["y"]}, [{"a": 9}, "no"])
    info = state.partition_info("p")
    assert info.produced == {"x": 2} and state.field_specs("p") == {"x": F32}
    assert state.get_production_status(["x"], "p")[1][:, 0].tolist() == [True, True, False, False]
    meta = state.get_meta("p", "t", ["x"], 2)
    assert meta is not None and meta.tags == [{"a": 1}, {"a": 2}]


def test_fields_and_tags_accumulate_over_commits() -> None:
    state = ControllerState()
    rows = put(state, "p", 2, tags=[{"uid": 0}, {"uid": 1}])
    assert state.get_meta("p", "t", ["x", "y"], 2) is None  # y not produced yet
    state.commit("p", rows, {"y": {"dtype": "torch.int64", "ndim": 2}}, [{"len": 5}, None])
    state.set_tags("p", [1], [{"len": 7}])
    meta = state.get_meta("p", "t", ["x", "y"], 2)
    assert meta is not None and meta.rows == [0, 1] and meta.fields == ["x", "y"]
    assert meta.tags == [{"uid": 0, "len": 5}, {"uid": 1, "len": 7}]
    assert state.check_production_status(["x", "y"], "p")
    with pytest.raises(ValueError):
        state.set_tags("p", [9], [{}])


# ------------------------------------------------------------------ get_meta and exhaustion


def test_sequential_batches_and_waiting() -> None:
    state = ControllerState()
    put(state, "p", 3)
    assert rows_of(state.get_meta("p", "t", ["x"], 2)) == [0, 1]
    assert state.get_meta("p", "t", ["x"], 2) is None  # one ready row, stream not bounded
    put(state, "p", 1)
    assert rows_of(state.get_meta("p", "t", "x", 2)) == [2, 3]


def test_two_tasks_consume_independently() -> None:
    state = ControllerState()
    put(state, "p", 4)
    assert rows_of(state.get_meta("p", "a", ["x"], 4)) == [0, 1, 2, 3]
    assert rows_of(state.get_meta("p", "b", ["x"], 2)) == [0, 1]
    assert rows_of(state.get_meta("p", "b", ["x"], 2)) == [2, 3]
    assert state.partition_info("p").consumed == {"a": 4, "b": 4}


def test_expected_size_stream_ends_exactly_after_n_rows() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=5)
    got: list[int] = []
    for _ in range(5):
        put(state, "p", 1)
        meta = state.get_meta("p", "t", ["x"], 2)
        got += meta.rows if meta else []
    assert got == [0, 1, 2, 3, 4]  # the last is a final partial batch of 1
    end = state.get_meta("p", "t", ["x"], 2)
    assert end is not None and end.is_empty and end.partition_id == "p"
    assert state.check_consumption_status("t", "p")


def test_final_partial_batch_and_drop_last() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=3)
    put(state, "p", 3)
    assert rows_of(state.get_meta("p", "t", ["x"], 2)) == [0, 1]
    dropped = state.get_meta("p", "t", ["x"], 2, drop_last=True)
    assert dropped is not None and dropped.is_empty
    assert not state.check_consumption_status("t", "p")  # row 2 stays unconsumed
    assert rows_of(state.get_meta("p", "t", ["x"], 2)) == [2]


def test_a_row_missing_a_field_keeps_the_task_waiting_even_when_sealed() -> None:
    state = ControllerState()
    rows = put(state, "p", 2)
    state.commit("p", rows[:1], {"y": SPECS["y"]})
    state.seal("p")
    assert rows_of(state.get_meta("p", "t", ["x", "y"], 2)) is None  # row 1 may still get y
    assert rows_of(state.get_meta("p", "u", ["x"], 2)) == [0, 1]  # another field set: done
    state.commit("p", rows[1:], {"y": SPECS["y"]})
    assert rows_of(state.get_meta("p", "t", ["x", "y"], 2)) == [0, 1]


def test_in_flight_rows_keep_consumers_waiting() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    put(state, "p", 1)
    flying = state.allocate("p", 2)  # fills slot 1 and appends row 2
    assert state.get_meta("p", "t", ["x"], 3) is None
    state.commit("p", flying, {"x": F32})
    assert rows_of(state.get_meta("p", "t", ["x"], 3)) == [0, 1, 2]
    assert state.get_meta("p", "t", ["x"], 3) == BatchMeta.empty("p", ["x"])


def test_reservation_full_and_produced_ends_the_stream_without_seal() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    put(state, "p", 2)
    assert rows_of(state.get_meta("p", "t", ["x"], 8)) == [0, 1]
    assert state.check_consumption_status("t", "p")
    put(state, "p", 1)  # appends beyond a full reservation are still accepted
    assert not state.check_consumption_status("t", "p")
    assert rows_of(state.get_meta("p", "t", ["x"], 8)) == [2]


def test_never_ending_stream_without_seal_or_reservation() -> None:
    state = ControllerState()
    put(state, "p", 2)
    assert rows_of(state.get_meta("p", "t", ["x"], 2)) == [0, 1]
    assert state.get_meta("p", "t", ["x"], 2) is None
    assert not state.check_consumption_status("t", "p")


def test_unknown_field_waits_unless_exhausted() -> None:
    state = ControllerState()
    put(state, "p", 1)
    state.seal("p")
    assert state.get_meta("p", "t", ["nope"], 1) is None
    assert rows_of(state.get_meta("p", "t", ["x"], 1)) == [0]
    assert state.get_meta("p", "t", ["nope"], 1) == BatchMeta.empty("p", ["nope"])


def test_get_meta_validation() -> None:
    state = ControllerState()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            state.get_meta("p", "t", ["x"], bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        state.get_meta("p", "", ["x"], 1)
    with pytest.raises(TypeError):
        state.get_meta("p", "t", [1], 1)  # type: ignore[list-item]


def test_ready_rows_behind_an_unready_row_are_found() -> None:
    state = ControllerState()
    state.allocate("p", 1)  # row 0 stays in flight: the low-water mark stays at 0
    put(state, "p", 3000)
    got: list[int] = []
    for _ in range(300):
        meta = state.get_meta("p", "t", ["x"], 10)
        assert meta is not None
        got += meta.rows
    assert got == list(range(1, 3001))
    assert state.get_meta("p", "t", ["x"], 10) is None


# ------------------------------------------------------------------ seal and clear


def test_seal_drops_unfilled_slots_and_forbids_inserts() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=8)
    put(state, "p", 3)
    state.seal("p")
    state.seal("p")  # idempotent
    info = state.partition_info("p")
    assert (info.size, info.sealed) == (3, True)
    with pytest.raises(PartitionSealedError):
        state.allocate("p", 1)
    with pytest.raises(PartitionSealedError):
        state.create_partition("p", expected_size=10)
    assert rows_of(state.get_meta("p", "t", ["x"], 8)) == [0, 1, 2]
    assert state.check_consumption_status("t", "p")


def test_seal_while_rows_are_in_flight() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=4)
    flying = state.allocate("p", 2)
    state.seal("p")
    assert state.get_meta("p", "t", ["x"], 4) is None  # in-flight rows may still commit
    state.commit("p", flying[:1], {"x": F32})
    state.release("p", flying[1:])  # a failed write after seal: the row is dropped
    assert rows_of(state.get_meta("p", "t", ["x"], 4)) == [0]
    assert state.check_consumption_status("t", "p")


def test_seal_an_unknown_partition_creates_an_empty_finished_stream() -> None:
    state = ControllerState()
    state.seal("p")
    assert state.get_meta("p", "t", ["x"], 4) == BatchMeta.empty("p", ["x"])
    assert state.check_consumption_status("t", "p")


def test_clear_samples() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=4)
    rows = state.allocate("p", 2, keys=["a", "b"])
    state.commit("p", rows, {"x": F32}, [{"k": 1}, {"k": 2}])
    state.get_meta("p", "t", ["x"], 1)
    state.clear_samples("p", [0, 3, 99])
    state.clear_samples("p", [0])  # idempotent
    state.clear_samples("nope", [0])
    info = state.partition_info("p")
    assert (info.size, info.produced, info.consumed) == (2, {"x": 1}, {"t": 0})
    assert state.get_consumption_status("t", "p")[0].tolist() == [1, 2]
    assert state.kv_list("p") == {"p": {"b": {"k": 2}}}
    assert state.allocate("p", 2) == [2, 0]  # slot 2, then dead rows reused lowest first


def test_clear_partition_bumps_the_generation() -> None:
    state = ControllerState()
    put(state, "p", 2)
    first = state.generation("p")
    assert first > 0 and state.has_partition("p")
    state.clear_partition("p")
    state.clear_partition("p")  # idempotent
    assert state.generation("p") == 0 and not state.has_partition("p")
    assert state.list_partitions() == []
    with pytest.raises(PartitionNotFoundError):
        state.partition_info("p")
    with pytest.raises(KeyError):
        state.check_consumption_status("t", "p")
    assert state.get_meta("p", "t", ["x"], 1) is None  # created afresh
    assert state.generation("p") not in (0, first)
    assert state.partition_info("p").size == 0


def test_reset_consumption() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=3)
    put(state, "p", 3)
    for task in ("a", "b"):
        assert rows_of(state.get_meta("p", task, ["x"], 3)) == [0, 1, 2]
    state.reset_consumption("p", "a")
    assert rows_of(state.get_meta("p", "a", ["x"], 3)) == [0, 1, 2]
    assert state.get_meta("p", "b", ["x"], 3) == BatchMeta.empty("p", ["x"])
    state.reset_consumption("p")
    assert state.partition_info("p").consumed == {"a": 0, "b": 0}
    state.reset_consumption("nope")


# ------------------------------------------------------------------ status and keys


def test_status_queries_count_pending_slots() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=4)
    put(state, "p", 2, fields=("x", "y"))
    state.get_meta("p", "t", ["x"], 1)
    rows, status = state.get_production_status(["y", "z", "x"], "p")
    assert rows.tolist() == [0, 1, 2, 3]
    assert status.tolist() == [[True, False, True]] * 2 + [[False] * 3] * 2
    rows, status = state.get_consumption_status("t", "p")
    assert status.tolist() == [True, False, False, False]
    assert state.get_consumption_status("other", "p")[1].tolist() == [False] * 4
    assert not state.check_production_status(["x"], "p")
    info = state.partition_info("p")
    assert info.produced == {"x": 2, "y": 2} and info.consumed == {"t": 1}
    assert state.list_partitions() == ["p"]


def test_keys() -> None:
    state = ControllerState()
    rows = state.allocate("p", 2, keys=["a", "b"])
    state.commit("p", rows, {"x": F32}, [{"v": 1}, None])
    assert state.rows_for_keys("p", ["b", "a"]) == [1, 0]
    with pytest.raises(KeyError, match=r"'c'.*'d'"):
        state.rows_for_keys("p", ["a", "c", "d"])
    assert state.kv_list() == {"p": {"a": {"v": 1}, "b": {}}}
    assert state.kv_list("nope") == {}
    rows, new = state.upsert_keys("p", ["b", "c"])
    assert rows == [1, 2] and new == [False, True]


# ------------------------------------------------------------------ memory and growth


def test_thousand_partitions_use_memory_proportional_to_their_rows() -> None:
    state = ControllerState()
    state.create_partition("first", expected_size=1024)
    one = state.memory_bytes("first")
    assert one < 1024 * 16
    order = [f"p{i}" for i in range(999)]
    random.Random(0).shuffle(order)
    for i, pid in enumerate(order):
        state.create_partition(pid, expected_size=1024)
        if i % 100 == 0:
            put(state, "first", 1)  # activity elsewhere changes nothing for new partitions
    assert state.memory_bytes(order[-1]) == one
    assert state.memory_bytes() <= 1000 * one + 4 * one


def test_capacity_grows_geometrically() -> None:
    state = ControllerState()
    seen = set()
    for _ in range(5000):
        put(state, "p", 1)
        seen.add(state.memory_bytes("p") - 8 * state.partition_info("p").size)
    assert len(seen) <= 12  # about log2(5000) reallocations, not one per append
    assert state.memory_bytes("p") <= 2 * 5000 * (2 + 2 + 4) + 8 * 5000  # + unit, version per row


def test_bytes_per_row_are_small() -> None:
    state = ControllerState()
    rows = state.allocate("p", 10_000)
    state.commit("p", rows, {f"f{i}": F32 for i in range(8)})
    for t in range(4):
        state.get_meta("p", f"t{t}", ["f0"], 1)
    assert state.memory_bytes("p") / 10_000 <= 32  # 1 + 8 + 4 bytes of status + 8 for tags


# ------------------------------------------------------------------ a random workload


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("aprgc"), st.integers(1, 5)), max_size=40), st.integers(0, 6)
)
def test_every_committed_row_reaches_every_task_exactly_once(
    ops: list[tuple[str, int]], reserve: int
) -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=reserve)
    flying: list[int] = []
    committed: set[int] = set()
    got: dict[str, list[int]] = {"t1": [], "t2": []}

    def consume(task: str, batch: int) -> BatchMeta | None:
        meta = state.get_meta("p", task, ["x"], batch)
        if meta is not None:
            assert set(meta.rows) <= committed
            got[task] += meta.rows
        return meta

    for op, n in ops:
        if op == "a":
            flying += state.allocate("p", n)
        elif op == "c" and flying:
            state.commit("p", flying[:n], {"x": F32})
            committed.update(flying[:n])
            del flying[:n]
        elif op == "r" and flying:
            state.release("p", flying[-n:])
            del flying[-n:]
        elif op in "pg":
            consume("t1" if op == "p" else "t2", n)
    state.release("p", flying)
    state.seal("p")
    for task in got:
        while True:
            meta = consume(task, 3)
            assert meta is not None  # sealed, nothing in flight: never asked to wait
            if meta.is_empty:
                break
        assert sorted(got[task]) == sorted(committed)
        assert state.check_consumption_status(task, "p")


def test_helpers_for_update_puts_and_kv_reads() -> None:
    state = ControllerState()
    rows = state.allocate("p", 3)
    state.commit("p", rows, {"x": F32}, [{"a": 1}, {"a": 2}, {"a": 3}])
    state.commit("p", rows[:2], {"y": SPECS["y"]})
    state.check_rows("p", [2, 0])
    with pytest.raises(ValueError):
        state.check_rows("p", [3])
    with pytest.raises(PartitionNotFoundError):
        state.check_rows("q", [0])
    meta = state.meta_of("p", [2, 0], ["x"])
    assert meta == BatchMeta("p", [2, 0], ["x"], [{"a": 3}, {"a": 1}], units=[-1, -1])
    assert state.common_fields("p", [0, 1]) == ["x", "y"]
    assert state.common_fields("p", [0, 2]) == ["x"]
