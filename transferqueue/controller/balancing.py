"""Balanced partitioning of item weights into parts of (nearly) equal size, and packing of
items into bins under a budget.

Used by :class:`~transferqueue.controller.samplers.SeqlenBalancedSampler` to split a global
batch across data-parallel ranks so that every rank gets about the same number of tokens,
and by :class:`~transferqueue.controller.samplers.TokenBudgetSampler` to cut each rank's
share into micro-batches under a token budget (:func:`pack_under_budget`) and to give every
rank the same number of them (:func:`split_to_count`).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Sequence

__all__ = ["balanced_partition", "pack_under_budget", "split_to_count"]


def _karmarkar_karp(values: Sequence[float], k: int) -> list[list[int]]:
    """Equal-cardinality largest-differencing partition of ``values`` into ``k`` parts.

    Padded with zero-valued dummies so every part gets ``ceil(n / k)`` items, dummies
    removed at the end: part sizes then differ by at most one.
    """
    m = -(-len(values) // k)
    items = sorted(range(len(values)), key=lambda i: values[i])
    padded: list[int | None] = [None] * (m * k - len(values)) + list(items)
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    counter = itertools.count()
    for start in range(0, len(padded), k):
        parts = [
            (values[i], [i]) if i is not None else (0.0, []) for i in padded[start : start + k]
        ]
        parts.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(parts[0][0] - parts[-1][0]), next(counter), parts))
    while len(heap) > 1:
        a = heapq.heappop(heap)[2]
        b = heapq.heappop(heap)[2]
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(counter), merged))
    return [idx for _, idx in heap[0][2]] if heap else [[] for _ in range(k)]


def _best_exchange(
    values: Sequence[float], hi: list[int], lo: list[int], gap: float, can_move: bool
) -> tuple[float, int, int | None] | None:
    """The exchange between parts ``hi`` and ``lo`` (``gap`` = their sum difference) that
    leaves the pair's larger sum lowest: swap ``a`` in hi with ``b`` in lo, or, when
    ``can_move``, move ``a`` alone (``b`` None). Returns (distance of the moved amount from
    gap/2, a, b)."""
    lo_sorted = sorted(lo, key=lambda i: values[i])
    lo_vals = [values[i] for i in lo_sorted]
    best: tuple[float, int, int | None] | None = None
    for a in hi:
        options: list[tuple[float, int | None]] = []
        pos = bisect.bisect_left(lo_vals, values[a] - gap / 2)
        options += [
            (values[a] - lo_vals[j], lo_sorted[j]) for j in (pos - 1, pos) if 0 <= j < len(lo)
        ]
        if can_move:
            options.append((values[a], None))
        for d, b in options:
            if 0 < d < gap and (best is None or abs(gap / 2 - d) < best[0]):
                best = (abs(gap / 2 - d), a, b)
    return best


def _improve_by_exchanges(values: Sequence[float], parts: list[list[int]], rounds: int) -> None:
    """Swap (or move, between parts of unequal size) items between the heaviest part and
    another part while that lowers the heavier of the two."""
    sums = [sum(values[i] for i in p) for p in parts]
    for _ in range(rounds):
        hi = max(range(len(parts)), key=sums.__getitem__)
        best: tuple[float, int, int, int | None] | None = None
        for lo in range(len(parts)):
            gap = sums[hi] - sums[lo]
            if lo == hi or gap <= 0:
                continue
            found = _best_exchange(
                values, parts[hi], parts[lo], gap, len(parts[hi]) > len(parts[lo])
            )
            if found and (best is None or (sums[hi] + sums[lo]) / 2 + found[0] < best[0]):
                best = ((sums[hi] + sums[lo]) / 2 + found[0], lo, found[1], found[2])
        if best is None:
            return
        _, lo, a, b = best
        parts[hi].remove(a)
        parts[lo].append(a)
        d = values[a]
        if b is not None:
            parts[lo].remove(b)
            parts[hi].append(b)
            d -= values[b]
        sums[hi] -= d
        sums[lo] += d


def _search(values: Sequence[float], parts: list[list[int]], budget: int) -> list[list[int]]:
    """Branch and bound over assignments with the part sizes of ``parts``, seeded with its
    largest sum as the bound; gives up after ``budget`` nodes, keeping the best found."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    caps = [len(p) for p in parts]
    k = len(parts)
    sums, counts = [0.0] * k, [0] * k
    assign: list[list[int]] = [[] for _ in range(k)]
    best_max, best_parts, nodes = max(sum(values[i] for i in p) for p in parts), parts, 0
    floor = sum(values) / k

    def rec(pos: int) -> None:
        nonlocal best_max, best_parts, nodes
        if nodes >= budget or best_max <= floor:
            return
        nodes += 1
        if pos == len(order):
            best_max, best_parts = max(sums), [list(a) for a in assign]
            return
        i, seen = order[pos], set()
        for p in range(k):
            state = (sums[p], counts[p], caps[p])
            if counts[p] >= caps[p] or state in seen or sums[p] + values[i] >= best_max:
                continue
            seen.add(state)
            sums[p] += values[i]
            counts[p] += 1
            assign[p].append(i)
            rec(pos + 1)
            assign[p].pop()
            counts[p] -= 1
            sums[p] -= values[i]

    rec(0)
    return best_parts


def balanced_partition(values: Sequence[float], k: int) -> list[list[int]]:
    """Split item indices into ``k`` parts of nearly equal size with nearly equal sums.

    Part sizes differ by at most one (larger parts first). Karmarkar-Karp differencing, then
    improving exchanges; small inputs (up to 24 items) are then searched exactly within a
    node budget, since there a single item moves the result by several percent.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    parts = _karmarkar_karp(values, k)
    _improve_by_exchanges(values, parts, rounds=8 * k + len(values))
    if len(values) <= 24:
        parts = _search(values, parts, budget=5_000)
    parts.sort(key=len, reverse=True)
    return parts


def pack_under_budget(values: Sequence[float], budget: float) -> list[list[int]]:
    """Item indices packed into bins whose sums stay at most ``budget`` (first-fit
    decreasing); an item larger than ``budget`` gets a bin of its own. Each bin lists its
    items in ascending order; bins are ordered by their first item. Deterministic."""
    bins: list[list[int]] = []
    sums: list[float] = []
    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        for b, total in enumerate(sums):
            if total + values[i] <= budget:
                bins[b].append(i)
                sums[b] += values[i]
                break
        else:
            bins.append([i])
            sums.append(values[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def split_to_count(values: Sequence[float], bins: list[list[int]], count: int) -> list[list[int]]:
    """``bins`` with the heaviest splittable bin (two items or more) cut into two balanced
    halves until there are ``count`` bins; no bin's sum grows. ``ValueError`` when there are
    fewer than ``count`` items. Bins stay ordered by their first item."""
    if sum(map(len, bins)) < count:
        raise ValueError(f"{sum(map(len, bins))} items cannot fill {count} bins")
    out = [list(b) for b in bins]
    while len(out) < count:
        heaviest = max(
            (b for b in range(len(out)) if len(out[b]) > 1),
            key=lambda b: (sum(values[i] for i in out[b]), -out[b][0]),
        )
        items = out.pop(heaviest)
        halves = balanced_partition([values[i] for i in items], 2)
        out += [sorted(items[j] for j in half) for half in halves]
    return sorted(out, key=lambda b: b[0])
