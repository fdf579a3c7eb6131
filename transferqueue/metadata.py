"""Columnar handles on samples: :class:`BatchMeta` and :class:`PartitionInfo`.

A :class:`BatchMeta` names a batch of samples of one partition: the partition, the rows in
batch order, the fields of interest and one tag dict per row. It carries no data; the
client turns it into a ``TensorDict`` with ``get_data``. Both classes are plain dataclasses:
they pickle as they are, and ``to_plain`` / ``from_plain`` turn them into (and back from)
the plain values the wire codec carries (str, int, list, dict).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchMeta", "PartitionInfo"]


def _check_str_list(name: str, values: Iterable[Any]) -> list[str]:
    out = list(values)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{name} must be strings, got {type(v).__name__}: {v!r}")
    return out


def _check_row_list(values: Iterable[Any]) -> list[int]:
    out = list(values)
    if all(type(v) is int for v in out):
        return out
    for v in out:  # numpy / torch integer scalars are normalised to int
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"rows must be integers, got {type(v).__name__}: {v!r}")
    return [operator.index(v) for v in out]


def _copy_tags(tags: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for t in tags:
        if type(t) is not dict and not isinstance(t, Mapping):
            raise TypeError(f"each row's tags must be a dict, got {type(t).__name__}")
        out.append(dict(t))
    return out


def _alias(name: str, value: Any, upstream: str, upstream_value: Any) -> Any:
    """One of two keywords that name the same thing (ours, or the public project's)."""
    if upstream_value is None:
        return value
    if value is not None:
        raise TypeError(f"BatchMeta got both {name}= and {upstream}= (they are the same thing)")
    return upstream_value


def _common_lease(metas: Sequence[Any]) -> dict[str, Any]:
    """The lease of batches joined together, when they share one (else none)."""
    leases = {(m.task_name, m.lease) for m in metas if m.rows}
    if len(leases) == 1:
        task, lease = leases.pop()
        return {"task_name": task, "lease": lease}
    return {}


@dataclass(init=False)
class BatchMeta:
    """A batch of samples of one partition: rows (in batch order), fields and per-row tags.

    ``tags`` may be left out (one empty dict per row is used); when given it must hold one
    dict per row. ``units`` is where each row's bytes live, as the controller placed them
    (filled in by the metas the client returns; left empty, ``get_data`` asks the
    controller). ``len(meta)`` is the number of rows.
    """

    partition_id: str
    rows: list[int] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    #: with a consumer lease (``get_meta(lease_s=...)``): its task and id, for ack / nack
    task_name: str = ""
    lease: int = 0

    def __init__(
        self,
        partition_id: str | None = None,
        rows: Iterable[int] | None = None,
        fields: Iterable[str] | None = None,
        tags: Iterable[Mapping[str, Any]] | None = None,
        units: Iterable[int] | None = None,
        task_name: str = "",
        lease: int = 0,
        *,
        global_indexes: Iterable[int] | None = None,
        partition_ids: Iterable[str] | None = None,
        field_names: Iterable[str] | None = None,
        field_schema: Mapping[str, Any] | None = None,
        custom_meta: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        # the public TransferQueue's keywords name the same things: global_indexes (rows),
        # partition_ids (one per row: all the same here), field_names / field_schema's
        # keys (fields), custom_meta (tags)
        rows = _alias("rows", rows, "global_indexes", global_indexes)
        fields = _alias("fields", fields, "field_names", field_names)
        if field_schema is not None:
            fields = _alias("fields", fields, "field_schema", list(field_schema))
        tags = _alias("tags", tags, "custom_meta", custom_meta)
        if partition_ids is not None:
            pids = set(partition_ids)
            if len(pids) > 1 or (partition_id is not None and pids - {partition_id}):
                raise ValueError(
                    f"a BatchMeta holds rows of one partition; got partition_ids {sorted(pids)}"
                    + (f" and partition_id {partition_id!r}" if partition_id is not None else "")
                )
            if partition_id is None:
                partition_id = pids.pop() if pids else ""
        if partition_id is None:
            raise TypeError("BatchMeta needs a partition_id (or partition_ids)")
        self.partition_id = partition_id
        self.rows = list(rows) if rows is not None else []
        self.fields = list(fields) if fields is not None else []
        self.tags = list(tags) if tags is not None else []  # type: ignore[arg-type]
        self.units = list(units) if units is not None else []
        self.task_name = task_name
        self.lease = lease
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.partition_id, str):
            raise TypeError(f"partition_id must be a str, got {type(self.partition_id).__name__}")
        self.rows = _check_row_list(self.rows)
        self.fields = _check_str_list("fields", self.fields)
        self.tags = _copy_tags(self.tags) if self.tags else [{} for _ in self.rows]
        if len(self.tags) != len(self.rows):
            raise ValueError(
                f"BatchMeta needs one tag dict per row: {len(self.rows)} rows, "
                f"{len(self.tags)} tags"
            )
        self.units = _check_row_list(self.units) if self.units else []
        if self.units and len(self.units) != len(self.rows):
            raise ValueError(
                f"BatchMeta units name one unit per row: {len(self.rows)} rows, "
                f"{len(self.units)} units"
            )

    # ----------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def size(self) -> int:
        """Number of rows (same as ``len(meta)``)."""
        return len(self.rows)

    @property
    def is_empty(self) -> bool:
        """True when the batch holds no rows (an exhausted stream returns such a meta)."""
        return not self.rows

    @classmethod
    def empty(cls, partition_id: str = "", fields: Sequence[str] = ()) -> BatchMeta:
        """An empty batch of ``partition_id`` (of none, as the public TransferQueue's
        ``BatchMeta.empty()``, when left out)."""
        return cls(partition_id=partition_id, rows=[], fields=list(fields), tags=[])

    def _take(self, start: int, stop: int) -> BatchMeta:
        return BatchMeta(
            partition_id=self.partition_id,
            rows=self.rows[start:stop],
            fields=list(self.fields),
            tags=self.tags[start:stop],
            units=self.units[start:stop],
            task_name=self.task_name,
            lease=self.lease,
        )

    # ------------------------------------------------------- split and join
    def chunk(self, chunks: int) -> list[BatchMeta]:
        """Split into exactly ``chunks`` consecutive parts of nearly equal size.

        The first ``len(self) % chunks`` parts get one row more; when ``chunks`` exceeds the
        number of rows the trailing parts are empty (as in the public TransferQueue).
        """
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks <= 0:
            raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
        base, extra = divmod(len(self.rows), chunks)
        return self.split([base + (1 if i < extra else 0) for i in range(chunks)])

    def split(self, sizes: Sequence[int]) -> list[BatchMeta]:
        """Split into consecutive parts of the given sizes, which must sum to ``len(self)``."""
        sizes = list(sizes)
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"split sizes must be non-negative integers, got {sizes!r}")
        if sum(sizes) != len(self.rows):
            raise ValueError(
                f"split sizes {sizes} sum to {sum(sizes)}, but the batch has {len(self)} rows"
            )
        out, start = [], 0
        for s in sizes:
            out.append(self._take(start, start + s))
            start += s
        return out

    @classmethod
    def concat(cls, metas: Sequence[BatchMeta]) -> BatchMeta:
        """Join batches of one partition, in order. Fields must agree (empty batches aside)."""
        metas = list(metas)
        if not metas:
            raise ValueError("concat needs at least one BatchMeta")
        pid = metas[0].partition_id
        others = {m.partition_id for m in metas} - {pid}
        if others:
            raise ValueError(
                f"concat needs batches of one partition; got {pid!r} and {sorted(others)!r}"
            )
        non_empty = [m for m in metas if m.rows] or metas[:1]
        fields = list(non_empty[0].fields)
        for m in non_empty[1:]:
            if set(m.fields) != set(fields):
                raise ValueError(
                    f"concat needs batches with the same fields; got {fields} and {m.fields}"
                )
        return cls(
            partition_id=pid,
            rows=[r for m in metas for r in m.rows],
            fields=fields,
            tags=[t for m in metas for t in m.tags],
            units=[u for m in metas for u in m.units]
            if all(m.units or not m.rows for m in metas)
            else [],
        )

    def select_fields(self, fields: str | Sequence[str]) -> BatchMeta:
        """The same rows with only ``fields`` (a field or a list; each must be one of this
        batch's fields)."""
        fields = _check_str_list("fields", [fields] if isinstance(fields, str) else fields)
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise ValueError(f"fields {missing} are not in this batch (it has {self.fields})")
        return BatchMeta(
            self.partition_id, list(self.rows), fields, self.tags, list(self.units),
            self.task_name, self.lease,
        )  # fmt: skip

    # ------------------------------------------- the public TransferQueue's names
    @property
    def global_indexes(self) -> list[int]:
        """The rows, in batch order (the public TransferQueue's name for :attr:`rows`)."""
        return self.rows

    @global_indexes.setter
    def global_indexes(self, rows: Iterable[int]) -> None:
        self.rows = _check_row_list(rows)

    @property
    def partition_ids(self) -> list[str]:
        """One partition id per row (a BatchMeta holds rows of one partition)."""
        return [self.partition_id] * len(self.rows)

    @property
    def field_names(self) -> list[str]:
        """The fields (the public TransferQueue's name for :attr:`fields`; in this batch's
        order, not sorted)."""
        return list(self.fields)

    @property
    def custom_meta(self) -> list[dict[str, Any]]:
        """The per-row tag dicts (the public TransferQueue's name for :attr:`tags`)."""
        return self.tags

    def get_all_custom_meta(self) -> list[dict[str, Any]]:
        """A copy of the per-row tags, one dict per row in batch order."""
        return copy.deepcopy(self.tags)

    def update_custom_meta(
        self, custom_meta: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]] | None
    ) -> None:
        """Merge tags into this batch's rows, locally: a list of one dict per row, or a dict
        ``{row: dict}``. Send them with ``client.set_custom_meta(meta)`` (or ``set_tags``)."""
        if custom_meta is None:
            return
        if isinstance(custom_meta, Mapping):
            where = {r: i for i, r in enumerate(self.rows)}
            unknown = [r for r in custom_meta if r not in where]
            if unknown:
                raise ValueError(f"rows {unknown} are not in this batch (it has {self.rows})")
            for row, update in custom_meta.items():
                self.tags[where[row]].update(update)
            return
        updates = _copy_tags(custom_meta)
        if len(updates) != len(self.rows):
            raise ValueError(
                f"custom_meta must hold one dict per row: {len(self.rows)} rows, "
                f"{len(updates)} dicts"
            )
        for tags, update in zip(self.tags, updates):
            tags.update(update)

    def clear_custom_meta(self) -> None:
        """Forget this batch's tags, locally (the controller's stay)."""
        self.tags = [{} for _ in self.rows]

    def select_samples(self, sample_indices: Sequence[int]) -> BatchMeta:
        """The rows at ``sample_indices`` (positions in this batch), in that order."""
        idx = _check_row_list(sample_indices)
        bad = [i for i in idx if not 0 <= i < len(self.rows)]
        if bad:
            raise IndexError(f"sample indices {bad} are out of range for {len(self)} rows")
        return BatchMeta(
            self.partition_id, [self.rows[i] for i in idx], list(self.fields),
            [dict(self.tags[i]) for i in idx],
            [self.units[i] for i in idx] if self.units else [], self.task_name, self.lease,
        )  # fmt: skip

    def reorder(self, indices: Sequence[int]) -> None:
        """Put the rows in the order of ``indices`` (a permutation of positions), in place."""
        idx = _check_row_list(indices)
        if sorted(idx) != list(range(len(self.rows))):
            raise ValueError(f"reorder needs a permutation of range({len(self)}); got {idx}")
        self.rows = [self.rows[i] for i in idx]
        self.tags = [self.tags[i] for i in idx]
        if self.units:
            self.units = [self.units[i] for i in idx]

    def chunk_by_partition(self) -> list[BatchMeta]:
        """One batch per partition: this batch (it holds rows of one partition)."""
        return [self]

    # ------------------------------------------------------------------ wire
    def to_plain(self) -> dict[str, Any]:
        """Plain values (str, int, list, dict) for the wire codec."""
        return {
            "partition_id": self.partition_id,
            "rows": list(self.rows),
            "fields": list(self.fields),
            "tags": [dict(t) for t in self.tags],
            "units": list(self.units),
            "task_name": self.task_name,
            "lease": self.lease,
        }

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> BatchMeta:
        """Inverse of :meth:`to_plain`."""
        return cls(
            partition_id=plain["partition_id"],
            rows=list(plain.get("rows", [])),
            fields=list(plain.get("fields", [])),
            tags=list(plain.get("tags", [])),
            units=list(plain.get("units", [])),
            task_name=plain.get("task_name", ""),
            lease=int(plain.get("lease", 0)),
        )


