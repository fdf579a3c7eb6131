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

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transferqueue.controller.balancing import (
    balanced_partition,
    pack_under_budget,
    split_to_count,
)
from transferqueue.errors import SamplerError

__all__ = [
    "CONTEXT_KEYS",
    "BaseSampler",
    "GRPOGroupNSampler",
    "RankAwareSampler",
    "SeqlenBalancedSampler",
    "SequentialSampler",
    "TokenBudgetSampler",
    "balanced_partition",
    "resolve_sampler",
]

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


@dataclass
class _Round:
    shares: list[list[int] | None]  # one per slot; None once all members fetched it
    fetched: list[int]


class _RoundSampler(BaseSampler):
    #: a round hands each rank its share and consumes the whole round at once, which a
    #: consumer lease (rows given back one rank at a time) would break
    consumes_for_others = True

    """Hands out rounds: one share per slot (group or rank) per ``batch_index``.

    The first request for a ``batch_index`` forms the round and marks all of it consumed;
    every request returns its slot's share; a share is dropped once ``group_size`` members
    fetched it, and the round once every share is dropped (bounded memory).
    """

    def __init__(self) -> None:
        self._rounds: dict[tuple[str, str], dict[int, _Round]] = {}

    def _fetch(
        self,
        key: tuple[str, str],
        slot: int,
        batch_index: int,
        group_size: int,
        form: Callable[[], list[list[int]] | None],
    ) -> tuple[list[int], list[int]]:
        consumed: list[int] = []
        if batch_index not in self._rounds.get(key, {}):
            shares = form()
            if not shares:
                return [], []
            self._add_round(key, batch_index, shares)
            consumed = [r for s in shares for r in s]
        return self._take(key, slot, batch_index, group_size), consumed

    def _add_round(self, key: tuple[str, str], batch_index: int, shares: list[list[int]]) -> None:
        rnd = _Round(shares=list(shares), fetched=[0] * len(shares))
        self._rounds.setdefault(key, {})[batch_index] = rnd

    def _take(
        self, key: tuple[str, str], slot: int, batch_index: int, group_size: int
    ) -> list[int]:
        """``slot``'s share of the cached round ``batch_index``, counted as fetched once."""
        rnd = self._rounds[key][batch_index]
        share = rnd.shares[slot]
        if share is None:
            raise SamplerError(
                f"batch_index {batch_index} of slot {slot} was already fetched by all "
                f"group_size={group_size} members; give every step a new batch_index"
            )
        rnd.fetched[slot] += 1
        if rnd.fetched[slot] >= group_size:
            rnd.shares[slot] = None
            if all(s is None for s in rnd.shares):
                rounds = self._rounds[key]
                del rounds[batch_index]
                if not rounds:
                    del self._rounds[key]
        return list(share)

    def cached_rounds(self) -> int:
        """Number of rounds still cached (for tests: memory stays bounded)."""
        return sum(len(r) for r in self._rounds.values())

    def on_clear(self, partition_id: str) -> None:
        for key in [k for k in self._rounds if k[0] == partition_id]:
            del self._rounds[key]

    def on_reset(self, partition_id: str, task_name: str | None) -> None:
        for key in [k for k in self._rounds if k[0] == partition_id]:
            if task_name is None or key[1] == task_name:
                del self._rounds[key]


