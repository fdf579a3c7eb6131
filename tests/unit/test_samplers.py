"""Samplers: built-ins, their edge cases, balancing quality, and resolution from config."""

from __future__ import annotations

import random
from typing import Any

import pytest

from transferqueue.controller.balancing import pack_under_budget, split_to_count
from transferqueue.controller.samplers import (
    BaseSampler,
    GRPOGroupNSampler,
    RankAwareSampler,
    SeqlenBalancedSampler,
    SequentialSampler,
    TokenBudgetSampler,
    balanced_partition,
    resolve_sampler,
)
from transferqueue.controller.state import ControllerState, FieldSpec
from transferqueue.errors import SamplerError

SPEC = {"x": FieldSpec("torch.float32", 1)}


def fill(state: ControllerState, pid: str, tags: list[dict[str, Any]]) -> list[int]:
    rows = state.allocate(pid, len(tags))
    state.commit(pid, rows, SPEC, tags)
    return rows


def tag_fn(table: dict[int, dict[str, Any]]):
    return lambda row: table.get(row, {})


# ------------------------------------------------------------------ sequential


def test_sequential_takes_the_first_rows_or_waits() -> None:
    s = SequentialSampler()
    assert s.sample([4, 5, 6], 2) == ([4, 5], [4, 5])
    assert s.sample([4], 2) == ([], [])  # not enough: wait
    assert s.sample([4], 2, final=True) == ([4], [4])  # the last, partial batch
    assert s.sample([4], 2, final=True, drop_last=True) == ([], [])
    assert s.candidate_limit(8) == 8


# ------------------------------------------------------------------ GRPO


def test_grpo_groups_by_tag_not_by_adjacency() -> None:
    tags = tag_fn(
        {0: {"uid": "a"}, 1: {"uid": "b"}, 2: {"uid": "a"}, 3: {"uid": "c"}, 4: {"uid": "b"}}
    )
    s = GRPOGroupNSampler(n_samples_per_prompt=2)
    sampled, consumed = s.sample([0, 1, 2, 3, 4], 4, tags=tags)
    assert sampled == [0, 2, 1, 4] and consumed == sampled


def test_grpo_never_returns_a_partial_group() -> None:
    tags = tag_fn({0: {"uid": 1}, 1: {"uid": 1}, 2: {"uid": 2}})
    s = GRPOGroupNSampler(n_samples_per_prompt=2)
    assert s.sample([0, 1, 2], 4, tags=tags) == ([], [])  # one complete group: wait
    assert s.sample([0, 1, 2], 4, tags=tags, final=True) == ([0, 1], [0, 1])
    assert s.sample([2], 2, tags=tags, final=True) == ([], [])
    assert s.sample([0, 1], 4, tags=tags, final=True, drop_last=True) == ([], [])


def test_grpo_more_rows_with_one_id_form_several_groups() -> None:
    tags = tag_fn({row: {"uid": 0} for row in range(5)})
    s = GRPOGroupNSampler(n_samples_per_prompt=2)
    assert s.sample(list(range(5)), 4, tags=tags) == ([0, 1, 2, 3], [0, 1, 2, 3])


def test_grpo_errors_name_the_problem() -> None:
    s = GRPOGroupNSampler(n_samples_per_prompt=4)
    with pytest.raises(ValueError, match="multiple of n_samples_per_prompt"):
        s.sample([0, 1], 6)
    with pytest.raises(SamplerError, match="'uid'"):
        s.sample([0, 1, 2, 3], 4, tags=tag_fn({}))
    with pytest.raises(SamplerError, match="n_samples_per_prompt"):
        GRPOGroupNSampler().sample([0], 4)
    assert GRPOGroupNSampler().sample([0, 1], 2, n_samples_per_prompt=1) == ([0, 1], [0, 1])


def test_grpo_through_the_state() -> None:
    state = ControllerState(sampler=GRPOGroupNSampler(n_samples_per_prompt=2, group_key="gid"))
    state.create_partition("p", expected_size=6)
    fill(state, "p", [{"gid": 0}, {"gid": 1}, {"gid": 2}, {"gid": 1}])
    meta = state.get_meta("p", "t", ["x"], 4)
    assert meta is None  # only group 1 is whole
    fill(state, "p", [{"gid": 0}, {"gid": 2}])
    meta = state.get_meta("p", "t", ["x"], 4)
    assert meta is not None and meta.rows == [0, 4, 1, 3]
    last = state.get_meta("p", "t", ["x"], 4)
    assert last is not None and last.rows == [2, 5]  # final partial batch of whole groups
    assert state.get_meta("p", "t", ["x"], 4) == state.get_meta("p", "t", ["x"], 4)
    assert state.check_consumption_status("t", "p")


