"""A property test over the controller state: random interleavings of begin / write /
commit / abort / lease expiry / clear, with the units' clears arriving late, never leave a
row in flight forever and never publish a row without its bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from transferqueue.controller.leases import Release
from transferqueue.controller.partition import COMMITTED, INFLIGHT
from transferqueue.controller.state import ControllerState
from transferqueue.errors import PutLeaseExpiredError, RowsBusyError, SchemaError

PID = "p"
SPECS = [{"x": {"dtype": "torch.float32", "ndim": 1}}, {"x": {"dtype": "torch.float32", "ndim": 2}}]


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = ControllerState(num_units=2, stripe_rows=2, put_lease_s=3.0)
        self.state.create_partition(PID, expected_size=4)
        self.now = 0.0
        #: the storage units: row -> (unit, lease that wrote it); a clear removes a row's
        #: bytes whoever wrote them, as a real unit does
        self.bytes: dict[int, tuple[int, int]] = {}
        self.leases: dict[int, np.ndarray] = {}  # live lease -> rows (as the client knows)
        self.written: set[int] = set()
        #: clears of the units not done yet: (rows by unit, then what to do after)
        self.drains: list[tuple[dict[int, list[int]], Release | None, int]] = []

    # ---------------------------------------------------------------- the client
    @rule(n=st.integers(1, 5), spec=st.sampled_from([0, 1]))
    def begin(self, n: int, spec: int) -> None:
        try:
            lease = self.state.begin_put(PID, SPECS[spec], now=self.now, n=n)
        except SchemaError:  # refused up front: the field already holds the other rank
            return
        self.leases[lease.lease] = lease.rows

    @rule(data=st.data())
    def begin_update(self, data: st.DataObject) -> None:
        """A put of new fields into committed rows (a restarted producer re-putting a key)."""
        part = self.state._parts[PID]
        committed = np.flatnonzero(part.state[: part.n] == COMMITTED).tolist()
        if not committed:
            return
        rows = data.draw(st.lists(st.sampled_from(committed), min_size=1, max_size=2, unique=True))
        try:
            lease = self.state.begin_put(PID, SPECS[0], now=self.now, rows=rows)
        except (RowsBusyError, SchemaError, ValueError):
            return
        self.leases[lease.lease] = lease.rows

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        lease = self.state.leases.get(lease_id)
        if lease is None or self.now >= lease.deadline:  # a unit refuses a late write
            return
        for r, u in zip(lease.rows.tolist(), lease.units.tolist()):
            self.bytes[r] = (u, lease_id)
        self.written.add(lease_id)

    @precondition(lambda self: self.written & set(self.leases))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.written & set(self.leases))))
        try:
            self.state.commit_put(lease_id)
        except (PutLeaseExpiredError, SchemaError, ValueError):  # refused: nothing published
            self._end(lease_id)
        self.leases.pop(lease_id, None)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        self._end(lease_id)
        self.leases.pop(lease_id)

    def _end(self, lease_id: int) -> None:
        rel = self.state.end_lease(lease_id)
        if rel is not None:
            self.drains.append((rel.by_unit(), rel, self.state.generation(PID)))

    # ---------------------------------------------------------------- time, clears
    @rule(dt=st.sampled_from([0.5, 1.0, 4.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        for rel in self.state.expire(self.now):
            self.drains.append((rel.by_unit(), rel, self.state.generation(PID)))

    @rule(rows=st.lists(st.integers(0, 12), max_size=4))
    def clear(self, rows: list[int]) -> None:
        groups = self.state.drop_rows(PID, rows)
        self.drains.append((groups, None, self.state.generation(PID)))

    @precondition(lambda self: self.drains)
    @rule(data=st.data())
    def unit_clear_arrives(self, data: st.DataObject) -> None:
        self.unit_clear_arrives_now(data.draw(st.integers(0, len(self.drains) - 1)))

    def unit_clear_arrives_now(self, i: int) -> None:
        groups, rel, generation = self.drains.pop(i)
        for unit, rows in groups.items():
            for r in rows:
                if r in self.bytes and self.bytes[r][0] == unit:
                    del self.bytes[r]
        if rel is not None:
            self.state.finish_release(rel)
        else:
            self.state.recycle(PID, generation, [r for rs in groups.values() for r in rs])

    @rule()
    def consume(self) -> None:
        self.state.get_meta(PID, "t", ["x"], 2)

    # ---------------------------------------------------------------- properties
    @invariant()
    def published_rows_have_their_bytes(self) -> None:
        part = self.state._parts[PID]
        for r in np.flatnonzero(part.state[: part.n] == COMMITTED).tolist():
            if part.prod["x"][r]:
                assert r in self.bytes, f"row {r} is published without its bytes"
                assert self.bytes[r][0] == part.unit[r]

    @invariant()
    def rows_in_flight_belong_to_a_lease_or_a_release(self) -> None:
        part = self.state._parts[PID]
        covered = {r for lease in self.state.leases._live.values() for r in lease.rows.tolist()}
        covered |= {r for _, rel, _ in self.drains if rel is not None for r in rel.rows.tolist()}
        inflight = set(np.flatnonzero(part.state[: part.n] == INFLIGHT).tolist())
        assert inflight <= covered, f"rows {sorted(inflight - covered)} are in flight for nobody"

    def teardown(self) -> None:
        # every lease ends by itself and every clear lands: then nothing is in flight and
        # the stream ends
        for rel in self.state.expire(float("inf")):
            self.drains.append((rel.by_unit(), rel, self.state.generation(PID)))
        while self.drains:  # every clear lands, then its rows are given back
            self.unit_clear_arrives_now(0)
        part = self.state._parts[PID]
        assert not (part.state[: part.n] == INFLIGHT).any()
        leaked = [r for r in self.bytes if part.state[r] != COMMITTED]
        assert not leaked, f"bytes of rows {leaked} stay on the units after every clear"
        self.state.seal(PID)
        while True:
            meta = self.state.get_meta(PID, "t", ["x"], 2)
            assert meta is not None, "the stream waits for rows that will never come"
            if not meta.rows:
                break
        assert self.state.check_consumption_status("t", PID)


@pytest.mark.timeout(120)
def test_leases_under_random_interleavings() -> None:
    LeaseMachine.TestCase.settings = settings(
        max_examples=50, stateful_step_count=30, deadline=None, derandomize=True
    )
    LeaseMachine.TestCase().runTest()
