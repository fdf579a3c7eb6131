"""The controller's state as plain data, and back (pure; no asyncio, no I/O).

:func:`take` turns every partition of a :class:`ControllerState` into a plain dict (numbers,
str, lists, dicts and torch tensors: codec payloads) at one instant: committed rows with
their fields, tags and keys, pending slots, consumption per task, policy versions and
admission. What is not committed is left out:

* a row a put is writing (in flight) is saved as what it becomes if that put fails: a
  pending slot again if it was one (a reserved slot keeps its version), else dead;
* rows handed out under a consumer lease and not acked are saved unconsumed, first in their
  task's queue: after a restore they are handed out again (at-least-once);
* placement (which unit holds a row), put and consumer leases, and sampler bookkeeping
  (rounds being formed) are not saved: a restore places rows afresh on the units it has.

:func:`build` makes :class:`Partition` objects from that plain data, placing every committed
row on the live units (a restore may have another number of units); :func:`install` puts
them into the state in one step. :func:`check` validates plain data read from a file and
raises :class:`CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from transferqueue.controller.leases import PutLease, Release
from transferqueue.controller.partition import (
    COMMITTED,
    DEAD,
    FREE,
    INFLIGHT,
    LOST,
    NO_UNIT,
    PENDING,
    FieldSpec,
    Partition,
    live_mask,
)
from transferqueue.errors import CheckpointError

__all__ = ["build", "check", "has_rows", "held_rows", "install", "take", "updates_in_flight"]

_STATES = (DEAD, PENDING, COMMITTED, LOST)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def updates_in_flight(state: Any) -> list[str]:
    """Partitions with a live put that writes rows already committed (an update put): its
    bytes may be landing, so a snapshot waits for it to end."""
    out = []
    for lease in state.leases.values():
        part = state._parts.get(lease.pid)
        if part is None or part.generation != lease.generation:
            continue
        rows = lease.rows[(lease.rows >= 0) & (lease.rows < part.n)]
        if lease.specs and bool((part.state[rows] == COMMITTED).any()):
            out.append(lease.pid)
    return out


def _slots(part: Partition, ended: Iterable[PutLease | Release]) -> np.ndarray:
    """In-flight rows that go back to pending if their put fails."""
    mine = [x.slots for x in ended if x.pid == part.pid and x.generation == part.generation]
    return np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)


def _partition(state: Any, part: Partition, ended: list[Any]) -> dict[str, Any]:
    n = part.n
    st = part.state[:n].copy()
    rows = np.arange(n)
    inflight = st == INFLIGHT
    back = inflight & np.isin(rows, _slots(part, ended)) & (not part.sealed)
    gone = inflight & ~back
    st[back], st[gone] = PENDING, DEAD
    version = part.row_version[:n].copy()
    version[gone] = -1
    tags = [t.copy() if t else None for t in part.tags[:n]]  # later merges do not leak in
    for r in np.flatnonzero(gone | back).tolist():
        tags[r] = {"version": int(version[r])} if back[r] and version[r] >= 0 else None
    committed = st == COMMITTED
    live = live_mask(st)
    fields = {
        name: {**part.specs[name].to_plain(), "rows": _tensor(part.prod[name][:n] & committed)}
        for name in part.prod
    }
    tasks = {}
    for task, cons in part.cons.items():
        leased = part.leased[task][:n] & committed
        consumed = cons[:n] & live & ~leased
        again = np.flatnonzero(leased).tolist()
        again += [
            r for r in part.requeued.get(task, []) if r < n and committed[r] and r not in again
        ]
        tasks[task] = {"consumed": _tensor(consumed), "requeued": again}
    keys = {k: int(r) for k, r in part.keys.items() if r < n and st[r] != DEAD and not back[r]}
    counters = {
        "evicted": {t: c for (p, t), c in state.evicted.items() if p == part.pid},
        "redelivered": {t: c for (p, t), c in state.delivery.redelivered.items() if p == part.pid},
    }
    return {
        "pid": part.pid,
        "n": n,
        "expected_size": part.expected_size,
        "sealed": part.sealed,
        "max_staleness": part.max_staleness,
        "global_batch_size": part.global_batch_size,
        "version": part.version,
        "admitted": part.admitted,
        "unadmitted": sorted(r for r in part.unadmitted if r < n and st[r] != DEAD),
        "state": _tensor(st),
        "row_version": _tensor(version),
        "fields": fields,
        "tasks": tasks,
        "tags": tags,
        "keys": keys,
        **counters,
    }


def take(state: Any, releases: Iterable[Release] = ()) -> list[dict[str, Any]]:
    """Every partition of ``state`` as plain data, at this instant (see the module
    docstring). ``releases``: put leases that ended and whose rows are still being released
    (their slots go back to pending)."""
    ended = [*state.leases.values(), *releases]
    return [_partition(state, part, ended) for part in state._parts.values()]


def has_rows(state: Any, pid: str) -> bool:
    """Whether partition ``pid`` exists with at least one row (of any state)."""
    part = state._parts.get(pid)
    return part is not None and part.n > 0


def held_rows(plain: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per partition, which rows the snapshot holds bytes of (committed rows)."""
    return {p["pid"]: p["state"].numpy() == COMMITTED for p in plain}


