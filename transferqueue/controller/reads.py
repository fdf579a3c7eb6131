"""Reads of :class:`~transferqueue.controller.state.ControllerState`: ``get_meta`` --
ready rows found from each task's low-water mark in doubling windows, sampled, marked
consumed or leased -- and the staleness eviction it applies (pure; no I/O). Mixed into
``ControllerState``; the rules are in :mod:`.state`'s docstring."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from transferqueue.controller import admission
from transferqueue.controller.partition import COMMITTED, PENDING, Partition, live_mask, tag_filter
from transferqueue.controller.samplers import CONTEXT_KEYS
from transferqueue.errors import SamplerError
from transferqueue.metadata import BatchMeta

if TYPE_CHECKING:
    from transferqueue.controller.delivery import Delivery
    from transferqueue.controller.samplers import BaseSampler

__all__ = ["Reads"]


def _checked(
    task: str, fields: Sequence[str], batch_size: int, sampling_config: Mapping[str, Any] | None
) -> tuple[list[str], dict[str, Any]]:
    """A get_meta call's arguments checked: (fields as a list, the sampling config)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(task, str) or not task:
        raise TypeError(f"task_name must be a non-empty str, got {task!r}")
    fields = [fields] if isinstance(fields, str) else list(fields)
    if not all(isinstance(f, str) for f in fields):
        raise TypeError(f"data fields must be str, got {fields!r}")
    cfg = dict(sampling_config or {})
    reserved = sorted(CONTEXT_KEYS & set(cfg))
    if reserved:
        raise SamplerError(f"sampling_config may not set {reserved}: the controller does")
    return fields, cfg