def distinct_rewards(tags: list[dict[str, Any]]) -> bool:
    return len({t["reward"] for t in tags}) > 1


def reward_tags(rewards: list[list[int]]) -> list[dict[str, Any]]:
    """Tags of groups put one after another: group g's rows get uid g and its rewards."""
    return [{"uid": g, "reward": r} for g, rs in enumerate(rewards) for r in rs]


def test_grpo_keep_group_drops_whole_groups_consumed_and_counted() -> None:
    sampler = GRPOGroupNSampler(n_samples_per_prompt=2, keep_group=distinct_rewards)
    state = ControllerState(sampler=sampler)
    state.create_partition("p", expected_size=10)
    fill(state, "p", reward_tags([[0, 1], [1, 1], [0, 0], [1, 0], [0, 1]]))
    first = state.get_meta("p", "t", ["x"], 4)
    assert first is not None and first.rows == [0, 1, 6, 7]  # groups 1 and 2 skipped
    assert sampler.dropped("p", "t") == 4 and sampler.dropped_groups("p", "t") == 2
    assert state.partition_info("p").consumed == {"t": 8}  # dropped rows are consumed
    last = state.get_meta("p", "t", ["x"], 4)
    assert last is not None and last.rows == [8, 9]  # the final short batch: whole groups
    end = state.get_meta("p", "t", ["x"], 4)
    assert end is not None and end.is_empty  # the stream ends
    assert state.check_consumption_status("t", "p")
    assert sampler.stats("p", "t") == {"dropped_groups": 2, "dropped_rows": 4}
    assert sampler.stats("p", "other") == {"dropped_groups": 0, "dropped_rows": 0}
    # another task sees every row again, and its own count
    again = state.get_meta("p", "u", ["x"], 6)
    assert again is not None and again.rows == [0, 1, 6, 7, 8, 9]
    assert sampler.dropped("p", "u") == 4
    state.reset_consumption("p", "t")  # the rows come back for t: its count restarts
    assert sampler.dropped("p", "t") == 0 and sampler.dropped("p", "u") == 4
    state.clear_partition("p")
    assert sampler.dropped("p", "u") == 0


def test_grpo_keep_group_drops_while_the_batch_waits_to_fill() -> None:
    seen: list[list[dict[str, Any]]] = []

    def keep(tags: list[dict[str, Any]]) -> bool:
        seen.append(tags)
        return distinct_rewards(tags)

    sampler = GRPOGroupNSampler(n_samples_per_prompt=2, keep_group=keep)
    state = ControllerState(sampler=sampler)
    state.create_partition("p", expected_size=8)
    fill(state, "p", reward_tags([[1, 1], [0, 1], [2]]))  # one dropped, one kept, one partial
    assert state.get_meta("p", "t", ["x"], 4) is None  # one kept group: wait for another
    assert state.partition_info("p").consumed == {"t": 2}  # the dropped group went at once
    assert sampler.dropped("p", "t") == 2
    assert seen[0] == [{"uid": 0, "reward": 1}, {"uid": 0, "reward": 1}]  # plain tag dicts
    fill(state, "p", [{"uid": 2, "reward": 3}])
    meta = state.get_meta("p", "t", ["x"], 4)
    assert meta is not None and meta.rows == [2, 3, 4, 5]
    assert sampler.dropped("p", "t") == 2  # counted once


class KeepFirstRewardPositive(GRPOGroupNSampler):
    def keep_group(self, tags: list[dict[str, Any]]) -> bool:
        return tags[0]["reward"] > 0


def test_grpo_keep_group_as_a_subclass_method_and_errors() -> None:
    sampler = KeepFirstRewardPositive(n_samples_per_prompt=2)
    assert sampler.filters and not GRPOGroupNSampler(2).filters
    tags = tag_fn({r: t for r, t in enumerate(reward_tags([[0, 5], [1, 0]]))})
    assert sampler.sample([0, 1, 2, 3], 2, tags=tags) == ([2, 3], [2, 3, 0, 1])
    none = GRPOGroupNSampler(n_samples_per_prompt=2, keep_group=lambda tags: None)
    with pytest.raises(SamplerError, match="returned None"):
        none.sample([0, 1], 2, tags=tags)
    broken = GRPOGroupNSampler(n_samples_per_prompt=2, keep_group=lambda tags: tags[0]["nope"])
    with pytest.raises(SamplerError, match=r"keep_group failed on the group of rows \[0, 1\]"):
        broken.sample([0, 1], 2, tags=tags)
    with pytest.raises(SamplerError, match="callable"):
        GRPOGroupNSampler(2, keep_group=True)  # type: ignore[arg-type]
    assert GRPOGroupNSampler(2).stats("p", "t") == {}  # no filter: nothing to report


