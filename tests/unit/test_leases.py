"""Put leases, row reuse, placement, capacity and lost rows on the controller state (no I/O)."""

from __future__ import annotations

import numpy as np
import pytest

from transferqueue.controller.state import ControllerState
from transferqueue.errors import (
    PutLeaseExpiredError,
    RowsBusyError,
    RowsLostError,
    SchemaError,
    StorageFullError,
)

F32 = {"dtype": "torch.float32", "ndim": 1}
F32_SPEC = {"x": F32}
RANK2 = {"dtype": "torch.float32", "ndim": 2}  # cannot mix with F32 (dtypes promote)
MiB = 1 << 20


def finish(state: ControllerState, rel) -> list[int]:  # type: ignore[no-untyped-def]
    """The actor's drain without units: the bytes are gone, give the rows back."""
    return state.finish_release(rel)


def test_begin_put_validates_tags_and_specs_before_allocating() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    with pytest.raises(TypeError, match="tag names must be strings"):
        state.begin_put("p", {"x": F32}, now=0, n=2, tags=[{1: "a"}, {}])
    with pytest.raises(ValueError, match="tag dicts"):
        state.begin_put("p", {"x": F32}, now=0, n=2, tags=[{}])
    with pytest.raises(TypeError, match="field names"):
        state.begin_put("p", {3: F32}, now=0, n=2)
    info = state.partition_info("p")
    assert (info.size, info.in_flight) == (2, 0)  # both slots still pending, none taken
    assert state.allocate("p", 2) == [0, 1]


def test_a_commit_refused_releases_nothing_published_and_the_stream_ends() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=2)
    a = state.begin_put("p", {"x": F32}, now=0, n=1)
    b = state.begin_put("p", {"x": RANK2}, now=0, n=1)  # a first put of x too: not known yet
    state.commit_put(a.lease)
    with pytest.raises(SchemaError, match=r"holds dtype torch\.float32 with per-row rank 1"):
        state.commit_put(b.lease)
    rel = state.end_lease(b.lease)
    assert rel is not None and rel.rows.tolist() == [1]
    assert finish(state, rel) == [1]
    assert state.partition_info("p").in_flight == 0
    state.seal("p")  # the slot b held went back to pending; seal drops it
    meta = state.get_meta("p", "t", ["x"], 4)
    assert meta is not None and meta.rows == [0]
    assert state.get_meta("p", "t", ["x"], 4) == meta.empty("p", ["x"])  # exhausted


def test_a_lease_expires_at_its_deadline_and_its_slot_goes_back_to_pending() -> None:
    state = ControllerState(put_lease_s=1.0)
    state.create_partition("p", expected_size=1)
    lease = state.begin_put("p", {"x": F32}, now=100.0, n=1)
    assert state.leases.next_deadline() == 101.0
    assert state.expire(100.5) == []
    (rel,) = state.expire(101.0)
    assert rel.reason == "expired" and rel.rows.tolist() == [0]
    with pytest.raises(PutLeaseExpiredError, match="put_lease_s"):
        state.commit_put(lease.lease)
    finish(state, rel)
    assert state.leases.next_deadline() is None
    assert state.allocate("p", 1) == [0]  # the slot is pending again


def test_an_appended_row_of_an_expired_lease_is_dropped_and_reused() -> None:
    state = ControllerState(put_lease_s=1.0)
    lease = state.begin_put("p", {"x": F32}, now=0, n=3)
    (rel,) = state.expire(5)
    assert sorted(finish(state, rel)) == [0, 1, 2]
    assert state.partition_info("p").size == 0
    assert state.end_lease(lease.lease) is None
    assert state.begin_put("p", {"x": F32}, now=5, n=2).rows.tolist() == [0, 1]


def test_abort_after_a_commit_whose_reply_was_lost_releases_nothing() -> None:
    state = ControllerState()
    lease = state.begin_put("p", {"x": F32}, now=0, n=2)
    state.commit_put(lease.lease)
    assert state.end_lease(lease.lease) is None  # the committed rows stay
    assert state.partition_info("p").produced == {"x": 2}