# ------------------------------------------------------------------------- validation
def _fail(pid: Any, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint state of partition {pid!r} is corrupt: {what}")


def _bits(pid: str, name: str, value: Any, n: int, dtype: torch.dtype) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.shape != (n,):
        raise _fail(pid, f"{name} must be a {dtype} tensor of {n} rows")


def check(plain: Any) -> list[dict[str, Any]]:
    """``plain`` (read from a file) as a list of partition dicts; :class:`CheckpointError`
    naming the first thing that is wrong."""
    if not isinstance(plain, list):
        raise CheckpointError("checkpoint state is corrupt: the partitions are not a list")
    seen: set[str] = set()
    for p in plain:
        if not isinstance(p, dict) or not isinstance(p.get("pid"), str) or not p["pid"]:
            raise CheckpointError("checkpoint state is corrupt: a partition has no id")
        pid = p["pid"]
        if pid in seen:
            raise _fail(pid, "it appears twice")
        seen.add(pid)
        n = p.get("n")
        if not isinstance(n, int) or n < 0:
            raise _fail(pid, f"row count {n!r}")
        _bits(pid, "state", p.get("state"), n, torch.uint8)
        _bits(pid, "row_version", p.get("row_version"), n, torch.int32)
        bad = ~torch.isin(p["state"], torch.tensor(_STATES, dtype=torch.uint8))
        if bool(bad.any()):
            raise _fail(pid, f"unknown row states {p['state'][bad].unique().tolist()}")
        for key in ("fields", "tasks", "keys", "evicted", "redelivered"):
            if not isinstance(p.get(key), dict):
                raise _fail(pid, f"{key} is not a dict")
        for name, f in p["fields"].items():
            if not isinstance(f, dict) or not isinstance(f.get("dtype"), str):
                raise _fail(pid, f"field {name!r} has no dtype")
            _bits(pid, f"field {name!r}", f.get("rows"), n, torch.bool)
        for task, t in p["tasks"].items():
            if not isinstance(t, dict) or not isinstance(t.get("requeued"), list):
                raise _fail(pid, f"task {task!r} has no queue")
            _bits(pid, f"task {task!r}", t.get("consumed"), n, torch.bool)
        if not isinstance(p.get("tags"), list) or len(p["tags"]) != n:
            raise _fail(pid, f"tags must be a list of {n} entries")
        if any(not isinstance(r, int) or not 0 <= r < n for r in p["keys"].values()):
            raise _fail(pid, "a key names a row that does not exist")
        for key in ("expected_size", "global_batch_size", "version", "admitted"):
            if not isinstance(p.get(key), int):
                raise _fail(pid, f"{key} is not an int")
    return plain


# ---------------------------------------------------------------------------- restore
def build(
    plain: list[dict[str, Any]], placement: Any, generations: Iterable[int]
) -> dict[str, Partition]:
    """Partitions from checked plain data, committed rows placed on ``placement``'s live
    units (not installed: see :func:`install`)."""
    out = {}
    for p, generation in zip(plain, generations):
        out[p["pid"]] = _build(p, placement, generation)
    return out


def _build(p: Mapping[str, Any], placement: Any, generation: int) -> Partition:
    pid, n = p["pid"], p["n"]
    part = Partition(pid, generation)
    part.add_rows(n, DEAD)
    st = p["state"].numpy()
    part.state[:n] = st
    part.row_version[:n] = p["row_version"].numpy()
    part.expected_size, part.sealed = p["expected_size"], bool(p["sealed"])
    part.max_staleness, part.global_batch_size = p["max_staleness"], p["global_batch_size"]
    part.version, part.admitted = p["version"], p["admitted"]
    part.unadmitted = set(p.get("unadmitted", []))
    part.tags = [dict(t) if t else None for t in p["tags"]]
    pending = np.flatnonzero(st == PENDING)
    part.n_pending = len(pending)
    part.pending_lo = int(pending[0]) if len(pending) else n
    for name, f in p["fields"].items():
        part.specs[name] = FieldSpec.from_plain(f)
        part.prod[name] = np.zeros(part.capacity, dtype=bool)
        part.prod[name][:n] = f["rows"].numpy()
    for task, t in p["tasks"].items():
        part.task(task)[:n] = t["consumed"].numpy()
        part.requeued[task] = [r for r in t["requeued"] if 0 <= r < n and st[r] == COMMITTED]
        part.lwm[task] = part.first_unconsumed(task)
    part.keys = dict(p["keys"])
    part.row_keys = {r: k for k, r in part.keys.items()}
    dead = np.flatnonzero(st == DEAD)
    part.unit[dead] = FREE
    part.free = dead.tolist()
    heapq.heapify(part.free)
    held = np.flatnonzero(st == COMMITTED)
    part.unit[np.flatnonzero(st == LOST)] = NO_UNIT
    if len(held):
        units, part.next_unit = placement.assign(placement.first_unit(pid), len(held))
        part.unit[held] = units
    else:
        part.next_unit = placement.first_unit(pid)
    return part


def install(state: Any, parts: Mapping[str, Partition], plain: list[dict[str, Any]]) -> None:
    """Put built partitions (and their counters) into ``state`` in one step. A partition of
    the same id that holds no row (created by a consumer that waits for it) is replaced
    and keeps its generation, so its waiters see the restored rows."""
    for pid, part in parts.items():
        old = state._parts.get(pid)
        if old is not None:
            part.generation = old.generation
        state._parts[pid] = part
        state.sampler.on_clear(pid)
    for p in plain:
        for task, count in p["evicted"].items():
            state.evicted[(p["pid"], task)] = int(count)
        for task, count in p["redelivered"].items():
            state.delivery.redelivered[(p["pid"], task)] = int(count)
