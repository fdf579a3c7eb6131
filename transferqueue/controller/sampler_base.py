"""Samplers: which ready rows a ``get_meta`` call returns, and which it marks consumed.

Contract (as in the public TransferQueue)::

    sample(ready_rows, batch_size, **sampling_config) -> (sampled, consumed)

``ready_rows`` are the rows the calling task has not consumed and that have every requested
field, in ascending row order. ``sampled`` is the batch to return (in batch order);
``consumed`` the rows to mark consumed for the task (usually the same rows). Returning
``([], [])`` means "nothing to hand out now": the controller then waits for more rows, or,
when ``final`` is true, ends the stream with an empty batch.

Besides the caller's ``sampling_config`` entries, the controller passes these context
keyword arguments (the names are reserved: a ``sampling_config`` may not use them):

- ``partition_id`` (str) and ``task_name`` (str): who is asking, for stateful samplers;
- ``tags``: a callable ``tags(row) -> Mapping`` giving a row's (read-only) tag dict;
- ``final`` (bool): ``ready_rows`` is complete and no more rows can become ready for this
  task, so a short batch is the last one;
- ``drop_last`` (bool): the caller does not want a short final batch.

A sampler may also override :meth:`BaseSampler.candidate_limit` (how many ready rows it
needs to see at most: lets the controller stop scanning early), the hooks
:meth:`BaseSampler.on_clear` / :meth:`BaseSampler.on_reset` to drop cached state, and
:meth:`BaseSampler.stats` (counters per partition and task, e.g. the groups a filter
dropped, for ``partition_info``).

Invalid or missing ``sampling_config`` entries raise :class:`~transferqueue.errors.SamplerError`
(a ``ValueError``) naming the key; the controller keeps serving.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transferqueue.errors import SamplerError

TagsFn = Callable[[int], Mapping[str, Any]]
CONTEXT_KEYS = frozenset({"partition_id", "task_name", "tags", "final", "drop_last"})


def _no_tags(row: int) -> Mapping[str, Any]:
    return {}


def _config_int(
    cfg: Mapping[str, Any], key: str, default: int | None = None, minimum: int = 0
) -> int:
    """An integer ``sampling_config[key]`` (or ``default``), at least ``minimum``."""
    value = cfg.get(key, default)
    if value is None:
        raise SamplerError(f"sampling_config is missing {key!r} (an integer >= {minimum})")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SamplerError(
            f"sampling_config[{key!r}] must be an integer >= {minimum}, got {value!r}"
        )
    return value


class BaseSampler(ABC):
    """Base class of samplers. Subclasses implement :meth:`sample` and accept ``**kwargs``."""

    @abstractmethod
    def sample(
        self, ready_rows: list[int], batch_size: int, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        """Pick ``(sampled, consumed)`` among ``ready_rows``; see the module docstring."""

    def candidate_limit(self, batch_size: int, **sampling_config: Any) -> int | None:
        """At most how many ready rows :meth:`sample` needs to see; ``None``: all of them."""
        return None

    def on_clear(self, partition_id: str) -> None:
        """The partition was cleared: drop any state kept for it."""
        return None

    def on_reset(self, partition_id: str, task_name: str | None) -> None:
        """Consumption was reset for ``task_name`` (every task when None): drop its state."""
        return None

    def stats(self, partition_id: str, task_name: str) -> dict[str, int]:
        """Counters the sampler keeps for one partition and task (none here)."""
        return {}

    def __call__(
        self, ready_rows: list[int], batch_size: int, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        return self.sample(ready_rows, batch_size, **sampling_config)


class SequentialSampler(BaseSampler):
    """The first ``batch_size`` ready rows; at the end of a stream, whatever is left."""

    def sample(
        self,
        ready_rows: list[int],
        batch_size: int,
        *,
        final: bool = False,
        drop_last: bool = False,
        **_: Any,
    ) -> tuple[list[int], list[int]]:
        if len(ready_rows) >= batch_size or (final and not drop_last):
            picked = list(ready_rows[:batch_size])
            return picked, list(picked)
        return [], []

    def candidate_limit(self, batch_size: int, **sampling_config: Any) -> int | None:
        return batch_size


def complete_groups(ready_rows: Sequence[int], n: int, key: str, tags: TagsFn) -> list[list[int]]:
    """Whole groups of ``n`` rows sharing the tag ``key``, ordered by their first row.

    A group id with more than ``n`` ready rows forms several groups of ``n`` (in row order);
    rows of an incomplete group are left out.
    """
    if n == 1:
        return [[r] for r in ready_rows]
    members: dict[Any, list[int]] = {}
    for r in ready_rows:
        row_tags = tags(r)
        if key not in row_tags:
            raise SamplerError(
                f"row {r} has no tag {key!r}: put tags=[{{{key!r}: <group id>}}, ...] "
                f"with the data so the sampler can keep groups whole"
            )
        try:
            members.setdefault(row_tags[key], []).append(r)
        except TypeError as exc:
            raise SamplerError(f"tag {key!r} of row {r} must be hashable: {exc}") from None
    groups = [rows[i : i + n] for rows in members.values() for i in range(0, len(rows) - n + 1, n)]
    groups.sort(key=lambda g: g[0])
    return groups


KeepGroupFn = Callable[[list[dict[str, Any]]], Any]


class GRPOGroupNSampler(BaseSampler):
    """Whole GRPO groups: rows whose tag ``group_key`` is equal, ``n_samples_per_prompt`` each.

    ``batch_size`` must be a multiple of ``n_samples_per_prompt`` (which ``sampling_config``
    may also give). Groups come in order of their first row; a group with a missing member
    is never returned, not even at the end of the stream.

    Group filter (DAPO's dynamic sampling): ``keep_group(tags)`` gets the tag dicts of a
    complete group's rows (in row order) and returns True to hand the group out, False to
    drop it (e.g. every reward equal: no learning signal). A dropped group is marked
    consumed for the task as soon as it is complete, without being returned, so the stream
    still ends; :meth:`dropped` and :meth:`stats` count what was dropped per partition and
    task. Give the filter as ``GRPOGroupNSampler(n, keep_group=fn)`` where the sampler is
    built in the controller's process (inproc), or as a ``keep_group`` method of a subclass
    configured by import path, ``"package.module:Class"`` (zmq and ray: a callable does not
    travel). It must depend on the tags only: it may see a kept group again while the batch
    waits to fill.
    """

    def __init__(
        self,
        n_samples_per_prompt: int | None = None,
        group_key: str = "uid",
        keep_group: KeepGroupFn | None = None,
    ) -> None:
        if keep_group is not None and not callable(keep_group):
            raise SamplerError(f"keep_group must be callable, got {keep_group!r}")
        self.n_samples_per_prompt = n_samples_per_prompt
        self.group_key = group_key
        self._keep_fn = keep_group
        self._dropped: dict[tuple[str, str], list[int]] = {}  # -> [groups, rows]

    def keep_group(self, tags: list[dict[str, Any]]) -> bool:
        """Whether a complete group (its rows' tag dicts) is handed out: always, here.
        Override it in a subclass to filter groups."""
        return True

    @property
    def filters(self) -> bool:
        """True when a ``keep_group`` was given or overridden."""
        return self._keep_fn is not None or (
            type(self).keep_group is not GRPOGroupNSampler.keep_group
        )

    def dropped(self, partition_id: str, task_name: str) -> int:
        """Rows of ``partition_id`` dropped for ``task_name`` by the group filter."""
        return self._dropped.get((partition_id, task_name), [0, 0])[1]

    def dropped_groups(self, partition_id: str, task_name: str) -> int:
        """Groups of ``partition_id`` dropped for ``task_name`` by the group filter."""
        return self._dropped.get((partition_id, task_name), [0, 0])[0]

    def stats(self, partition_id: str, task_name: str) -> dict[str, int]:
        if not self.filters:
            return {}
        groups, rows = self._dropped.get((partition_id, task_name), [0, 0])
        return {"dropped_groups": groups, "dropped_rows": rows}

    def on_clear(self, partition_id: str) -> None:
        for key in [k for k in self._dropped if k[0] == partition_id]:
            del self._dropped[key]

    def on_reset(self, partition_id: str, task_name: str | None) -> None:
        # the rows come back for the task: the filter will see (and count) them again
        for key in [k for k in self._dropped if k[0] == partition_id]:
            if task_name is None or key[1] == task_name:
                del self._dropped[key]

    def _filter(self, groups: list[list[int]], tags: TagsFn) -> tuple[list[list[int]], list[int]]:
        """The kept groups, and the rows of the dropped ones."""
        if not self.filters:
            return groups, []
        keep = self._keep_fn or self.keep_group
        kept: list[list[int]] = []
        dropped: list[int] = []
        for g in groups:
            try:
                verdict = keep([dict(tags(r)) for r in g])
            except Exception as exc:
                raise SamplerError(
                    f"keep_group failed on the group of rows {g}: {type(exc).__name__}: {exc}"
                ) from exc
            if verdict is None:
                raise SamplerError(
                    "keep_group returned None: return True to hand a group out, False to drop it"
                )
            if verdict:
                kept.append(g)
            else:
                dropped += g
        return kept, dropped

    def sample(
        self,
        ready_rows: list[int],
        batch_size: int,
        *,
        partition_id: str = "",
        task_name: str = "",
        tags: TagsFn = _no_tags,
        final: bool = False,
        drop_last: bool = False,
        **cfg: Any,
    ) -> tuple[list[int], list[int]]:
        n = _config_int(cfg, "n_samples_per_prompt", self.n_samples_per_prompt, minimum=1)
        if batch_size % n:
            raise SamplerError(
                f"batch_size ({batch_size}) must be a multiple of n_samples_per_prompt ({n})"
            )
        groups, dropped = self._filter(complete_groups(ready_rows, n, self.group_key, tags), tags)
        if dropped:
            count = self._dropped.setdefault((partition_id, task_name), [0, 0])
            count[0] += len(dropped) // n
            count[1] += len(dropped)
        want = batch_size // n
        if len(groups) < want and not (final and not drop_last):
            return [], dropped
        picked = [r for g in groups[:want] for r in g]
        return picked, picked + dropped
