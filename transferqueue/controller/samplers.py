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
needs to see at most: lets the controller stop scanning early) and the hooks
:meth:`BaseSampler.on_clear` / :meth:`BaseSampler.on_reset` to drop cached state.

Invalid or missing ``sampling_config`` entries raise :class:`~transferqueue.errors.SamplerError`
(a ``ValueError``) naming the key; the controller keeps serving.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transferqueue.controller.balancing import balanced_partition
from transferqueue.errors import SamplerError

__all__ = [
    "CONTEXT_KEYS",
    "BaseSampler",
    "GRPOGroupNSampler",
    "RankAwareSampler",
    "SeqlenBalancedSampler",
    "SequentialSampler",
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


class GRPOGroupNSampler(BaseSampler):
    """Whole GRPO groups: rows whose tag ``group_key`` is equal, ``n_samples_per_prompt`` each.

    ``batch_size`` must be a multiple of ``n_samples_per_prompt`` (which ``sampling_config``
    may also give). Groups come in order of their first row; a group with a missing member
    is never returned, not even at the end of the stream.
    """

    def __init__(self, n_samples_per_prompt: int | None = None, group_key: str = "uid") -> None:
        self.n_samples_per_prompt = n_samples_per_prompt
        self.group_key = group_key

    def sample(
        self,
        ready_rows: list[int],
        batch_size: int,
        *,
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
        groups = complete_groups(ready_rows, n, self.group_key, tags)
        want = batch_size // n
        if len(groups) < want and not (final and not drop_last):
            return [], []
        picked = [r for g in groups[:want] for r in g]
        return picked, list(picked)


@dataclass
class _Round:
    shares: list[list[int] | None]  # one per slot; None once all members fetched it
    fetched: list[int]


class _RoundSampler(BaseSampler):
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
        rnd = self._rounds.get(key, {}).get(batch_index)
        consumed: list[int] = []
        if rnd is None:
            shares = form()
            if not shares:
                return [], []
            rnd = _Round(shares=list(shares), fetched=[0] * len(shares))
            self._rounds.setdefault(key, {})[batch_index] = rnd
            consumed = [r for s in shares for r in s]
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
        return list(share), consumed

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

    def _length(self, row: int, tags: TagsFn) -> float:
        row_tags = tags(row)
        if self.length_key not in row_tags:
            raise SamplerError(
                f"row {row} has no tag {self.length_key!r}: put each sample's length in its "
                f"tags so ranks can be balanced"
            )
        value = row_tags[self.length_key]
        try:
            length = float(value)
        except (TypeError, ValueError):
            raise SamplerError(
                f"tag {self.length_key!r} of row {row} must be a number, got {value!r}"
            ) from None
        if length < 0:
            raise SamplerError(f"tag {self.length_key!r} of row {row} is negative ({value!r})")
        return length

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
            lengths = [self._length(r, tags) for r in rows]
            return [sorted(rows[i] for i in part) for part in balanced_partition(lengths, dp)]

        return self._fetch((partition_id, task_name), rank, batch_index, group_size, form)


# ------------------------------------------------------------------ resolution

BUILTIN_SAMPLERS: dict[str, type[BaseSampler]] = {
    "sequential": SequentialSampler,
    "grpo": GRPOGroupNSampler,
    "rank_aware": RankAwareSampler,
    "seqlen_balanced": SeqlenBalancedSampler,
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
    (``"sequential"``, ``"grpo"``, ``"rank_aware"``, ``"seqlen_balanced"``), a
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