# ------------------------------------------------------------------ rank aware


def rank_cfg(group: int, step: int, group_size: int = 2, num_groups: int = 2) -> dict[str, int]:
    return {
        "dp_rank": group,
        "batch_index": step,
        "group_size": group_size,
        "num_groups": num_groups,
    }


def test_rank_aware_same_batch_within_a_group_disjoint_across() -> None:
    state = ControllerState(sampler="rank_aware")
    fill(state, "p", [{}] * 8)
    a0 = state.get_meta("p", "t", ["x"], 2, rank_cfg(0, 0))
    b0 = state.get_meta("p", "t", ["x"], 2, rank_cfg(1, 0))
    a1 = state.get_meta("p", "t", ["x"], 2, rank_cfg(0, 0))  # the other member of group 0
    b1 = state.get_meta("p", "t", ["x"], 2, rank_cfg(1, 0))
    assert a0 is not None and a1 is not None and b0 is not None and b1 is not None
    assert a0.rows == a1.rows == [0, 1]
    assert b0.rows == b1.rows == [2, 3]
    # the whole round was consumed when it was formed
    assert state.partition_info("p").consumed == {"t": 4}
    assert isinstance(state.sampler, RankAwareSampler)
    assert state.sampler.cached_rounds() == 0  # every member fetched: cache dropped


def test_rank_aware_waits_for_a_whole_round() -> None:
    state = ControllerState(sampler=RankAwareSampler(num_groups=2, group_size=1))
    fill(state, "p", [{}] * 3)
    assert state.get_meta("p", "t", ["x"], 2, {"dp_rank": 0, "batch_index": 0}) is None
    fill(state, "p", [{}])
    meta = state.get_meta("p", "t", ["x"], 2, {"dp_rank": 1, "batch_index": 0})
    assert meta is not None and meta.rows == [2, 3]


def test_rank_aware_lagging_member_gets_every_batch_then_the_end() -> None:
    state = ControllerState(sampler="rank_aware")
    state.create_partition("p", expected_size=11)
    fill(state, "p", [{}] * 11)
    fast: list[list[int]] = []
    for step in range(4):
        for group in (0, 1):
            meta = state.get_meta("p", "t", ["x"], 2, rank_cfg(group, step))
            assert meta is not None
            if group == 0:
                fast.append(meta.rows)
    # rounds 0 and 1 take 4 rows each; the 3 left are split 2 / 1; then the stream ends
    assert fast == [[0, 1], [4, 5], [8, 9], []]
    lagging = [state.get_meta("p", "t", ["x"], 2, rank_cfg(0, s)) for s in range(4)]
    assert [m.rows for m in lagging if m is not None] == [[0, 1], [4, 5], [8, 9], []]
    group1 = [state.get_meta("p", "t", ["x"], 2, rank_cfg(1, s)) for s in range(4)]
    assert [m.rows for m in group1 if m is not None] == [[2, 3], [6, 7], [10], []]
    assert state.check_consumption_status("t", "p")
    assert isinstance(state.sampler, RankAwareSampler) and state.sampler.cached_rounds() == 0


def test_rank_aware_leftovers_fewer_than_groups_stay_unconsumed() -> None:
    state = ControllerState(sampler="rank_aware")
    state.create_partition("p", expected_size=5)
    fill(state, "p", [{}] * 5)
    cfg = {"group_size": 1, "num_groups": 3}
    first = [
        state.get_meta("p", "t", ["x"], 1, {**cfg, "dp_rank": g, "batch_index": 0})
        for g in range(3)
    ]
    assert [m.rows for m in first if m is not None] == [[0], [1], [2]]
    ends = [
        state.get_meta("p", "t", ["x"], 1, {**cfg, "dp_rank": g, "batch_index": 1})
        for g in range(3)
    ]
    assert all(m is not None and m.is_empty for m in ends)
    assert state.partition_info("p").consumed == {"t": 3}
    assert not state.check_consumption_status("t", "p")


