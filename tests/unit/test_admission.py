"""Staleness-bounded admission and consumer leases on the controller state (no I/O)."""

from __future__ import annotations

import pytest

from transferqueue.controller.samplers import GRPOGroupNSampler
from transferqueue.controller.state import ControllerState
from transferqueue.errors import PartitionSealedError

F32 = {"x": {"dtype": "torch.float32", "ndim": 1}}


def fill(state: ControllerState, pid: str, meta, tags=None) -> None:  # type: ignore[no-untyped-def]
    lease = state.begin_put(pid, F32, now=0, rows=meta.rows, tags=tags)
    state.commit_put(lease.lease)


def test_the_window_is_version_plus_k_plus_one_batches() -> None:
    state = ControllerState()
    state.create_partition("p", max_staleness=1, global_batch_size=2)
    assert state.reserve("p", 4) is not None  # (0 + 1 + 1) * 2
    assert state.reserve("p", 1) is None  # must wait
    assert state.reserve("p", 3, partial=True).rows == []  # type: ignore[union-attr]
    assert state.advance_version("p") == 1
    meta = state.reserve("p", 3, partial=True)
    assert meta is not None and len(meta.rows) == 2 and meta.tags[0] == {"version": 1}
    with pytest.raises(ValueError, match="no staleness bound"):
        state.create_partition("plain")
        state.reserve("plain", 1)
    with pytest.raises(ValueError, match="go together"):
        state.create_partition("half", max_staleness=1)


def test_evicted_rows_give_their_admission_back() -> None:
    state = ControllerState()
    state.create_partition("p", max_staleness=0, global_batch_size=2)
    old = state.reserve("p", 2)
    fill(state, "p", old)
    state.advance_version("p")
    assert state.reserve("p", 2) is not None  # (1 + 0 + 1) * 2 = 4: 2 more
    assert state.reserve("p", 1) is None  # now full
    assert state.get_meta("p", "t", ["x"], 2, max_version_lag=0, evict=True) is None
    assert state.partition_info("p").evicted == {"t": 2}
    assert state.reserve("p", 2) is not None  # the evicted pair no longer counts


def test_groups_a_filter_drops_give_their_admission_back() -> None:
    state = ControllerState(
        sampler=GRPOGroupNSampler(2, keep_group=lambda tags: len({t["r"] for t in tags}) > 1)
    )
    state.create_partition("p", max_staleness=1, global_batch_size=2)
    for _ in range(2):  # two groups, no signal in either: both dropped
        meta = state.reserve("p", 2)
        assert meta is not None
        fill(state, "p", meta, tags=[{"uid": meta.rows[0], "r": 1.0}] * 2)
    assert state.reserve("p", 2) is None  # the window (0 + 1 + 1) * 2 is full
    assert state.get_meta("p", "t", ["x"], 2) is None  # nothing to hand out...
    assert state.partition_info("p").dropped == {"t": 4}
    assert state.reserve("p", 2) is not None  # ...and the dropped rows made room again


def test_a_put_into_slots_a_seal_dropped_says_so() -> None:
    state = ControllerState()
    state.create_partition("p", max_staleness=1, global_batch_size=2)
    meta = state.reserve("p", 2)
    state.seal("p")
    with pytest.raises(PartitionSealedError, match="sealed"):
        state.begin_put("p", F32, now=0, rows=meta.rows)  # type: ignore[union-attr]


def test_rows_leased_to_the_callers_own_group_do_not_keep_its_stream_open() -> None:
    state = ControllerState()
    state.create_partition("p", expected_size=4)
    lease = state.begin_put("p", F32, now=0, n=4)
    state.commit_put(lease.lease)
    first = state.get_meta("p", "t", ["x"], 2, lease_s=60, lease_group="group-a")
    second = state.get_meta("p", "t", ["x"], 2, lease_s=60, lease_group="group-a")
    assert first is not None and second is not None
    # another group must wait: the rows may come back
    assert state.get_meta("p", "t", ["x"], 2, lease_s=60, lease_group="group-b") is None
    # the group itself holds them: its stream ends (it acks what it holds)
    end = state.get_meta("p", "t", ["x"], 2, lease_s=60, lease_group="group-a")
    assert end is not None and end.is_empty
    assert not state.check_consumption_status("t", "p")  # exhausted only once acked
    state.ack("p", first.lease)
    state.ack("p", second.lease)
    assert state.check_consumption_status("t", "p")
