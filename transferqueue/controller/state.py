"""Partition bookkeeping of the controller: pure, synchronous, no I/O.

The controller actor is a thin async shell over one :class:`ControllerState`: it turns each
request into one method call here, and owns one condition per partition to wake waiters.

Per partition (rows are partition-local and dense, ``0..n-1``):

- a row state array (``uint8``): dead (dropped: never reused), pending (a reserved slot),
  in flight (allocated by an insert, not committed yet) or committed;
- production bits per (row, field), consumption bits per (task, row) -- one byte per cell,
  in numpy arrays whose capacity grows geometrically (n single-row appends cost O(n));
- the field registry (:class:`FieldSpec` per field, fixed at first production), one tag dict
  per row (``None`` until set), optional keys mapped to rows, ``expected_size``, ``sealed``;
- per task a low-water mark: every row below it is consumed by the task or dead. Ready rows
  are found by scanning windows that start there and double in size, so ``get_meta`` costs
  O(batch) when ready rows are plentiful, not O(partition).

Rules:

- ``create_partition(pid, expected_size)`` makes rows ``0..expected_size-1`` exist at once as
  pending slots; again with the same size is a no-op, a larger size extends the reservation, a
  smaller one drops pending slots beyond it, a size below the number of produced rows raises
  ``ValueError``. A partition touched first by ``allocate``/``get_meta``/``seal`` is created
  with ``default_expected_size``.
- ``allocate`` (an insert) fills the lowest pending slots first, then appends; the rows are
  in flight until ``commit`` (fields + tags, one step, validated first) or ``release`` (a
  failed write: reserved rows go back to pending, appended rows are dropped).
- ``seal`` drops unfilled slots; inserts then raise ``PartitionSealedError``.
- A partition is *bounded* when sealed, or when it has a reservation and no pending slot is
  left. No more rows can become ready for task T reading fields F when it is bounded and every
  live row T has not consumed is committed with all of F. It is *exhausted* for T when, in
  addition, T has consumed every live row.
- ``get_meta`` returns ``None`` when the caller must wait, an empty :class:`BatchMeta` when
  the stream has ended for the caller, otherwise the sampled batch (marked consumed).
- ``generation(pid)`` changes whenever the partition is cleared or created again (``0``: no
  such partition), so a waiter can tell its partition is gone.

The actor must wake the partition's waiters after every successful ``commit``, ``release``,
``seal``, ``set_tags``, ``create_partition``, ``clear_samples``, ``clear_partition`` and
``reset_consumption``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from transferqueue.controller import admission
from transferqueue.controller.delivery import Delivery
from transferqueue.controller.leases import PutLeases
from transferqueue.controller.partition import (
    COMMITTED,
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
from transferqueue.controller.puts import PutsAndBytes, promoted
from transferqueue.controller.reads import Reads
from transferqueue.controller.samplers import BaseSampler, resolve_sampler
from transferqueue.controller.status_queries import StatusQueries
from transferqueue.errors import (
    ConfigError,
    PartitionNotFoundError,
    PartitionSealedError,
)
from transferqueue.metadata import BatchMeta

__all__ = ["ControllerState", "FieldSpec", "parse_pre_allocate"]


def parse_pre_allocate(value: str | int, name: str = "TQ_PRE_ALLOC_SAMPLE_NUM") -> int:
    """The default reservation from a setting such as ``TQ_PRE_ALLOC_SAMPLE_NUM``.

    ``""`` and ``"0"`` mean no reservation; a negative or non-integer value raises
    :class:`~transferqueue.errors.ConfigError` (a ``ValueError``).
    """
    text = str(value).strip()
    try:
        number = int(text) if text else 0
    except ValueError:
        number = -1
    if number < 0 or isinstance(value, bool):
        raise ConfigError(
            f"{name}={value!r} is not a valid number of pre-allocated samples: set it to your "
            f"global batch size so consumers wait for samples that are not produced yet "
            f"(0 turns pre-allocation off)"
        )
    return number


class ControllerState(PutsAndBytes, StatusQueries, Reads):
    """Every partition of one controller. See the module docstring for the rules."""

    def __init__(
        self,
        *,
        default_expected_size: int = 0,
        sampler: Any = None,
        num_units: int = 1,
        stripe_rows: int = 128,
        capacity_bytes: int | None = None,
        put_lease_s: float = 60.0,
    ) -> None:
        if default_expected_size < 0:
            raise ValueError(f"default_expected_size must be >= 0, got {default_expected_size}")
        self.default_expected_size = default_expected_size
        self.sampler: BaseSampler = resolve_sampler(sampler)
        self._parts: dict[str, Partition] = {}
        self._generations = itertools.count(1)
        self.placement = Placement(num_units, stripe_rows)
        self.capacity = Capacity(capacity_bytes)
        self.put_lease_s = put_lease_s
        self.leases = PutLeases()
        self.delivery = Delivery()
        #: rows too old for a task's max_version_lag, consumed unseen, per (partition, task)
        self.evicted: Counter[tuple[str, str]] = Counter()

    # ------------------------------------------------------------ partitions
    def _get(self, pid: str) -> Partition:
        part = self._parts.get(pid)
        if part is None:
            raise PartitionNotFoundError(
                f"partition {pid!r} does not exist (never created, or cleared)"
            )
        return part

    def _ensure(self, pid: str) -> Partition:
        part = self._parts.get(pid)
        if part is None:
            if not isinstance(pid, str) or not pid:
                raise TypeError(f"partition_id must be a non-empty str, got {pid!r}")
            part = self._parts[pid] = Partition(pid, next(self._generations))
            part.next_unit = self.placement.first_unit(pid)
            part.reserve(self.default_expected_size)
        return part

    def create_partition(
        self,
        pid: str,
        expected_size: int = 0,
        *,
        max_staleness: int | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        """Create ``pid`` (or change its reservation) with ``expected_size`` pending slots;
        with ``max_staleness`` and ``global_batch_size``, under staleness-bounded admission
        (:mod:`.admission`)."""
        if isinstance(expected_size, bool) or not isinstance(expected_size, int):
            raise TypeError(f"expected_size must be an int, got {expected_size!r}")
        if expected_size < 0:
            raise ValueError(f"expected_size must be >= 0, got {expected_size}")
        part = self._parts.get(pid)
        if part is None and (max_staleness is not None or global_batch_size is not None):
            probe = Partition(pid, 0)  # validate before creating anything
            admission.configure(probe, max_staleness, global_batch_size)
        part = self._ensure(pid)
        admission.configure(part, max_staleness, global_batch_size)
        if part.max_staleness is None or expected_size:
            part.reserve(expected_size)

    def has_partition(self, pid: str) -> bool:
        return pid in self._parts

    def list_partitions(self) -> list[str]:
        return list(self._parts)

    def generation(self, pid: str) -> int:
        """Changes whenever ``pid`` is cleared or created again; ``0`` when it does not exist."""
        part = self._parts.get(pid)
        return part.generation if part is not None else 0

    def seal(self, pid: str) -> None:
        """No row will be added to ``pid`` any more; unfilled pending slots are dropped."""
        part = self._ensure(pid)
        if part.sealed:
            return
        part.drop(np.flatnonzero(part.state[: part.n] == PENDING).astype(np.int64))
        part.sealed = True

    def clear_partition(self, pid: str) -> None:
        """Forget ``pid`` entirely (idempotent); a later touch creates it afresh."""
        if self._parts.pop(pid, None) is not None:
            self.sampler.on_clear(pid)

    def clear_samples(self, pid: str, rows: Sequence[int]) -> None:
        """Drop ``rows`` of ``pid`` (idempotent: unknown rows and partitions are ignored)."""
        part = self._parts.get(pid)
        if part is None:
            return
        arr = rows_array(rows)
        part.drop(np.unique(arr[(arr >= 0) & (arr < part.n)]))

    def reset_consumption(self, pid: str, task: str | None = None) -> None:
        """Make rows consumable again for ``task`` (every task when None)."""
        part = self._parts.get(pid)
        if part is None:
            return
        for name in list(part.cons) if task is None else [task]:
            part.task(name)[:] = False
            part.lwm[name] = 0
        self.sampler.on_reset(pid, task)

    # ------------------------------------------------------------ writes
    def _check_keys(self, part: Partition, keys: Sequence[str] | None, n: int) -> list[str]:
        if keys is None:
            return []
        keys = list(keys)
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise TypeError(f"keys must be str, got {bad[:8]!r}")
        if len(keys) != n:
            raise ValueError(f"got {len(keys)} keys for {n} rows; give one key per row")
        dup = sorted(k for k, c in Counter(keys).items() if c > 1) if len(set(keys)) != n else []
        taken = [k for k in keys if k in part.keys]
        if dup or taken:
            raise ValueError(
                f"keys must be new and unique in partition {part.pid!r}: "
                f"repeated {dup[:8]}, already present {taken[:8]}"
            )
        return keys

    def allocate(self, pid: str, n: int, keys: Sequence[str] | None = None) -> list[int]:
        """Rows for an insert of ``n`` samples, in input order: pending slots first, then new
        rows. The rows are in flight until :meth:`commit` or :meth:`release`."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        part = self._ensure(pid)
        if part.sealed:
            raise PartitionSealedError(
                f"partition {pid!r} is sealed: no rows can be added; put into a new partition"
            )
        keys = self._check_keys(part, keys, n)
        rows = part.take_pending(n) if part.n_pending else np.zeros(0, dtype=np.int64)
        if len(rows) < n and part.free:
            rows = np.concatenate([rows, part.take_free(n - len(rows))])
        if len(rows) < n:
            rows = np.concatenate([rows, part.add_rows(n - len(rows), INFLIGHT)])
        out = rows.tolist()
        for k, r in zip(keys, out, strict=False):
            part.keys[k] = r
            part.row_keys[r] = k
        return out

    def upsert_keys(self, pid: str, keys: Sequence[str]) -> tuple[list[int], list[bool]]:
        """Rows for ``keys``: existing keys keep their row, new ones are allocated.
        Returns the rows (in key order) and, per key, whether it was newly allocated."""
        part = self._ensure(pid)
        keys = list(keys)
        lost = [part.keys[k] for k in keys if isinstance(k, str) and k in part.keys]
        lost = [r for r in lost if part.state[r] == LOST]
        if lost:  # a lost row's key starts afresh
            arr = np.array(lost, dtype=np.int64)
            part.unit[arr] = NO_UNIT
            part.drop(arr)
        is_new = [not (isinstance(k, str) and k in part.keys) for k in keys]
        new_rows = iter(
            self.allocate(pid, sum(is_new), [k for k, m in zip(keys, is_new, strict=True) if m])
        )
        rows = [next(new_rows) if m else part.keys[k] for k, m in zip(keys, is_new, strict=True)]
        return rows, is_new

    def release(self, pid: str, rows: Sequence[int] | np.ndarray, slots: Any = None) -> None:
        """A failed write: in-flight rows that were pending slots (``slots``; by default the
        rows inside the reservation) become pending again, others are dropped. Rows not in
        flight (committed, dropped, lost, unknown) are left alone."""
        part = self._parts.get(pid)
        if part is None:
            return
        arr = rows_array(rows)
        arr = np.unique(arr[(arr >= 0) & (arr < part.n)])
        arr = arr[part.state[arr] == INFLIGHT]
        was_slot = arr < part.expected_size if slots is None else np.isin(arr, rows_array(slots))
        if part.sealed:
            was_slot[:] = False
        part.drop(arr[~was_slot])
        part.to_pending(arr[was_slot])

    def commit(
        self,
        pid: str,
        rows: Sequence[int] | np.ndarray,
        fields: Mapping[str, Any],
        tags: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Publish ``fields`` (name -> :class:`FieldSpec`) and ``tags`` of ``rows`` in one
        step. Everything is validated first; on error nothing changes."""
        part = self._get(pid)
        arr = rows_array(rows)
        part.check_rows(arr, "commit")
        self.publish(part, arr, self._check_specs(pid, fields), check_tags(tags, len(arr)))

    def publish(
        self,
        part: Partition,
        arr: np.ndarray,
        specs: Mapping[str, FieldSpec],
        checked: Sequence[Mapping[str, Any] | None] | None,
    ) -> None:
        """The step of :meth:`commit` after its checks: ``arr`` (distinct rows in flight or
        committed), checked ``specs`` and tags (``None``: no tags)."""
        for name, spec in specs.items():
            if name not in part.specs:
                part.specs[name] = spec
                part.prod[name] = np.zeros(part.capacity, dtype=bool)
            else:  # checked: the dtypes promote (torch.promote_types)
                part.specs[name] = promoted(part.specs[name], spec) or spec
            part.prod[name][arr] = True
        part.state[arr] = COMMITTED
        if checked is not None:
            part.merge_tags(arr, list(checked))

    def set_tags(self, pid: str, rows: Sequence[int], tags: Sequence[Mapping[str, Any]]) -> None:
        """Merge ``tags`` (one dict per row) into the tags of ``rows``."""
        part = self._get(pid)
        arr = rows_array(rows)
        part.check_rows(arr, "tag")
        part.merge_tags(arr, check_tags(tags, len(arr)))

    # ------------------------------------------------------------ consumer leases
    def ack(self, pid: str, lease: int, rows: Sequence[int] | None = None) -> dict[str, Any]:
        """Rows of a consumer lease are consumed (see :meth:`Delivery.ack`)."""
        return self.delivery.ack(self._parts.get(pid), lease, rows)

    def nack(self, pid: str, lease: int) -> int:
        """Give a consumer lease's rows back at once; returns how many."""
        return self.delivery.nack(self._parts.get(pid), lease)

    def expire_consumers(self, now: float) -> list[str]:
        """Give back the rows of every consumer lease whose deadline passed; returns the
        partitions that got rows back."""
        out = []
        for lease in self.delivery.expired(now):
            if self.delivery.give_back(self._parts.get(lease.pid), lease, "expired"):
                out.append(lease.pid)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of any lease, put or consumer."""
        found = [d for d in (self.leases.next_deadline(), self.delivery.leases.next_deadline())]
        return min((d for d in found if d is not None), default=None)

    # ------------------------------------------------------------ admission
    def reserve(
        self, pid: str, n: int, version: int | None = None, partial: bool = False
    ) -> BatchMeta | None:
        """Reserve ``n`` slots of a partition under staleness-bounded admission; ``None``
        when they do not fit now (the caller waits for :meth:`advance_version`). With
        ``partial``, reserve what fits now (possibly nothing)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        part = self._get(pid)
        if part.max_staleness is None:
            raise ValueError(
                f"partition {pid!r} has no staleness bound: create it with max_staleness and "
                f"global_batch_size to reserve"
            )
        if part.sealed:
            raise PartitionSealedError(f"partition {pid!r} is sealed: nothing can be reserved")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise TypeError(f"version must be an int, got {version!r}")
        room = admission.room(part) or 0
        if n > room and not partial:
            return None
        take = min(n, room)
        rows = admission.reserve(part, take, part.version if version is None else version)
        return self.meta_of(pid, rows, [], check=False)

    def admitted(self, pid: str) -> int:
        """Samples admitted and not given back (0 for an unknown partition)."""
        part = self._parts.get(pid)
        return 0 if part is None else part.admitted

    def advance_version(self, pid: str) -> int:
        return admission.advance(self._get(pid))

    def check_rows(self, pid: str, rows: Sequence[int]) -> None:
        """``rows`` must be distinct rows of ``pid`` in flight or committed (an update put).
        Raises ``PartitionNotFoundError`` or ``ValueError``."""
        self._get(pid).check_rows(rows_array(rows), "write")

    def meta_of(
        self,
        pid: str,
        rows: Sequence[int] | np.ndarray,
        fields: Sequence[str],
        check: bool = True,
    ) -> BatchMeta:
        """A :class:`BatchMeta` of ``rows`` (in that order) with their current tags
        (``check``: they must be rows in flight or committed)."""
        part = self._get(pid)
        arr = rows_array(rows)
        if check:
            part.check_rows(arr, "describe")
        rows_list = arr.tolist()
        return BatchMeta(
            pid, rows_list, list(fields), [part.tags[r] or {} for r in rows_list],
            part.unit[arr].tolist(),
        )  # fmt: skip

    def common_fields(self, pid: str, rows: Sequence[int]) -> list[str]:
        """The fields (in registration order) that every one of ``rows`` has."""
        part = self._get(pid)
        arr = rows_array(rows)
        part.check_rows(arr, "read")
        return [f for f, col in part.prod.items() if bool(col[arr].all())]
