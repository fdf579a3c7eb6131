"""The controller's state as plain data and back (transferqueue.controller.snapshot; no I/O)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from transferqueue.controller import snapshot
from transferqueue.controller.partition import COMMITTED, DEAD, PENDING
from transferqueue.controller.state import ControllerState, FieldSpec
from transferqueue.errors import CheckpointError

X = {"x": FieldSpec("torch.float32", 1)}
Y = {"y": FieldSpec("torch.int64", 0)}


def put(state: ControllerState, pid: str, n: int = 0, specs=X, **kw) -> list[int]:
    lease = state.begin_put(pid, specs, now=0.0, n=n, **kw)
    state.commit_put(lease.lease)
    return lease.rows.tolist()


def restored(state: ControllerState, units: int = 3) -> ControllerState:
    plain = snapshot.check(copy.deepcopy(snapshot.take(state)))
    fresh = ControllerState(num_units=units, stripe_rows=2)
    parts = snapshot.build(plain, fresh.placement, range(100, 100 + len(plain)))
    snapshot.install(fresh, parts, plain)
    return fresh


def test_round_trip_keeps_rows_fields_tags_keys_and_consumption() -> None:
    state = ControllerState(num_units=2)
    state.create_partition("p", expected_size=6)
    put(state, "p", 4, tags=[{"i": i} for i in range(4)])
    put(state, "p", rows=[0, 1], specs=Y)  # a second field on two rows
    put(state, "kv", keys=["a", "b"], tags=[{"s": 1}, {"s": 2}])
    state.seal("kv")
    got = state.get_meta("p", "train", ["x"], 2)
    assert got is not None and got.rows == [0, 1]
    back = restored(state)
    assert back.list_partitions() == ["p", "kv"]
    for pid in ("p", "kv"):
        a, b = state.partition_info(pid), back.partition_info(pid)
        assert (a.size, a.expected_size, a.sealed, a.produced, a.consumed, a.pending) == (
            b.size, b.expected_size, b.sealed, b.produced, b.consumed, b.pending,
        )  # fmt: skip
    assert back.rows_for_keys("kv", ["b", "a"]) == [1, 0]
    assert back.kv_list("kv") == {"kv": {"a": {"s": 1}, "b": {"s": 2}}}
    assert back.common_fields("p", [0, 1]) == ["x", "y"]
    # a resumed task reads only what it had not consumed; another task reads everything
    resumed = back.get_meta("p", "train", ["x"], 2)
    assert resumed is not None and resumed.rows == [2, 3]
    assert resumed.tags == [{"i": 2}, {"i": 3}]
    other = back.get_meta("p", "eval", ["x"], 4)
    assert other is not None and other.rows == [0, 1, 2, 3]
    # the two pending slots are still pending: a put fills them first
    assert put(back, "p", 2) == [4, 5]


def test_rows_are_placed_on_the_units_of_the_new_system() -> None:
    state = ControllerState(num_units=1)
    put(state, "p", 8)
    back = restored(state, units=4)
    units = back.locate("p", list(range(8)))
    assert set(units) == {0, 1, 2, 3}  # stripes of 2 rows over 4 units


def test_in_flight_puts_are_out_slots_back_to_pending_appends_dead() -> None:
    state = ControllerState(num_units=2)
    state.create_partition("p", expected_size=2)
    put(state, "p", 1)  # row 0, slot
    slot = state.begin_put("p", X, now=0.0, n=2)  # row 1 (a slot) and row 2 (appended)
    state.begin_put("kv", X, now=0.0, keys=["new"])
    plain = snapshot.take(state)
    p = next(x for x in plain if x["pid"] == "p")
    assert p["state"].tolist() == [COMMITTED, PENDING, DEAD]
    assert next(x for x in plain if x["pid"] == "kv")["keys"] == {}
    back = restored(state)
    assert back.partition_info("p").pending == 1 and back.partition_info("p").size == 2
    assert slot.lease  # the live lease is not restored: nothing is in flight
    assert back.leases.in_flight("p") == 0
    assert put(back, "p", 2) == [1, 2]  # the slot first, then the dead row is reused


def test_rows_leased_to_a_consumer_are_handed_out_again_first() -> None:
    state = ControllerState(num_units=1)
    put(state, "p", 4)
    state.seal("p")
    leased = state.get_meta("p", "t", ["x"], 2, lease_s=30.0, now=0.0)
    assert leased is not None and leased.rows == [0, 1]
    acked = state.get_meta("p", "t", ["x"], 1, lease_s=30.0, now=0.0)
    assert acked is not None
    state.ack("p", acked.lease)  # row 2 consumed
    back = restored(state)
    again = back.get_meta("p", "t", ["x"], 3)
    assert again is not None and sorted(again.rows) == [0, 1, 3]
    assert back.check_consumption_status("t", "p")


def test_admission_versions_and_reserved_slots_survive() -> None:
    state = ControllerState(num_units=1)
    state.create_partition("p", max_staleness=1, global_batch_size=2)
    reserved = state.reserve("p", 2)
    assert reserved is not None
    put(state, "p", rows=reserved.rows[:1])
    state.advance_version("p")
    back = restored(state)
    info = back.partition_info("p")
    assert (info.version, info.admitted, info.max_staleness) == (1, 2, 1)
    assert back.get_meta("p", "t", ["x"], 1).tags == [{"version": 0}]
    # the unfilled reserved slot is still reserved: its put can fill it
    assert put(back, "p", rows=reserved.rows[1:]) == reserved.rows[1:]


def test_updates_in_flight_names_puts_that_rewrite_committed_rows() -> None:
    state = ControllerState(num_units=1)
    put(state, "p", 2)
    state.begin_put("q", X, now=0.0, n=1)  # new rows: not an update
    assert snapshot.updates_in_flight(state) == []
    lease = state.begin_put("p", Y, now=0.0, rows=[1])
    assert snapshot.updates_in_flight(state) == ["p"]
    state.commit_put(lease.lease)
    assert snapshot.updates_in_flight(state) == []
    held = snapshot.held_rows(snapshot.take(state))
    assert held["p"].tolist() == [True, True] and held["q"].tolist() == [False]


def test_an_empty_partition_waited_on_keeps_its_generation() -> None:
    state = ControllerState(num_units=1)
    put(state, "p", 1)
    plain = snapshot.take(state)
    fresh = ControllerState(num_units=1)
    assert fresh.get_meta("p", "t", ["x"], 1) is None  # a consumer waits: creates it empty
    generation = fresh.generation("p")
    assert not snapshot.has_rows(fresh, "p")
    snapshot.install(fresh, snapshot.build(plain, fresh.placement, [99]), plain)
    assert fresh.generation("p") == generation
    assert fresh.get_meta("p", "t", ["x"], 1).rows == [0]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.update(state=torch.full((2,), 9, dtype=torch.uint8)), "unknown row states"),
        (lambda p: p.update(n=3), "state must be"),
        (lambda p: p["fields"]["x"].update(rows=torch.ones(5, dtype=torch.bool)), "field 'x'"),
        (lambda p: p.update(tags=[None]), "tags"),
        (lambda p: p["keys"].update(k=7), "key names a row"),
        (lambda p: p.pop("pid"), "no id"),
    ],
)
def test_check_names_what_is_corrupt(corrupt, message) -> None:
    state = ControllerState(num_units=1)
    put(state, "p", 2)
    plain = snapshot.take(state)
    corrupt(plain[0])
    with pytest.raises(CheckpointError, match=message):
        snapshot.check(plain)
    with pytest.raises(CheckpointError, match="not a list"):
        snapshot.check({"p": 1})


def test_lost_rows_stay_lost_and_dead_rows_are_free() -> None:
    state = ControllerState(num_units=2, stripe_rows=1)
    put(state, "p", 4)  # rows 0..3 alternate over units 0 and 1
    state.clear_samples("p", [3])
    lost_unit = state.locate("p", [0])[0]
    state.mark_unit_dead(lost_unit)
    back = restored(state)
    info = back.partition_info("p")
    assert info.lost == 2 and info.size == 1
    arr = back._parts["p"].state[:4]
    assert int(np.count_nonzero(arr == DEAD)) == 1
    assert put(back, "p", 1) == [3]  # the dead row is reused
