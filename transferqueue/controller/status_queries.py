"""Status queries of :class:`ControllerState`: consumption and production status,
``partition_info``, field specs, memory, and key lookups (pure; no I/O)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferqueue.controller.delivery import Delivery
from transferqueue.controller.leases import PutLeases
from transferqueue.controller.partition import LOST, PENDING, FieldSpec, Partition, tag_filter
from transferqueue.controller.samplers import BaseSampler
from transferqueue.metadata import PartitionInfo

__all__ = ["StatusQueries"]


class StatusQueries:
    """Mixed into :class:`~transferqueue.controller.state.ControllerState`."""

    if TYPE_CHECKING:
        _parts: dict[str, Partition]
        leases: PutLeases
        delivery: Delivery
        evicted: Any
        sampler: BaseSampler

        def _get(self, pid: str) -> Partition: ...

    # ------------------------------------------------------------ status
    def check_consumption_status(self, task: str, pid: str) -> bool:
        """True exactly when ``pid`` is exhausted for ``task``."""
        return self._get(pid).exhausted(task)

    def check_production_status(self, fields: Sequence[str], pid: str) -> bool:
        """True when every live row (pending slots included) has every field of ``fields``."""
        _, status = self._production(self._get(pid), fields)
        return bool(status.all())

    def get_consumption_status(self, task: str, pid: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Live rows (pending slots included, int64) and whether ``task`` consumed each."""
        part = self._get(pid)
        rows = part.live_rows()
        cons = part.cons.get(task)
        status = cons[rows] if cons is not None else np.zeros(len(rows), dtype=bool)
        return torch.from_numpy(rows), torch.from_numpy(np.ascontiguousarray(status))

    def get_production_status(
        self, fields: Sequence[str], pid: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Live rows (int64) and a bool matrix (rows x fields): which cells are produced."""
        rows, status = self._production(self._get(pid), fields)
        return torch.from_numpy(rows), torch.from_numpy(status)

    def _production(self, part: Partition, fields: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        fields = [fields] if isinstance(fields, str) else list(fields)
        rows = part.live_rows()
        status = np.zeros((len(rows), len(fields)), dtype=bool)
        for j, f in enumerate(fields):
            if f in part.prod:
                status[:, j] = part.prod[f][rows]
        return rows, status

    def partition_info(self, pid: str) -> PartitionInfo:
        part = self._get(pid)
        n = part.n
        return PartitionInfo(
            partition_id=pid,
            size=int(np.count_nonzero(part.live())),
            expected_size=part.expected_size,
            sealed=part.sealed,
            produced={f: int(np.count_nonzero(a[:n])) for f, a in part.prod.items()},
            consumed={t: int(np.count_nonzero(a[:n])) for t, a in part.cons.items()},
            in_flight=self.leases.in_flight(pid),
            lost=int(np.count_nonzero(part.state[:n] == LOST)),
            pending=int(np.count_nonzero(part.state[:n] == PENDING)),
            leased=self.delivery.leased_counts(part),
            redelivered={t: c for (p, t), c in self.delivery.redelivered.items() if p == pid},
            evicted={t: c for (p, t), c in self.evicted.items() if p == pid},
            version=part.version,
            max_staleness=part.max_staleness,
            admitted=part.admitted,
            dropped={
                t: st["dropped_rows"]
                for t in part.cons
                if (st := self.sampler.stats(pid, t)).get("dropped_rows")
            },
        )

    def field_specs(self, pid: str) -> dict[str, FieldSpec]:
        return dict(self._get(pid).specs)

    def memory_bytes(self, pid: str | None = None) -> int:
        """Bytes held by the status arrays (plus one pointer per row for tags)."""
        parts = self._parts.values() if pid is None else [self._get(pid)]
        return sum(p.nbytes() for p in parts)

    # ------------------------------------------------------------ keys
    def rows_for_keys(self, pid: str, keys: Sequence[str]) -> list[int]:
        """The rows of ``keys``; ``KeyError`` naming every missing key."""
        part = self._get(pid)
        missing = [k for k in keys if k not in part.keys]
        if missing:
            raise KeyError(f"keys not found in partition {pid!r}: {missing}")
        return [part.keys[k] for k in keys]

    def rows_of_present_keys(self, pid: str, keys: Sequence[str]) -> list[int]:
        """The rows of those ``keys`` that exist ([] for an unknown partition)."""
        if isinstance(keys, str):
            raise TypeError("keys must be a list of str, got one str")
        part = self._parts.get(pid)
        if part is None:
            return []
        return [part.keys[k] for k in keys if k in part.keys]

    def kv_list(
        self,
        pid: str | None = None,
        where: Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """``{partition: {key: tags}}`` for one partition (``{}`` if unknown) or all; with
        ``where``, only keys whose tags match (see :meth:`get_meta`)."""
        match = tag_filter(where)
        if pid is not None:
            parts = [self._parts[pid]] if pid in self._parts else []
        else:
            parts = list(self._parts.values())
        return {
            p.pid: {
                k: dict(p.tags[r] or {})
                for k, r in p.keys.items()
                if match is None or match(p.tag_view(r), r)
            }
            for p in parts
        }