def test_an_update_put_releases_no_rows_it_did_not_allocate() -> None:
    state = ControllerState()
    first = state.begin_put("p", {"x": F32}, now=0, n=2)
    state.commit_put(first.lease)
    update = state.begin_put("p", {"y": F32}, now=0, rows=[0, 1])
    rel = state.end_lease(update.lease)
    assert rel is not None and rel.rows.tolist() == []
    assert state.partition_info("p").produced == {"x": 2}


def test_row_ids_are_reused_after_clear_so_memory_follows_live_rows() -> None:
    state = ControllerState(num_units=2)
    keys = [f"k{i}" for i in range(64)]
    sizes = []
    for cycle in range(2000):
        lease = state.begin_put("kv", {"x": F32}, now=cycle, keys=keys)
        state.commit_put(lease.lease)
        groups = state.drop_rows("kv", lease.rows.tolist())
        state.recycle("kv", state.generation("kv"), [r for rs in groups.values() for r in rs])
        if cycle in (1000, 1999):
            sizes.append(state.memory_bytes("kv"))
        assert max(lease.rows.tolist()) < 64  # the same 64 row ids, cycle after cycle
    assert sizes[0] == sizes[1]


def test_a_dropped_row_is_not_reused_before_its_bytes_are_cleared() -> None:
    state = ControllerState(num_units=2)
    lease = state.begin_put("p", {"x": F32}, now=0, n=2)
    state.commit_put(lease.lease)
    groups = state.drop_rows("p", [0, 1])
    assert sorted(r for rs in groups.values() for r in rs) == [0, 1]
    assert state.begin_put("p", {"x": F32}, now=0, n=1).rows.tolist() == [2]  # not 0 yet
    state.recycle("p", state.generation("p"), [0, 1])
    assert state.begin_put("p", {"x": F32}, now=0, n=1).rows.tolist() == [0]


def test_a_reused_row_below_a_task_mark_is_found_by_that_task() -> None:
    state = ControllerState()
    first = state.begin_put("p", {"x": F32}, now=0, n=4)
    state.commit_put(first.lease)
    assert state.get_meta("p", "t", ["x"], 4).rows == [0, 1, 2, 3]  # type: ignore[union-attr]
    state.recycle(
        "p", state.generation("p"), [r for rows in state.drop_rows("p", [1]).values() for r in rows]
    )
    again = state.begin_put("p", {"x": F32}, now=0, n=1)
    assert again.rows.tolist() == [1]
    state.commit_put(again.lease)
    assert state.get_meta("p", "t", ["x"], 1).rows == [1]  # type: ignore[union-attr]


def test_small_puts_are_spread_over_the_units_and_big_ones_striped() -> None:
    state = ControllerState(num_units=4, stripe_rows=8)
    units = [int(state.begin_put("p", {}, now=0, n=1).units[0]) for _ in range(8)]
    assert sorted(units) == [0, 0, 1, 1, 2, 2, 3, 3]
    big = state.begin_put("q", {}, now=0, n=32).units.tolist()
    assert [big[i] for i in range(0, 32, 8)] == sorted(set(big), key=big.index)
    assert all(len(set(big[i : i + 8])) == 1 for i in range(0, 32, 8))


def test_capacity_is_one_bound_for_the_system() -> None:
    state = ControllerState(num_units=2, capacity_bytes=4 * MiB)
    lease = state.begin_put("p", {"x": F32}, now=0, n=1, nbytes=2 * MiB + 64)  # > half of it
    with pytest.raises(StorageFullError, match="storage full"):
        state.begin_put("p", {"x": F32}, now=0, n=1, nbytes=2 * MiB)  # reserved counts
    state.commit_put(lease.lease, net_bytes=2 * MiB + 64)
    small = state.begin_put("p", {"x": F32}, now=0, n=1, nbytes=MiB)
    state.end_lease(small.lease)  # an aborted put gives its reservation back
    assert state.capacity.used == 2 * MiB + 64 and state.capacity.reserved == 0
    state.capacity.freed(2 * MiB + 64)  # the units reported the bytes of a clear freed
    state.begin_put("p", {"x": F32}, now=0, n=1, nbytes=4 * MiB)


