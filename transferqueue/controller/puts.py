"""Puts under a lease and the bytes on the units: the part of :class:`ControllerState`
that admits, publishes and releases puts, and follows rows' bytes onto the units (pure; no
I/O). See :mod:`.leases` for the life of a put lease and :mod:`.placement` for where rows go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferqueue.controller.leases import PutLease, PutLeases, Release
from transferqueue.controller.partition import (
    COMMITTED,
    DEAD,
    INFLIGHT,
    LOST,
    NO_UNIT,
    PENDING,
    FieldSpec,
    Partition,
    check_tags,
    rows_array,
)
from transferqueue.controller.placement import Capacity, Placement
from transferqueue.errors import (
    PartitionNotFoundError,
    PartitionSealedError,
    PutLeaseExpiredError,
    RowsBusyError,
    RowsLostError,
    SchemaError,
)
from transferqueue.metadata import BatchMeta

__all__ = ["PutsAndBytes", "promoted"]


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise SchemaError(f"unknown tensor dtype {name!r}")
    return dtype


def promoted(old: FieldSpec, new: FieldSpec) -> FieldSpec | None:
    """What a field holding ``old`` holds after a put of ``new``: the same per-row rank,
    dtype ``torch.promote_types(old, new)`` (float32 then int64: float32; int64 then
    float32: float32; float32 then float64: float64). ``None`` when they cannot mix: another
    per-row rank, or tensors and non-tensor values."""
    if old.ndim != new.ndim:
        return None
    if old.dtype == new.dtype:
        return old
    if "object" in (old.dtype, new.dtype):
        return None
    dtype = torch.promote_types(_torch_dtype(old.dtype), _torch_dtype(new.dtype))
    return FieldSpec(str(dtype), old.ndim)


class PutsAndBytes:
    """Mixed into :class:`~transferqueue.controller.state.ControllerState`."""

    if TYPE_CHECKING:
        _parts: dict[str, Partition]
        placement: Placement
        capacity: Capacity
        leases: PutLeases
        put_lease_s: float

        def _get(self, pid: str) -> Partition: ...
        def _ensure(self, pid: str) -> Partition: ...
        def allocate(self, pid: str, n: int, keys: Sequence[str] | None = None) -> list[int]: ...
        def upsert_keys(self, pid: str, keys: Sequence[str]) -> tuple[list[int], list[bool]]: ...
        def release(self, pid: str, rows: Any, slots: Any = None) -> None: ...
        def publish(
            self, part: Partition, arr: np.ndarray, specs: Mapping[str, FieldSpec], tags: Any
        ) -> None: ...
        def meta_of(
            self, pid: str, rows: Any, fields: Sequence[str], check: bool = True
        ) -> BatchMeta: ...
        def common_fields(self, pid: str, rows: Sequence[int]) -> list[str]: ...

    # ------------------------------------------------------------ puts under a lease
    def begin_put(
        self,
        pid: str,
        specs: Mapping[str, Any],
        *,
        now: float,
        n: int = 0,
        rows: Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
        tags: Sequence[Mapping[str, Any] | None] | None = None,
        nbytes: int = 0,
        client: str = "",
        node: str | None = None,
    ) -> PutLease:
        """Validate a put up front (specs, tags, keys, capacity) and give it rows under a
        lease that ends at ``now + put_lease_s``: ``rows`` (existing rows), ``keys`` (their
        rows, new keys allocated) or ``n`` new rows. Raises before anything changes."""
        checked = self._check_specs(pid, specs)
        count = len(rows) if rows is not None else len(keys) if keys is not None else n
        checked_tags = check_tags(tags, count) if tags is not None else None
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        self.capacity.check(nbytes)
        if rows is not None:
            part = self._get(pid)
            got = rows_array(rows)
            reserved = self._reserved(part, got)
            self._check_not_busy(part, got[~reserved])
            try:
                part.check_rows(got[~reserved], "write")
            except ValueError:
                if part.sealed:  # a reservation's slots are dropped by the seal
                    raise PartitionSealedError(
                        f"partition {pid!r} was sealed: its unfilled slots (reserved ones "
                        f"included) were dropped, so these rows cannot be written"
                    ) from None
                raise
            if reserved.any() and len(np.unique(got)) != len(got):
                raise ValueError(f"cannot write: rows repeat in {got.tolist()[:16]}")
            fresh = slots = got[reserved]  # a put into its reservation fills those slots
            part.state[slots] = INFLIGHT
            part.n_pending -= len(slots)
        else:
            part = self._ensure(pid)
            pending_left = part.n_pending  # rows come from pending slots first
            if keys is not None:
                known = [part.keys[k] for k in keys if isinstance(k, str) and k in part.keys]
                self._check_not_busy(part, np.array(known, dtype=np.int64))
                got_list, is_new = self.upsert_keys(pid, keys)
                got = np.array(got_list, dtype=np.int64)
                fresh = got[np.array(is_new, dtype=bool)] if len(got) else got
            else:
                got = fresh = np.array(self.allocate(pid, n), dtype=np.int64)
            slots = fresh[: pending_left - part.n_pending]  # the first ones allocated
        if len(fresh):
            units, part.next_unit = self.placement.assign(part.next_unit, len(fresh), node)
            part.unit[fresh] = units
        lease = PutLease(
            lease=self.leases.new_id(),
            pid=pid,
            generation=part.generation,
            rows=got,
            fresh=fresh,
            slots=slots,
            units=part.unit[got].astype(np.int64),
            specs=checked,
            tags=checked_tags,
            nbytes=nbytes,
            deadline=now + self.put_lease_s,
            client=client,
        )
        self.capacity.reserve(nbytes)
        self.leases.add(lease)
        return lease

    @staticmethod
    def _check_not_busy(part: Partition, rows: np.ndarray) -> None:
        """Rows another put is still writing (or whose failed put is being released) may
        not be written: that put's release would clear these bytes too."""
        rows = rows[(rows >= 0) & (rows < part.n)] if len(rows) else rows
        busy = rows[part.state[rows] == INFLIGHT] if len(rows) else rows
        if len(busy):
            keys = [part.row_keys[r] for r in busy.tolist() if r in part.row_keys]
            raise RowsBusyError(
                f"rows {busy.tolist()[:16]} (keys {keys[:8]}) of partition {part.pid!r} are "
                f"being written by another put, which has not committed yet: retry once it "
                f"committed, or once its lease ended (controller.put_lease_s)"
            )

    @staticmethod
    def _reserved(part: Partition, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` are reserved slots (``reserve``) waiting for their put."""
        if not len(rows) or rows.min() < 0 or rows.max() >= part.n:
            return np.zeros(len(rows), dtype=bool)
        return (part.state[rows] == PENDING) & (part.row_version[rows] >= 0)

    def _check_specs(self, pid: str, specs: Mapping[str, Any]) -> dict[str, FieldSpec]:
        """Field specs of a put, checked against what the partition holds."""
        if not isinstance(specs, Mapping):
            raise TypeError(f"field specs must be a dict of name -> spec, got {specs!r}")
        part = self._parts.get(pid)
        out = {}
        for name, raw in specs.items():
            if not isinstance(name, str):
                raise TypeError(f"field names must be str, got {name!r}")
            spec = out[name] = FieldSpec.from_plain(raw)
            old = part.specs.get(name) if part is not None else None
            if old is not None and promoted(old, spec) is None:
                raise SchemaError(
                    f"field {name!r} of partition {pid!r} holds dtype {old.dtype} with per-row "
                    f"rank {old.ndim}; this put has dtype {spec.dtype} with rank {spec.ndim} "
                    "(dtypes of tensors promote; ranks, and tensors vs values, cannot mix)"
                )
        return out

    def target_dtypes(self, pid: str, specs: Mapping[str, FieldSpec]) -> dict[str, str]:
        """The dtype each of ``specs``' fields holds once they are committed (checked
        specs): the fields whose dtype that changes (a put of int64 into a float32 field is
        written as float32), as ``{field: dtype}``."""
        part = self._parts.get(pid)
        if part is None:
            return {}
        out = {}
        for name, spec in specs.items():
            old = part.specs.get(name)
            now = promoted(old, spec) if old is not None else spec
            if now is not None and now.dtype != spec.dtype:
                out[name] = now.dtype
        return out

    def widened(self, lease_id: int) -> dict[str, str]:
        """The fields whose dtype the commit of ``lease_id`` widens, as ``{field: dtype}``:
        the units convert the rows they hold before the commit publishes it."""
        lease = self._live_lease(lease_id)
        part = self._parts.get(lease.pid)
        if part is None:
            return {}
        out = {}
        for name, spec in lease.specs.items():
            old = part.specs.get(name)
            now = promoted(old, spec) if old is not None else None
            if old is not None and now is not None and now.dtype != old.dtype:
                out[name] = now.dtype
        return out

    def _live_lease(self, lease_id: int) -> PutLease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise PutLeaseExpiredError(
                f"put lease {lease_id} has ended (it expired after controller.put_lease_s = "
                f"{self.put_lease_s} s, or was aborted): its rows were released; put again"
            )
        return lease

    def commit_put(self, lease_id: int, net_bytes: int = 0) -> BatchMeta:
        """Publish the rows of a live lease: fields and tags become visible in one step.
        On error nothing is published and the lease stays (the caller releases it)."""
        lease = self._live_lease(lease_id)
        part = self._parts.get(lease.pid)
        if part is None or part.generation != lease.generation:
            raise PartitionNotFoundError(
                f"partition {lease.pid!r} was cleared while the put was writing"
            )
        st = part.state[lease.rows]
        if (st == LOST).any():
            lost = lease.rows[st == LOST].tolist()
            raise RowsLostError(
                f"rows {lost[:16]} of partition {lease.pid!r} were lost while the put was "
                f"writing (their storage unit died); put them again"
            )
        gone = lease.rows[st < INFLIGHT]
        if len(gone):
            raise ValueError(
                f"rows {gone.tolist()[:16]} of partition {lease.pid!r} were cleared while the "
                f"put was writing them: nothing was published"
            )
        # rows and tags were checked at begin_put and the rows' states just now; the specs
        # are checked again (a concurrent first put of a field may have fixed its rank)
        self.publish(part, lease.rows, self._check_specs(lease.pid, lease.specs), lease.tags)
        self.leases.pop(lease_id)
        self.capacity.settle(lease.nbytes, net_bytes)
        fields = list(lease.specs)
        if len(lease.rows) and all(r in part.row_keys for r in lease.rows.tolist()):
            # a put by key returns the keys' metadata, as upstream's kv_put: every field
            # all of them have, not only the ones this put wrote
            fields = self.common_fields(lease.pid, lease.rows.tolist())
        return self.meta_of(lease.pid, lease.rows, fields, check=False)

    def end_lease(self, lease_id: int, reason: str = "aborted") -> Release | None:
        """End a live lease without publishing; ``None`` if it already ended (a commit
        whose reply was lost stays committed). Its fresh rows stay in flight until
        :meth:`finish_release`, after their bytes are cleared from the units."""
        lease = self.leases.pop(lease_id)
        return None if lease is None else self._release_of(lease, reason)

    def _release_of(self, lease: PutLease, reason: str) -> Release:
        self.capacity.settle(lease.nbytes, 0)
        fresh = np.isin(lease.rows, lease.fresh)
        rows, units = lease.rows[fresh], lease.units[fresh]
        part = self._parts.get(lease.pid)
        if part is not None and part.generation == lease.generation and len(lease.rows):
            mine = part.state[rows] == INFLIGHT  # not cleared or lost meanwhile
            rows, units = rows[mine], units[mine]
            for r in rows.tolist():  # a retry of these keys gets fresh rows at once
                key = part.row_keys.pop(r, None)
                if key is not None:
                    del part.keys[key]
            # rows cleared while this put wrote them: its bytes may have landed after the
            # clear, so they are cleared again (they were kept from reuse until now)
            st, held = part.state[lease.rows], part.unit[lease.rows] >= 0
            stale = (st == DEAD) & held
            rows = np.concatenate([rows, lease.rows[stale]])
            units = np.concatenate([units, lease.units[stale]])
        elif part is not None:  # cleared and created again: these row ids may be reused
            rows, units = rows[:0], units[:0]
        return Release(lease.pid, lease.generation, rows, units, lease.slots, reason)

    def expire(self, now: float) -> list[Release]:
        """End every lease whose deadline passed."""
        return [self._release_of(lease, "expired") for lease in self.leases.expired(now)]

    def finish_release(self, rel: Release) -> list[int]:
        """The bytes of ``rel`` are gone: slots go back to pending, other rows are dropped
        (reusable). Returns the rows released."""
        part = self._parts.get(rel.pid)
        if part is None or part.generation != rel.generation or not len(rel.rows):
            return []
        st = part.state[rel.rows]
        rows = rel.rows[st == INFLIGHT]
        part.unit[rows] = NO_UNIT
        self.release(rel.pid, rows, rel.slots)
        self._recycle_free(part, rel.rows[st == DEAD])  # cleared meanwhile: reusable now
        return rows.tolist()

    # ------------------------------------------------------------ bytes on units
    def drop_rows(self, pid: str, rows: Sequence[int]) -> dict[int, list[int]]:
        """Drop ``rows`` (as :meth:`clear_samples`); returns ``{unit: rows}`` whose bytes
        must be cleared before the rows are :meth:`recycle`-d."""
        part = self._parts.get(pid)
        if part is None:
            return {}
        arr = rows_array(rows)
        arr = np.unique(arr[(arr >= 0) & (arr < part.n)])
        lost = arr[part.state[arr] == LOST]
        part.unit[lost] = NO_UNIT  # their bytes died with their unit
        part.drop(arr)
        held = arr[(part.state[arr] == DEAD) & (part.unit[arr] >= 0)]
        out: dict[int, list[int]] = {}
        for r, u in zip(held.tolist(), part.unit[held].tolist()):
            out.setdefault(int(u), []).append(r)
        return out

    def recycle(self, pid: str, generation: int, rows: Sequence[int]) -> None:
        """The bytes of dropped ``rows`` are gone from the units: the rows may be reused --
        except rows a live put is still writing (its bytes may land after the clear): they
        are cleared again and reused when that put's lease ends."""
        part = self._parts.get(pid)
        if part is not None and part.generation == generation:
            self._recycle_free(part, rows_array(rows))

    def _recycle_free(self, part: Partition, rows: np.ndarray) -> None:
        if not len(rows):
            return
        writing = {
            r
            for lease in self.leases.values()
            if lease.pid == part.pid
            for r in lease.rows.tolist()
        }
        if writing:
            rows = rows[~np.isin(rows, list(writing))]
        part.recycle(rows)

    def mark_unit_dead(self, unit: int) -> dict[str, int]:
        """Storage unit ``unit`` died: rows whose bytes lived there are lost (counted in
        ``partition_info``, no longer ready, not waited for); it gets no new rows.
        Returns the rows lost per partition."""
        if unit in self.placement.dead or not 0 <= unit < self.placement.num_units:
            return {}
        self.placement.dead.add(unit)
        out = {}
        for part in self._parts.values():
            on_unit = part.unit[: part.n] == unit
            st = part.state[: part.n]
            lost = np.flatnonzero(on_unit & ((st == INFLIGHT) | (st == COMMITTED)))
            gone = np.flatnonzero(on_unit & (st == DEAD))
            part.unit[gone] = NO_UNIT
            part.recycle(gone)
            if len(lost):
                part.state[lost] = LOST
                for bits in (*part.prod.values(), *part.cons.values()):
                    bits[lost] = False  # counts are of live rows
                out[part.pid] = len(lost)
        return out

    def locate(self, pid: str, rows: Sequence[int]) -> list[int]:
        """The unit holding each of ``rows`` (for a BatchMeta built without placement).
        Raises :class:`RowsLostError` for lost rows, ``ValueError`` for rows without bytes."""
        part = self._get(pid)
        arr = rows_array(rows)
        if len(arr) and (arr.min() < 0 or arr.max() >= part.n):
            raise ValueError(f"rows {arr.tolist()[:16]} are not rows of partition {pid!r}")
        st = part.state[arr]
        if (st == LOST).any():
            raise self.lost_error(pid, arr[st == LOST].tolist())
        units = part.unit[arr]
        if (units < 0).any():
            bad = arr[units < 0].tolist()
            raise ValueError(
                f"rows {bad[:16]} of partition {pid!r} hold no data (pending, dropped or unknown)"
            )
        return units.astype(np.int64).tolist()

    @staticmethod
    def lost_error(pid: str, rows: Sequence[int]) -> RowsLostError:
        return RowsLostError(
            f"rows {list(rows)[:32]} of partition {pid!r} are lost: the storage unit that held "
            f"their bytes died; clear them and put them again",
            pid,
            list(rows),
        )