def test_rank_aware_drop_last_hands_out_no_short_round() -> None:
    state = ControllerState(sampler="rank_aware")
    state.seal("p")
    state.reset_consumption("p")
    state.clear_partition("p")
    state.create_partition("p", expected_size=5)
    fill(state, "p", [{}] * 5)
    full = state.get_meta("p", "t", ["x"], 2, rank_cfg(0, 0, group_size=1), drop_last=True)
    assert full is not None and full.rows == [0, 1]
    end = state.get_meta("p", "t", ["x"], 2, rank_cfg(0, 1, group_size=1), drop_last=True)
    assert end is not None and end.is_empty


def test_rank_aware_config_errors() -> None:
    s = RankAwareSampler()
    for key in ("dp_rank", "batch_index", "group_size", "num_groups"):
        cfg = rank_cfg(0, 0)
        del cfg[key]
        with pytest.raises(SamplerError, match=key):
            s.sample([0, 1], 1, **cfg)
    with pytest.raises(SamplerError, match="< num_groups"):
        s.sample([0, 1], 1, **rank_cfg(2, 0))
    with pytest.raises(ValueError, match="batch_index"):
        s.sample([0, 1], 1, **{**rank_cfg(0, 0), "batch_index": -1})


def test_rank_aware_over_fetch_is_an_error_and_hooks_drop_caches() -> None:
    s = RankAwareSampler(num_groups=1, group_size=1)
    ctx = {"partition_id": "p", "task_name": "t"}
    assert s.sample([0, 1], 1, dp_rank=0, batch_index=0, **ctx) == ([0], [0])
    assert s.cached_rounds() == 0
    s2 = RankAwareSampler(num_groups=2, group_size=1)
    s2.sample([0, 1], 1, dp_rank=0, batch_index=0, **ctx)
    with pytest.raises(SamplerError, match="new batch_index"):
        s2.sample([], 1, dp_rank=0, batch_index=0, **ctx)
    assert s2.cached_rounds() == 1
    s2.on_reset("p", "other")
    assert s2.cached_rounds() == 1
    s2.on_reset("p", "t")
    assert s2.cached_rounds() == 0
    s2.sample([0, 1], 1, dp_rank=0, batch_index=0, **ctx)
    s2.on_clear("p")
    assert s2.cached_rounds() == 0


def test_state_clear_and_reset_reach_the_sampler() -> None:
    sampler = RankAwareSampler(num_groups=2, group_size=1)
    state = ControllerState(sampler=sampler)
    fill(state, "p", [{}] * 4)
    state.get_meta("p", "t", ["x"], 1, {"dp_rank": 0, "batch_index": 0})
    assert sampler.cached_rounds() == 1
    state.reset_consumption("p", "t")
    assert sampler.cached_rounds() == 0
    state.get_meta("p", "t", ["x"], 1, {"dp_rank": 0, "batch_index": 0})
    state.clear_partition("p")
    assert sampler.cached_rounds() == 0


# ------------------------------------------------------------------ seqlen balanced