def test_rows_on_a_dead_unit_are_lost_counted_and_not_waited_for() -> None:
    state = ControllerState(num_units=2, stripe_rows=2)
    state.create_partition("p", expected_size=4)
    lease = state.begin_put("p", {"x": F32}, now=0, n=4)
    state.commit_put(lease.lease)
    dead = int(lease.units[0])
    on_dead = lease.rows[lease.units == dead].tolist()
    assert state.mark_unit_dead(dead) == {"p": len(on_dead)}
    info = state.partition_info("p")
    assert info.lost == len(on_dead) and info.size == 4 - len(on_dead)
    assert info.produced == {"x": 4 - len(on_dead)}
    with pytest.raises(RowsLostError, match="storage unit"):
        state.locate("p", on_dead)
    meta = state.get_meta("p", "t", ["x"], 4)
    assert meta is not None and sorted(meta.rows) == sorted(set(range(4)) - set(on_dead))
    assert state.check_consumption_status("t", "p")  # lost rows do not keep the task waiting
    assert set(state.begin_put("p", {"x": F32}, now=0, n=6).units.tolist()) == {1 - dead}
    state.clear_samples("p", on_dead)
    assert state.partition_info("p").lost == 0


def test_clearing_a_partition_under_a_lease_makes_its_commit_fail() -> None:
    state = ControllerState()
    lease = state.begin_put("p", {"x": F32}, now=0, n=2)
    state.clear_partition("p")
    with pytest.raises(Exception, match="cleared"):
        state.commit_put(lease.lease)
    rel = state.end_lease(lease.lease)
    assert rel is not None and finish(state, rel) == []
    assert np.array_equal(rel.rows, [0, 1])  # their bytes are cleared from the units


def test_a_key_another_put_is_writing_is_busy_and_a_retry_after_expiry_gets_a_fresh_row() -> None:
    state = ControllerState(num_units=2, put_lease_s=1.0)
    first = state.begin_put("kv", F32_SPEC, now=0, keys=["k"])
    with pytest.raises(RowsBusyError, match="being written by another put"):
        state.begin_put("kv", F32_SPEC, now=0.5, keys=["k"])
    (rel,) = state.expire(1.0)  # the first writer died; its bytes are still being cleared
    retry = state.begin_put("kv", F32_SPEC, now=1.0, keys=["k"])
    assert retry.rows.tolist() != first.rows.tolist()  # not the row being released
    state.commit_put(retry.lease)
    state.finish_release(rel)  # the release lands after the retry committed
    assert state.rows_for_keys("kv", ["k"]) == retry.rows.tolist()
    assert state.partition_info("kv").produced == {"x": 1}
    writing = state.begin_put("kv", F32_SPEC, now=2, n=1)
    with pytest.raises(RowsBusyError):  # an update into rows a put is writing is refused too
        state.begin_put("kv", F32_SPEC, now=2, rows=writing.rows.tolist())
    state.commit_put(writing.lease)
    update = state.begin_put("kv", F32_SPEC, now=2, rows=writing.rows.tolist())  # now fine
    state.commit_put(update.lease)


def test_a_row_cleared_while_a_put_rewrites_it_is_cleared_again_before_reuse() -> None:
    state = ControllerState(num_units=2)
    first = state.begin_put("p", F32_SPEC, now=0, n=1)
    state.commit_put(first.lease)
    row = first.rows.tolist()
    update = state.begin_put("p", {"y": F32}, now=0, rows=row)  # e.g. a key put again
    groups = state.drop_rows("p", row)  # cleared meanwhile; its clear reaches the unit
    state.recycle("p", state.generation("p"), [r for rs in groups.values() for r in rs])
    # the update's bytes may still land after that clear: the row is not reused yet
    assert state.begin_put("p", F32_SPEC, now=0, n=1).rows.tolist() != row
    rel = state.end_lease(update.lease)  # the update fails (its rows were cleared)
    assert rel is not None and rel.rows.tolist() == row  # so its bytes are cleared again
    assert rel.by_unit() == {int(first.units[0]): row}
    state.finish_release(rel)
    assert state.begin_put("p", F32_SPEC, now=0, n=1).rows.tolist() == row  # reusable now