def _even_sizes(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class RankAwareSampler(_RoundSampler):
    """Identical batches within a data-replica group, disjoint batches across groups.

    ``sampling_config``: ``dp_rank`` (the group id, ``0 <= dp_rank < num_groups``),
    ``batch_index`` (the step), ``group_size`` (ranks per group) and ``num_groups``
    (the last two may also be given to the constructor). Batches are handed out in rounds of
    ``num_groups``; at the end of the stream the rows left are split as evenly as possible
    across the groups, or, when fewer rows than groups remain, left unconsumed.
    """

    def __init__(self, num_groups: int | None = None, group_size: int | None = None) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.group_size = group_size

    def candidate_limit(self, batch_size: int, **cfg: Any) -> int | None:
        k = cfg.get("num_groups", self.num_groups)
        return batch_size * k if isinstance(k, int) and k > 0 else None

    def sample(
        self,
        ready_rows: list[int],
        batch_size: int,
        *,
        partition_id: str = "",
        task_name: str = "",
        final: bool = False,
        drop_last: bool = False,
        **cfg: Any,
    ) -> tuple[list[int], list[int]]:
        k = _config_int(cfg, "num_groups", self.num_groups, minimum=1)
        group_size = _config_int(cfg, "group_size", self.group_size, minimum=1)
        group = _config_int(cfg, "dp_rank")
        batch_index = _config_int(cfg, "batch_index")
        if group >= k:
            raise SamplerError(f"sampling_config['dp_rank'] ({group}) must be < num_groups ({k})")

        def form() -> list[list[int]] | None:
            if len(ready_rows) >= batch_size * k:
                return [ready_rows[i * batch_size : (i + 1) * batch_size] for i in range(k)]
            if not final or drop_last or len(ready_rows) < k:
                return None
            out, start = [], 0
            for size in _even_sizes(len(ready_rows), k):
                out.append(ready_rows[start : start + size])
                start += size
            return out

        return self._fetch((partition_id, task_name), group, batch_index, group_size, form)


def _row_length(row: int, key: str, tags: TagsFn) -> float:
    """The length tag ``key`` of ``row``: a number >= 0."""
    row_tags = tags(row)
    if key not in row_tags:
        raise SamplerError(
            f"row {row} has no tag {key!r}: put each sample's length in its tags so ranks "
            f"can be balanced"
        )
    value = row_tags[key]
    try:
        length = float(value)
    except (TypeError, ValueError):
        raise SamplerError(f"tag {key!r} of row {row} must be a number, got {value!r}") from None
    if length < 0:
        raise SamplerError(f"tag {key!r} of row {row} is negative ({value!r})")
    return length


class SeqlenBalancedSampler(_RoundSampler):
    """Global batches of whole groups, split across ``dp_size`` ranks balancing lengths.

    ``batch_size`` is per rank; ``sampling_config`` gives ``dp_rank`` and ``batch_index``
    (and optionally ``group_size``: ranks that share a ``dp_rank``, default 1). The first
    request for a ``batch_index`` picks ``batch_size * dp_size`` rows in whole groups (tag
    ``group_key``, ``n_samples_per_prompt`` rows each) and splits them into ``dp_size``
    shares of ``batch_size`` rows with nearly equal sums of the ``length_key`` tag
    (Karmarkar-Karp, then pairwise swaps). At the end of the stream the whole groups left are
    split evenly when there are at least ``dp_size`` rows.
    """

    def __init__(
        self,
        n_samples_per_prompt: int = 1,
        dp_size: int | None = None,
        length_key: str = "total_lengths",
        group_key: str = "uid",
    ) -> None:
        super().__init__()
        self.n_samples_per_prompt = n_samples_per_prompt
        self.dp_size = dp_size
        self.length_key = length_key
        self.group_key = group_key

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
        dp = _config_int(cfg, "dp_size", self.dp_size, minimum=1)
        n = _config_int(cfg, "n_samples_per_prompt", self.n_samples_per_prompt, minimum=1)
        rank = _config_int(cfg, "dp_rank")
        batch_index = _config_int(cfg, "batch_index")
        group_size = _config_int(cfg, "group_size", 1, minimum=1)
        if rank >= dp:
            raise SamplerError(f"sampling_config['dp_rank'] ({rank}) must be < dp_size ({dp})")
        if (batch_size * dp) % n:
            raise SamplerError(
                f"batch_size * dp_size ({batch_size} * {dp}) must be a multiple of "
                f"n_samples_per_prompt ({n})"
            )

        def form() -> list[list[int]] | None:
            groups = complete_groups(ready_rows, n, self.group_key, tags)
            want = batch_size * dp // n
            if len(groups) >= want:
                groups = groups[:want]
            elif not final or drop_last or len(groups) * n < dp:
                return None
            rows = [r for g in groups for r in g]
            lengths = [_row_length(r, self.length_key, tags) for r in rows]
            return [sorted(rows[i] for i in part) for part in balanced_partition(lengths, dp)]

        return self._fetch((partition_id, task_name), rank, batch_index, group_size, form)


class TokenBudgetSampler(_RoundSampler):
    """Micro-batches under a token budget, the same number on every data-parallel rank.

    Calling convention: **one ``get_meta`` per micro-batch.** ``batch_size`` is the rows of
    one *step* (one optimizer step: verl's per-rank ``ppo_mini_batch_size``) on each rank;
    ``sampling_config`` gives ``dp_rank``, ``dp_size`` (or the constructor does) and
    ``batch_index``: the rank's micro-batch counter 0, 1, 2, ..., which ``stream`` and
    ``StreamingDataset`` keep by themselves, so ``stream(client, fields, batch_size, pid,
    task, {"dp_rank": r, "dp_size": dp})`` yields one micro-batch per item. ``group_size``
    (default 1) ranks share each ``dp_rank`` and get identical micro-batches (tensor or
    pipeline peers); ``max_tokens_per_micro_batch`` may also come with ``sampling_config``.

    A step is formed by the first request for a micro-batch index not yet formed:

    1. the first ``batch_size * dp_size`` ready rows in whole groups (tag ``group_key``,
       ``n_samples_per_prompt`` rows each; 1: any rows) are split over the ranks,
       ``batch_size`` rows each, with nearly equal sums of the ``length_key`` tag;
    2. each rank's share is packed into micro-batches whose ``length_key`` sum is at most
       ``max_tokens_per_micro_batch`` (first-fit decreasing). **A row longer than the budget
       is a micro-batch of its own**;
    3. a rank with fewer micro-batches than another splits its heaviest micro-batch in two
       (never over budget) until every rank has the same number, M;
    4. the step's rows are consumed, and its micro-batches get the next M indices.

    So every rank gets the same number of micro-batches in every step, and a step is
    exactly ``batch_size`` rows on every rank: a trainer steps its optimizer after
    ``batch_size`` rows (M varies from step to step, never across ranks). Micro-batches
    list their rows in ascending order; the same ready rows and tags give the same
    micro-batches.

    End of stream (``final``): the rows left form the last, short step, split over the
    ranks as evenly as possible (row counts differ by at most one). Where those rows
    cannot give every rank the same number of micro-batches (a rank would have fewer rows
    than another has micro-batches: rows near or over the budget), the last whole groups
    are left out until they can; rows left out, or fewer rows than ranks, stay unconsumed
    (as with :class:`RankAwareSampler`). Then every rank's next request gets the empty
    batch that ends the stream, so all ranks end after the same number of micro-batches. A
    rank never gets an empty micro-batch before that. ``drop_last``: no short last step.
    """

    def __init__(
        self,
        max_tokens_per_micro_batch: int | None = None,
        length_key: str = "seq_len",
        dp_size: int | None = None,
        n_samples_per_prompt: int = 1,
        group_key: str = "uid",
    ) -> None:
        super().__init__()
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.length_key = length_key
        self.dp_size = dp_size
        self.n_samples_per_prompt = n_samples_per_prompt
        self.group_key = group_key
        self._next: dict[tuple[str, str], int] = {}  # first micro-batch index not formed

    # candidate_limit stays None: a request for a later micro-batch (a DataLoader worker
    # with an index offset) forms every step before it, so it must see every ready row

    def on_clear(self, partition_id: str) -> None:
        super().on_clear(partition_id)
        for key in [k for k in self._next if k[0] == partition_id]:
            del self._next[key]

    def on_reset(self, partition_id: str, task_name: str | None) -> None:
        super().on_reset(partition_id, task_name)
        for key in [k for k in self._next if k[0] == partition_id]:
            if task_name is None or key[1] == task_name:
                del self._next[key]

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
        budget = _config_int(
            cfg, "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, minimum=1
        )
        dp = _config_int(cfg, "dp_size", self.dp_size, minimum=1)
        n = _config_int(cfg, "n_samples_per_prompt", self.n_samples_per_prompt, minimum=1)
        rank = _config_int(cfg, "dp_rank")
        index = _config_int(cfg, "batch_index")
        group_size = _config_int(cfg, "group_size", 1, minimum=1)
        if rank >= dp:
            raise SamplerError(f"sampling_config['dp_rank'] ({rank}) must be < dp_size ({dp})")
        if (batch_size * dp) % n:
            raise SamplerError(
                f"batch_size * dp_size ({batch_size} * {dp}) must be a multiple of "
                f"n_samples_per_prompt ({n})"
            )
        key = (partition_id, task_name)
        consumed: list[int] = []
        while index not in self._rounds.get(key, {}):  # form steps up to the one asked for
            first = self._next.get(key, 0)
            if index < first:
                raise SamplerError(
                    f"micro-batch {index} of dp_rank {rank} was already fetched by all "
                    f"group_size={group_size} members; batch_index counts micro-batches"
                )
            taken = set(consumed)
            rows = [r for r in ready_rows if r not in taken]
            groups = complete_groups(rows, n, self.group_key, tags)
            flush = final and not drop_last
            shares = self._form_step(groups, batch_size * dp // n, dp, budget, tags, flush)
            if shares is None:
                return [], consumed
            for j in range(len(shares[0])):
                self._add_round(key, first + j, [share[j] for share in shares])
            self._next[key] = first + len(shares[0])
            consumed += [r for share in shares for mb in share for r in mb]
        return self._take(key, rank, index, group_size), consumed

    def _form_step(
        self,
        groups: list[list[int]],
        want: int,
        dp: int,
        budget: int,
        tags: TagsFn,
        flush: bool,
    ) -> list[list[list[int]]] | None:
        """Per rank, its micro-batches of the next step (equal counts); None: wait."""
        if len(groups) >= want:
            groups = groups[:want]
        elif not flush:
            return None
        while sum(map(len, groups)) >= dp:
            plan = self._plan(groups, dp, budget, tags)
            if plan is not None:
                return plan
            groups = groups[:-1]  # end of stream only: a full step always fits
        return None

    def _plan(
        self, groups: list[list[int]], dp: int, budget: int, tags: TagsFn
    ) -> list[list[list[int]]] | None:
        rows = sorted(r for g in groups for r in g)
        lengths = [_row_length(r, self.length_key, tags) for r in rows]
        shares = [sorted(part) for part in balanced_partition(lengths, dp)]
        packed = [pack_under_budget([lengths[i] for i in idx], budget) for idx in shares]
        m = max(map(len, packed))
        if any(len(idx) < m for idx in shares):
            return None  # a rank has too few rows to match the others' micro-batch count
        out = []
        for idx, bins in zip(shares, packed, strict=True):
            bins = split_to_count([lengths[i] for i in idx], bins, m)
            out.append([[rows[idx[j]] for j in b] for b in bins])
        return out


# ------------------------------------------------------------------ resolution

BUILTIN_SAMPLERS: dict[str, type[BaseSampler]] = {
    "sequential": SequentialSampler,
    "grpo": GRPOGroupNSampler,
    "rank_aware": RankAwareSampler,
    "seqlen_balanced": SeqlenBalancedSampler,
    "token_budget": TokenBudgetSampler,
}


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SamplerError(f"cannot import sampler {path!r}: {exc}") from exc
    return obj


def resolve_sampler(spec: Any = None, **kwargs: Any) -> BaseSampler:
    """A sampler instance from a spec: None (sequential), a built-in name
    (``"sequential"``, ``"grpo"``, ``"rank_aware"``, ``"seqlen_balanced"``,
    ``"token_budget"``), a
    :class:`BaseSampler` subclass or instance, or an import path ``"package.module:Class"``.
    ``kwargs`` go to the constructor (not allowed with an instance).
    """
    if spec is None:
        spec = "sequential"
    if isinstance(spec, BaseSampler):
        if kwargs:
            raise SamplerError(f"sampler arguments {sorted(kwargs)} given with a sampler instance")
        return spec
    if isinstance(spec, str):
        if spec in BUILTIN_SAMPLERS:
            spec = BUILTIN_SAMPLERS[spec]
        elif ":" in spec:
            spec = _import_path(spec)
            if isinstance(spec, BaseSampler):
                return resolve_sampler(spec, **kwargs)
        else:
            raise SamplerError(
                f"unknown sampler {spec!r}: use one of {sorted(BUILTIN_SAMPLERS)}, a BaseSampler "
                f"subclass or instance, or an import path 'package.module:Class'"
            )
    if isinstance(spec, type) and issubclass(spec, BaseSampler):
        try:
            return spec(**kwargs)
        except TypeError as exc:
            raise SamplerError(f"cannot construct {spec.__name__}: {exc}") from exc
    raise SamplerError(f"a sampler must be a BaseSampler subclass or instance, got {spec!r}")