class Reads:
    """``get_meta`` and its helpers (see the module docstring)."""

    if TYPE_CHECKING:
        delivery: Delivery
        sampler: BaseSampler
        evicted: Any

        def _ensure(self, pid: str) -> Partition: ...

    def get_meta(
        self,
        pid: str,
        task: str,
        fields: Sequence[str],
        batch_size: int,
        sampling_config: Mapping[str, Any] | None = None,
        drop_last: bool = False,
        *,
        where: Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None = None,
        max_version_lag: int | None = None,
        evict: bool = False,
        lease_s: float | None = None,
        now: float = 0.0,
        client: str = "",
        lease_group: str = "",
    ) -> BatchMeta | None:
        """A batch for ``task``: ``None`` when the caller must wait, an empty batch when its
        stream has ended, else the sampled rows -- consumed for ``task``, or with
        ``lease_s`` leased to it until acked (:mod:`.delivery`). ``where``: only rows whose
        tags equal these values (or for which this callable is true) are ready.
        ``max_version_lag``: rows reserved more than that many versions ago are skipped --
        with ``evict``, consumed for the task unseen and counted (:mod:`.admission`).
        ``lease_group``: the caller's consumers share their leases (e.g. a dataset and its
        DataLoader workers): rows leased to the group do not keep the caller's stream open,
        since they are in its hands."""
        fields, cfg = _checked(task, fields, batch_size, sampling_config)
        by_tags = tag_filter(where)
        part = self._ensure(pid)
        match = self._row_test(part, task, by_tags, max_version_lag, evict)
        limit = self.sampler.candidate_limit(batch_size, **cfg)
        in_hand = lease_group if lease_s is not None else ""
        ready, final = self._ready(part, task, fields, limit, match, in_hand)
        sampled, consumed = self.sampler.sample(
            ready, batch_size, partition_id=pid, task_name=task, tags=part.tag_view,
            final=final, drop_last=drop_last, **cfg,
        )  # fmt: skip
        picked = self._check_sampled(part, sampled)
        used = picked if consumed == sampled else self._check_sampled(part, consumed)
        if drop_last and 0 < len(picked) < batch_size:
            picked, used = picked[:0], used[:0]
        lease = self._hand_out(part, task, picked, used, lease_s, now, lease_group or client)
        if not len(picked):
            return BatchMeta.empty(pid, fields) if final else None
        rows = picked.tolist()
        return BatchMeta(
            pid, rows, fields, [part.tags[r] or {} for r in rows], part.unit[picked].tolist(),
            task_name=task if lease else "", lease=lease,
        )  # fmt: skip

    def _row_test(
        self,
        part: Partition,
        task: str,
        by_tags: Callable[[Mapping[str, Any], int], bool] | None,
        max_version_lag: int | None,
        evict: bool,
    ) -> Callable[[Mapping[str, Any], int], bool] | None:
        """Which rows may be ready for this call: by tags (``by_tags``), and not staler than
        ``max_version_lag`` (with ``evict``, the staler ones are consumed unseen first)."""
        tests: list[Callable[[Mapping[str, Any], int], bool]] = []
        if by_tags is not None:
            tests.append(by_tags)
        if max_version_lag is not None:
            if isinstance(max_version_lag, bool) or not isinstance(max_version_lag, int):
                raise TypeError(f"max_version_lag must be an int, got {max_version_lag!r}")
            oldest = part.version - max_version_lag
            if evict:
                self._evict_stale(part, task, oldest)
            versions = part.row_version
            tests.append(lambda tags, row: versions[row] < 0 or versions[row] >= oldest)
        return (lambda tags, row: all(t(tags, row) for t in tests)) if tests else None

    def _hand_out(
        self,
        part: Partition,
        task: str,
        picked: np.ndarray,
        used: np.ndarray,
        lease_s: float | None,
        now: float,
        holder: str,
    ) -> int:
        """Give ``task`` the ``picked`` rows -- leased to ``holder`` with ``lease_s``, else
        consumed -- and consume the rest of ``used`` unseen; returns the lease (0: none)."""
        lease = 0
        if lease_s is not None and getattr(self.sampler, "consumes_for_others", False):
            raise SamplerError(
                f"{type(self.sampler).__name__} forms rounds for every rank at once: consumer "
                f"leases (lease_s) need a sampler that hands out what it consumes"
            )
        if lease_s is not None and len(picked):
            lease = self.delivery.lease(
                part, task, picked, now=now, lease_s=lease_s, client=holder
            ).lease
            used = used[~np.isin(used, picked)]  # dropped by the sampler: consumed unseen
        if len(used):
            part.mark_consumed(task, used)
        if part.max_staleness is not None and not getattr(
            self.sampler, "consumes_for_others", False
        ):  # rows a group filter dropped unseen give their admission back
            unseen = used[~np.isin(used, picked)]
            if len(unseen):
                admission.give_back(part, unseen)
        requeued = part.requeued.get(task)
        if requeued and len(picked):
            taken = set(picked.tolist())
            requeued[:] = [r for r in requeued if r not in taken]
        return lease

    def _evict_stale(self, part: Partition, task: str, oldest: int) -> None:
        """Consume, unseen, the rows reserved before version ``oldest`` (and count them)."""
        n = part.n
        stale = (part.row_version[:n] >= 0) & (part.row_version[:n] < oldest)
        stale &= live_mask(part.state[:n]) & ~part.task(task)[:n] & ~part.leased[task][:n]
        rows = np.flatnonzero(stale)
        if len(rows):
            part.mark_consumed(task, rows)
            self.evicted[(part.pid, task)] += len(rows)
            admission.give_back(part, rows)

    def _ready(
        self,
        part: Partition,
        task: str,
        fields: list[str],
        limit: int | None,
        match: Callable[[Mapping[str, Any], int], bool] | None = None,
        in_hand: str = "",
    ) -> tuple[list[int], bool]:
        """Ready rows (at most ``limit``; rows given back to the task first), and whether
        they are all and no more can come. Rows leased under the lease group ``in_hand``
        (the caller's own) do not keep its stream open: they are in the caller's hands --
        e.g. batches DataLoader workers fetched ahead of the process that acks them."""
        k: float = float("inf") if limit is None else limit
        start = part.lwm.get(task, 0)

        def mask(lo: int, hi: int) -> np.ndarray:
            m = part.ready_mask(task, fields, lo, hi)
            if match is not None:
                for i in np.flatnonzero(m).tolist():
                    if not match(part.tag_view(lo + i), lo + i):
                        m[i] = False
            return m

        rows, reached_end = part.scan(start, k, mask)
        requeued = part.requeued.get(task)
        if requeued:  # given back (nacked, expired): handed out before newer rows
            ready = set(rows.tolist())
            first = [r for r in requeued if r in ready]
            if first:
                firsts = set(first)
                rows = np.array(first + [r for r in rows.tolist() if r not in firsts])
        if not (reached_end and len(rows) <= k and part.bounded):
            return rows[: len(rows) if limit is None else limit].tolist(), False
        # every unconsumed live row in [start, n) must be among the ready ones
        unconsumed = live_mask(part.state[start : part.n])
        unconsumed &= ~part.task(task)[start : part.n]
        if in_hand:
            for row in self.delivery.rows_in_hand(part, task, in_hand):
                if row >= start:
                    unconsumed[row - start] = False
        return rows.tolist(), int(np.count_nonzero(unconsumed)) == len(rows)

    def _check_sampled(self, part: Partition, rows: Sequence[int]) -> np.ndarray:
        try:
            arr = np.array(rows, dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise SamplerError(f"sampler returned invalid rows: {exc}") from None
        if arr.ndim != 1:
            raise SamplerError(f"sampler must return a flat list of rows, got {rows!r}")
        if len(arr) < 64:  # cheaper in Python than three numpy reductions
            ok = all(
                0 <= r < part.n and PENDING <= part.state[r] <= COMMITTED for r in arr.tolist()
            )
        else:
            ok = arr.min() >= 0 and arr.max() < part.n and bool(live_mask(part.state[arr]).all())
        if not ok:
            bad = [
                r
                for r in arr.tolist()
                if not (0 <= r < part.n and PENDING <= part.state[r] <= COMMITTED)
            ]
            raise SamplerError(f"sampler returned rows that do not exist: {bad[:8]}")
        return arr
