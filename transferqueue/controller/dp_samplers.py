"""The data-parallel samplers: a round of ``dp_size`` ranks shares one global batch
(``RankAwareSampler``), balanced by sequence length (``SeqlenBalancedSampler``) or packed
under a token budget (``TokenBudgetSampler``). The sampler contract is in
``transferqueue.controller.sampler_base``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transferqueue.controller.balancing import (
    balanced_partition,
    pack_under_budget,
    split_to_count,
)
from transferqueue.controller.sampler_base import (
    BaseSampler,
    TagsFn,
    _config_int,
    _no_tags,
    complete_groups,
)
from transferqueue.errors import SamplerError


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