@dataclass(frozen=True)
class PartitionInfo:
    """A snapshot of one partition, as ``partition_info`` returns it.

    ``size`` counts live rows, pending slots included; ``produced`` maps each field to the
    number of live rows that have it; ``consumed`` maps each task to the number of live rows
    it has consumed; ``waiting`` maps each task to the number of its ``get_meta`` calls
    waiting for rows of this partition right now (who waits on what, when a job hangs).
    """

    partition_id: str
    size: int
    expected_size: int
    sealed: bool
    produced: dict[str, int] = field(default_factory=dict)
    consumed: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    #: pending slots: reserved rows no put has filled yet
    pending: int = 0
    #: rows allocated by puts that have not committed yet (under a put lease)
    in_flight: int = 0
    #: rows whose bytes lived on a storage unit that died (not counted in ``size``)
    lost: int = 0
    #: rows handed out under a consumer lease and not acked yet, per task
    leased: dict[str, int] = field(default_factory=dict)
    #: rows handed out again after a nack or an expired lease, per task
    redelivered: dict[str, int] = field(default_factory=dict)
    #: rows too old for a task's ``max_version_lag``, consumed unseen (``evict=True``)
    evicted: dict[str, int] = field(default_factory=dict)
    #: the policy version (staleness-bounded admission; 0 otherwise)
    version: int = 0
    #: the staleness bound k (``None``: no admission control)
    max_staleness: int | None = None
    #: samples admitted by ``reserve`` so far
    admitted: int = 0
    #: ``reserve`` calls waiting for room under the staleness bound right now
    reserving: int = 0
    #: rows a sampler's group filter (``keep_group``) dropped, consumed unseen, per task
    dropped: dict[str, int] = field(default_factory=dict)
    #: bytes committed puts sent to storage units on another node than the writer's (ray)
    cross_node_bytes: int = 0

    def to_plain(self) -> dict[str, Any]:
        """Plain values for the wire codec."""
        return {
            "partition_id": self.partition_id,
            "size": self.size,
            "expected_size": self.expected_size,
            "sealed": self.sealed,
            "produced": dict(self.produced),
            "consumed": dict(self.consumed),
            "waiting": dict(self.waiting),
            "pending": self.pending,
            "in_flight": self.in_flight,
            "lost": self.lost,
            "leased": dict(self.leased),
            "redelivered": dict(self.redelivered),
            "evicted": dict(self.evicted),
            "version": self.version,
            "max_staleness": self.max_staleness,
            "admitted": self.admitted,
            "reserving": self.reserving,
            "dropped": dict(self.dropped),
            "cross_node_bytes": self.cross_node_bytes,
        }

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> PartitionInfo:
        """Inverse of :meth:`to_plain`."""
        return cls(
            partition_id=plain["partition_id"],
            size=int(plain["size"]),
            expected_size=int(plain["expected_size"]),
            sealed=bool(plain["sealed"]),
            produced=dict(plain.get("produced", {})),
            consumed=dict(plain.get("consumed", {})),
            waiting=dict(plain.get("waiting", {})),
            pending=int(plain.get("pending", 0)),
            in_flight=int(plain.get("in_flight", 0)),
            lost=int(plain.get("lost", 0)),
            leased=dict(plain.get("leased", {})),
            redelivered=dict(plain.get("redelivered", {})),
            evicted=dict(plain.get("evicted", {})),
            version=int(plain.get("version", 0)),
            cross_node_bytes=int(plain.get("cross_node_bytes", 0)),
            max_staleness=plain.get("max_staleness"),
            admitted=int(plain.get("admitted", 0)),
            reserving=int(plain.get("reserving", 0)),
            dropped=dict(plain.get("dropped", {})),
        )


def _register_wire_types() -> None:
    from transferqueue.runtime import codec

    codec.register_type(BatchMeta, "tq.BatchMeta", BatchMeta.to_plain, BatchMeta.from_plain)
    codec.register_type(
        PartitionInfo, "tq.PartitionInfo", PartitionInfo.to_plain, PartitionInfo.from_plain
    )


_register_wire_types()