def brute_force_max(values: list[float], k: int) -> float:
    """The optimal largest part sum with part sizes as even as possible."""
    n = len(values)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    best = float("inf")

    def rec(i: int, sums: list[float], counts: list[int]) -> None:
        nonlocal best
        if max(sums) >= best:
            return
        if i == n:
            best = max(sums)
            return
        seen = set()
        for p in range(k):
            if counts[p] < sizes[p] and (sums[p], counts[p], sizes[p]) not in seen:
                seen.add((sums[p], counts[p], sizes[p]))  # symmetric parts: try one
                sums[p] += values[i]
                counts[p] += 1
                rec(i + 1, sums, counts)
                sums[p] -= values[i]
                counts[p] -= 1

    rec(0, [0.0] * k, [0] * k)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_partition_is_within_5_percent_of_optimal(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        k = rng.choice([2, 3, 4])
        n = rng.randint(k, min(12, 4 * k))
        values = [float(rng.randint(1, 4096)) for _ in range(n)]
        parts = balanced_partition(values, k)
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        got = max(sum(values[i] for i in p) for p in parts)
        assert got <= 1.05 * brute_force_max(values, k)


def test_balanced_partition_large_inputs_are_near_the_lower_bound() -> None:
    rng = random.Random(7)
    values = [float(rng.randint(1, 8192)) for _ in range(512)]
    parts = balanced_partition(values, 8)
    assert all(len(p) == 64 for p in parts)
    assert max(sum(values[i] for i in p) for p in parts) <= 1.01 * sum(values) / 8


def seqlen_tags(n: int, per_group: int, rng: random.Random) -> list[dict[str, Any]]:
    return [{"uid": i // per_group, "total_lengths": rng.randint(1, 4096)} for i in range(n)]


def test_seqlen_balanced_shares_are_disjoint_balanced_whole_groups() -> None:
    rng = random.Random(3)
    state = ControllerState(sampler=SeqlenBalancedSampler(n_samples_per_prompt=2, dp_size=4))
    tags = seqlen_tags(40, 2, rng)
    fill(state, "p", tags)
    shares = [
        state.get_meta("p", "t", ["x"], 4, {"dp_rank": r, "batch_index": 0}) for r in range(4)
    ]
    rows = [m.rows for m in shares if m is not None]
    assert [len(r) for r in rows] == [4, 4, 4, 4]
    flat = sorted(r for share in rows for r in share)
    assert flat == list(range(16))  # the first 8 whole groups, each row handed out once
    sums = [sum(tags[r]["total_lengths"] for r in share) for share in rows]
    lengths = [float(tags[r]["total_lengths"]) for r in flat]
    assert max(sums) <= 1.05 * brute_force_max(lengths, 4)
    assert state.partition_info("p").consumed == {"t": 16}
    nxt = state.get_meta("p", "t", ["x"], 4, {"dp_rank": 2, "batch_index": 1})
    assert nxt is not None and set(nxt.rows) <= set(range(16, 32))


def test_seqlen_balanced_final_partial_round_and_errors() -> None:
    rng = random.Random(4)
    sampler = SeqlenBalancedSampler(n_samples_per_prompt=2, dp_size=2)
    state = ControllerState(sampler=sampler)
    state.create_partition("p", expected_size=7)
    fill(state, "p", seqlen_tags(7, 2, rng))  # 3 whole groups + 1 partial
    metas = [state.get_meta("p", "t", ["x"], 4, {"dp_rank": r, "batch_index": 0}) for r in (0, 1)]
    assert sorted(len(m) for m in metas if m is not None) == [3, 3]
    end = state.get_meta("p", "t", ["x"], 4, {"dp_rank": 0, "batch_index": 1})
    assert end is not None and end.is_empty
    assert sampler.cached_rounds() == 0
    with pytest.raises(SamplerError, match="dp_rank"):
        state.get_meta("p", "t", ["x"], 4, {"batch_index": 2})
    with pytest.raises(SamplerError, match="multiple of n_samples_per_prompt"):
        state.get_meta("p", "t", ["x"], 3, {"dp_rank": 0, "batch_index": 2, "dp_size": 1})


def test_seqlen_balanced_needs_the_length_tag() -> None:
    state = ControllerState(sampler=SeqlenBalancedSampler(dp_size=2))
    fill(state, "p", [{}] * 4)
    with pytest.raises(SamplerError, match="total_lengths"):
        state.get_meta("p", "t", ["x"], 2, {"dp_rank": 0, "batch_index": 0})
    assert state.partition_info("p").consumed == {"t": 0}  # a failed request changes nothing


# ------------------------------------------------------------------ token budget


def budget_state(
    lengths: list[int], dp: int, budget: int, *, expected: int | None = None, **kw: Any
) -> ControllerState:
    state = ControllerState(sampler=TokenBudgetSampler(budget, dp_size=dp, **kw))
    state.create_partition("p", expected_size=len(lengths) if expected is None else expected)
    fill(state, "p", [{"seq_len": n, "uid": i // 2} for i, n in enumerate(lengths)])
    return state


def drain(
    state: ControllerState, dp: int, batch: int, rank_major: bool = False, **kw: Any
) -> list[list[list[int]]]:
    """Every rank's micro-batches until its stream ends: round-robin over the ranks by
    micro-batch index, or (``rank_major``) each rank all the way before the next."""
    out: list[list[list[int]]] = [[] for _ in range(dp)]
    done = [False] * dp
    order = (
        [(r, k) for r in range(dp) for k in range(10_000)]
        if rank_major
        else [(r, k) for k in range(10_000) for r in range(dp)]
    )
    for r, k in order:
        if done[r]:
            continue
        meta = state.get_meta("p", "t", ["x"], batch, {"dp_rank": r, "batch_index": k}, **kw)
        assert meta is not None, "a complete partition never makes a rank wait"
        if meta.is_empty:
            done[r] = True
            if all(done):
                break
        else:
            out[r].append(meta.rows)
    return out


def steps_of(micro_batches: list[list[int]], batch: int) -> list[list[list[int]]]:
    """A rank's micro-batches grouped into steps of ``batch`` rows (the last may be short)."""
    steps: list[list[list[int]]] = [[]]
    for mb in micro_batches:
        if sum(map(len, steps[-1])) == batch:
            steps.append([])
        steps[-1].append(mb)
    return steps


def check_budget(micro_batches: list[list[int]], lengths: list[int], budget: int) -> None:
    for mb in micro_batches:
        assert mb and (len(mb) == 1 or sum(lengths[r] for r in mb) <= budget), mb


@pytest.mark.parametrize("seed", range(4))
def test_token_budget_respected_and_equal_micro_batch_counts_every_step(seed: int) -> None:
    rng = random.Random(seed)
    dp, batch, budget = 4, 6, 1000
    lengths = [rng.randint(10, 900) for _ in range(dp * batch * 3)]
    got = drain(budget_state(lengths, dp, budget), dp, batch)
    per_rank_steps = [steps_of(mbs, batch) for mbs in got]
    for r in range(dp):
        check_budget(got[r], lengths, budget)
        assert len(per_rank_steps[r]) == 3
        assert all(sum(map(len, step)) == batch for step in per_rank_steps[r])
    for s in range(3):  # every rank: the same number of micro-batches in every step
        assert len({len(steps[s]) for steps in per_rank_steps}) == 1
        step_rows = sorted(r for steps in per_rank_steps for mb in steps[s] for r in mb)
        assert step_rows == list(range(s * dp * batch, (s + 1) * dp * batch))  # in row order
        tokens = [sum(lengths[r] for mb in steps[s] for r in mb) for steps in per_rank_steps]
        assert max(tokens) <= 1.1 * sum(tokens) / dp  # ranks balanced by length


def test_token_budget_rows_over_budget_get_micro_batches_of_their_own() -> None:
    lengths = [500, 20, 30, 40, 130, 10, 60, 70]  # budget 100: 500 and 130 are over it
    got = drain(budget_state(lengths, 2, 100), 2, 4)
    assert [500] in [[lengths[r] for r in mb] for mb in got[0] + got[1]]
    assert [130] in [[lengths[r] for r in mb] for mb in got[0] + got[1]]
    assert len(got[0]) == len(got[1])
    for mbs in got:
        check_budget(mbs, lengths, 100)
    assert sorted(r for mbs in got for mb in mbs for r in mb) == list(range(8))


def test_token_budget_counts_padded_by_splitting_the_heaviest_micro_batch() -> None:
    # rank shares by length balance: one rank's rows fit one micro-batch, the other needs 3
    lengths = [90, 90, 90, 30, 30, 30, 30, 30, 30, 30, 30, 30]
    got = drain(budget_state(lengths, 2, 100), 2, 6)
    assert len(got[0]) == len(got[1]) >= 2
    for mbs in got:
        check_budget(mbs, lengths, 100)
        assert sum(map(len, mbs)) == 6


def test_token_budget_end_of_stream_uneven_tail_flushed_evenly() -> None:
    rng = random.Random(11)
    dp, batch, budget = 3, 4, 300
    lengths = [rng.randint(5, 250) for _ in range(dp * batch + 7)]  # one step + a tail of 7
    for rank_major in (False, True):
        state = budget_state(lengths, dp, budget)
        got = drain(state, dp, batch, rank_major=rank_major)
        assert len({len(mbs) for mbs in got}) == 1  # equal counts, tail included
        tails = [steps_of(mbs, batch)[-1] for mbs in got]
        assert sorted(sum(map(len, t)) for t in tails) == [2, 2, 3]  # the tail, evenly
        assert sorted(r for mbs in got for mb in mbs for r in mb) == list(range(len(lengths)))
        assert state.check_consumption_status("t", "p")
        assert isinstance(state.sampler, TokenBudgetSampler)
        assert state.sampler.cached_rounds() == 0  # every micro-batch fetched: none cached
        for mbs in got:
            check_budget(mbs, lengths, budget)


def test_token_budget_tail_that_cannot_split_evenly_leaves_rows_unconsumed() -> None:
    # 3 rows that cannot share a micro-batch over 2 ranks: one stays, so counts stay equal
    state = budget_state([150, 160, 5], 2, 100)
    got = drain(state, 2, 4)
    assert got == [[[1]], [[0]]] or got == [[[0]], [[1]]]
    assert state.partition_info("p").consumed == {"t": 2}
    assert not state.check_consumption_status("t", "p")
    # fewer rows than ranks: nothing handed out, the stream still ends on every rank
    assert drain(budget_state([10], 2, 100), 2, 4) == [[], []]


def test_token_budget_is_deterministic_and_waits_for_a_whole_step() -> None:
    rng = random.Random(5)
    lengths = [rng.randint(1, 100) for _ in range(24)]
    assert drain(budget_state(lengths, 2, 150), 2, 6) == drain(budget_state(lengths, 2, 150), 2, 6)
    state = budget_state(lengths[:5], 2, 150, expected=24)
    assert state.get_meta("p", "t", ["x"], 3, {"dp_rank": 1, "batch_index": 0}) is None
    assert state.partition_info("p").consumed == {"t": 0}


def test_token_budget_drop_last_hands_out_no_short_step() -> None:
    lengths = [10] * 11
    got = drain(budget_state(lengths, 2, 100), 2, 4, drop_last=True)
    assert sorted(r for mbs in got for mb in mbs for r in mb) == list(range(8))


def test_token_budget_whole_groups_and_group_size() -> None:
    lengths = [40, 60, 10, 90, 50, 50, 20, 30]  # uid = row // 2
    sampler = TokenBudgetSampler(100, dp_size=2, n_samples_per_prompt=2)
    state = ControllerState(sampler=sampler)
    fill(state, "p", [{"seq_len": n, "uid": i // 2} for i, n in enumerate(lengths)])
    state.seal("p")
    cfg = {"group_size": 2}
    first = [
        state.get_meta("p", "t", ["x"], 4, {**cfg, "dp_rank": r, "batch_index": 0})
        for r in (0, 1, 0, 1)
    ]
    assert first[0] is not None and first[2] is not None and first[0].rows == first[2].rows
    assert state.partition_info("p").consumed == {"t": 8}
    with pytest.raises(SamplerError, match="already fetched"):
        state.get_meta("p", "t", ["x"], 4, {**cfg, "dp_rank": 0, "batch_index": 0})


def test_token_budget_index_ahead_forms_the_steps_before_it() -> None:
    # DataLoader workers (index_offset, index_stride) may ask for a later micro-batch first
    state = budget_state([60, 60, 60, 60, 10, 10, 10, 10], 1, 100)
    later = state.get_meta("p", "t", ["x"], 4, {"dp_rank": 0, "batch_index": 4})
    assert later is not None and later.rows == [4, 5, 6, 7]  # step 1: one micro-batch
    assert state.partition_info("p").consumed == {"t": 8}  # step 0 was formed on the way
    first = [state.get_meta("p", "t", ["x"], 4, {"dp_rank": 0, "batch_index": k}) for k in range(4)]
    assert [m.rows for m in first if m is not None] == [[0], [1], [2], [3]]  # 60s: one each


def test_token_budget_config_errors_and_hooks() -> None:
    s = TokenBudgetSampler(100)
    ctx = {"partition_id": "p", "task_name": "t", "tags": tag_fn({0: {"seq_len": 1}})}
    with pytest.raises(SamplerError, match="dp_size"):
        s.sample([0], 1, dp_rank=0, batch_index=0, **ctx)
    with pytest.raises(SamplerError, match="max_tokens_per_micro_batch"):
        TokenBudgetSampler().sample([0], 1, dp_rank=0, batch_index=0, dp_size=1, **ctx)
    with pytest.raises(SamplerError, match="< dp_size"):
        s.sample([0], 1, dp_rank=2, batch_index=0, dp_size=2, **ctx)
    with pytest.raises(SamplerError, match="seq_len"):
        s.sample([1], 1, dp_rank=0, batch_index=0, dp_size=1, tags=tag_fn({}))
    assert s.sample([0], 1, dp_rank=0, batch_index=0, dp_size=1, **ctx) == ([0], [0])
    with pytest.raises(SamplerError, match="already fetched"):
        s.sample([], 1, dp_rank=0, batch_index=0, dp_size=1, **ctx)
    s.on_reset("p", "t")  # consumption reset: micro-batch numbering starts again
    assert s.sample([0], 1, dp_rank=0, batch_index=0, dp_size=1, **ctx) == ([0], [0])
    s.on_clear("p")
    assert s.sample([0], 1, dp_rank=0, batch_index=0, dp_size=1, **ctx) == ([0], [0])
    assert s.candidate_limit(4, dp_size=2) is None  # a later index must see every ready row
    # the budget may come with the sampling_config ("token_budget" by name, no arguments)
    named = resolve_sampler("token_budget")
    cfg = {"dp_rank": 0, "batch_index": 0, "dp_size": 1, "max_tokens_per_micro_batch": 5}
    assert isinstance(named, TokenBudgetSampler)
    assert named.sample([0], 1, **cfg, **ctx) == ([0], [0])


def test_pack_under_budget_and_split_to_count() -> None:
    values = [5.0, 1.0, 7.0, 3.0, 12.0, 2.0]
    bins = pack_under_budget(values, 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(len(b) == 1 or sum(values[i] for i in b) <= 10 for b in bins)
    assert [4] in bins and len(bins) == 3  # 12 alone; 7+3, 5+1+2 (first-fit decreasing)
    more = split_to_count(values, bins, 5)
    assert len(more) == 5 and sorted(i for b in more for i in b) == list(range(6))
    assert max(sum(values[i] for i in b) for b in more) <= 12
    with pytest.raises(ValueError, match="cannot fill"):
        split_to_count(values, bins, 7)
    assert pack_under_budget([], 10) == []


# ------------------------------------------------------------------ resolution and custom


class Recording(BaseSampler):
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def sample(
        self, ready_rows: list[int], batch_size: int, **kw: Any
    ) -> tuple[list[int], list[int]]:
        self.calls.append(kw)
        return ready_rows[-batch_size:], ready_rows[-batch_size:]


def test_custom_sampler_gets_the_context() -> None:
    sampler = Recording()
    state = ControllerState(sampler=sampler)
    fill(state, "p", [{"uid": 1}, {"uid": 2}, {"uid": 3}])
    meta = state.get_meta("p", "t", ["x"], 2, {"temperature": 1})
    assert meta is not None and meta.rows == [1, 2]
    kw = sampler.calls[0]
    assert kw["partition_id"] == "p" and kw["task_name"] == "t" and kw["temperature"] == 1
    assert kw["final"] is False and kw["drop_last"] is False
    assert dict(kw["tags"](2)) == {"uid": 3}
    with pytest.raises(TypeError):
        kw["tags"](2)["uid"] = 5  # read-only view
    with pytest.raises(SamplerError, match="partition_id"):
        state.get_meta("p", "t", ["x"], 2, {"partition_id": "q"})


def test_a_sampler_returning_unknown_rows_fails_the_request_only() -> None:
    class Bad(BaseSampler):
        def sample(self, ready_rows: list[int], batch_size: int, **kw: Any):
            return [99], [99]

    state = ControllerState(sampler=Bad())
    fill(state, "p", [{}])
    with pytest.raises(SamplerError, match="99"):
        state.get_meta("p", "t", ["x"], 1)
    assert state.partition_info("p").consumed == {"t": 0}


def test_resolve_sampler() -> None:
    assert isinstance(resolve_sampler(None), SequentialSampler)
    assert isinstance(resolve_sampler("sequential"), SequentialSampler)
    grpo = resolve_sampler("grpo", n_samples_per_prompt=4)
    assert isinstance(grpo, GRPOGroupNSampler) and grpo.n_samples_per_prompt == 4
    assert isinstance(resolve_sampler("rank_aware"), RankAwareSampler)
    assert isinstance(resolve_sampler("seqlen_balanced", dp_size=2), SeqlenBalancedSampler)
    assert isinstance(resolve_sampler(Recording), Recording)
    inst = Recording()
    assert resolve_sampler(inst) is inst
    path = resolve_sampler("transferqueue.controller.samplers:GRPOGroupNSampler", group_key="g")
    assert isinstance(path, GRPOGroupNSampler) and path.group_key == "g"


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("nope", {}, "unknown sampler"),
        ("no.such.module:Thing", {}, "cannot import"),
        ("transferqueue.controller.samplers:Nope", {}, "cannot import"),
        ("transferqueue.errors:SamplerError", {}, "BaseSampler"),
        (42, {}, "BaseSampler"),
        (SequentialSampler(), {"x": 1}, "instance"),
        ("grpo", {"bogus": 1}, "cannot construct"),
    ],
)
def test_resolve_sampler_errors(spec: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SamplerError, match=match):
        resolve_sampler(spec, **kwargs)
