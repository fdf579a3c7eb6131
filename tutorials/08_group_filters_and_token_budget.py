"""Tutorial 08 -- group filters (DAPO) and token-budget micro-batches in lockstep.

Group filters
    ``GRPOGroupNSampler(n_samples_per_prompt=4, keep_group=fn)`` hands out whole GRPO
    groups (rows with the same ``uid`` tag). When a group is complete, ``fn`` gets the tag
    dicts of its rows and returns True to hand it out or False to drop it -- DAPO's dynamic
    sampling drops a group whose rewards are all equal, since its advantages are all zero.
    A dropped group is marked consumed for the task without being returned, so the stream
    still ends, and counted: ``sampler.dropped(partition_id, task_name)`` (rows),
    ``sampler.dropped_groups(...)``, ``sampler.stats(...)``. Configure the instance with
    ``tq.init({"controller": {"sampler": GRPOGroupNSampler(4, keep_group=fn)}})`` on inproc;
    on zmq and ray, where the controller runs in another process and a function cannot
    travel, subclass ``GRPOGroupNSampler``, define ``keep_group(self, tags)`` and give the
    class by import path, ``"my_package.samplers:DynamicSampling"``.

Token-budget micro-batches
    ``TokenBudgetSampler(max_tokens_per_micro_batch, length_key="seq_len", dp_size=...)``
    gives every data-parallel rank micro-batches whose summed ``seq_len`` tags stay within
    the budget (a row longer than the budget is a micro-batch of its own), and the same
    number of micro-batches on every rank in every step, so collectives never hang.
    Calling convention: one ``get_meta`` per micro-batch -- ``StreamingDataset`` /
    ``stream`` with ``sampling_config={"dp_rank": r, "dp_size": dp}`` and no
    ``micro_batch_size`` yield one micro-batch per item (they keep ``batch_index``, the
    micro-batch counter, themselves). ``batch_size`` is the rows of one optimizer step per
    rank: each step is exactly that many rows on every rank, balanced by length across
    ranks, so the trainer steps its optimizer every ``batch_size`` rows (the number of
    micro-batches varies from step to step, never across ranks). At the end of the stream
    the rows left are flushed as a short last step, spread evenly over the ranks; rows that
    could not give every rank the same number of micro-batches (or fewer rows than ranks)
    stay unconsumed, and every rank's stream then ends after the same count. The same ready
    rows give the same micro-batches.

Ranks are threads here to keep the tutorial in one process; in a real job each rank is its
own process and builds the same dataset from the config ``tq.init`` returned.

Run: python tutorials/08_group_filters_and_token_budget.py
"""

from __future__ import annotations

import random
import threading
from typing import Any

import torch

import transferqueue as tq
from transferqueue.controller.samplers import GRPOGroupNSampler, TokenBudgetSampler


def has_signal(tags: list[dict[str, Any]]) -> bool:
    """DAPO's dynamic sampling: keep a group only if its rewards differ."""
    return len({t["reward"] for t in tags}) > 1


def group_filter() -> None:
    n = 4  # responses per prompt
    sampler = GRPOGroupNSampler(n_samples_per_prompt=n, keep_group=has_signal)
    tq.init({"controller": {"sampler": sampler}})
    client = tq.get_client()
    rewards = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]]
    tags = [{"uid": p, "reward": r} for p, rs in enumerate(rewards) for r in rs]
    client.create_partition("rollout@0", expected_size=len(tags))
    client.put({"reward": torch.tensor([t["reward"] for t in tags])}, "rollout@0", tags=tags)
    handed_out = []
    while not (meta := client.get_meta(["reward"], 2 * n, "rollout@0", "update_actor")).is_empty:
        uids = sorted({t["uid"] for t in meta.tags})
        print(f"batch: prompts {uids}, rewards {client.get_data(meta)['reward'].tolist()}")
        handed_out += uids
    dropped = sampler.dropped("rollout@0", "update_actor")
    print(f"dropped: {sampler.dropped_groups('rollout@0', 'update_actor')} groups, {dropped} rows")
    assert handed_out == [0, 2, 4] and dropped == 2 * n
    assert client.check_consumption_status("update_actor", "rollout@0")  # the stream ended
    tq.close()


DP, BATCH, BUDGET, N = 2, 6, 1024, 30  # 2 ranks, 6 rows per rank and step, 30 rows in all


def train(rank: int, out: dict[int, list[list[int]]]) -> None:
    dataset = tq.StreamingDataset(
        data_fields=["input_ids"],
        batch_size=BATCH,  # rows per rank and optimizer step
        partition_id="train@0",
        task_name="update_actor",
        sampling_config={"dp_rank": rank, "dp_size": DP},  # batch_index: kept for us
    )
    steps, step, rows_in_step = [], [], 0
    for data, meta in tq.StreamingDataLoader(dataset):  # one micro-batch per item
        tokens = sum(t["seq_len"] for t in meta.tags)
        assert len(meta) == 1 or tokens <= BUDGET
        assert sum(t.numel() for t in data["input_ids"].unbind()) == tokens  # data = tags
        step.append(tokens)  # forward/backward on `data` would go here
        rows_in_step += len(meta)
        if rows_in_step == BATCH:  # every rank: a step is BATCH rows
            steps.append(step)  # optimizer.step() would go here
            step, rows_in_step = [], 0
    if step:
        steps.append(step)  # the short last step, at the end of the stream
    out[rank] = steps


def token_budget() -> None:
    tq.init({"controller": {"sampler": TokenBudgetSampler(BUDGET, dp_size=DP)}})
    client = tq.get_client()
    client.create_partition("train@0", expected_size=N)
    rng = random.Random(0)
    lengths = [rng.randint(64, 900) for _ in range(N - 1)] + [1500]  # the last: over budget

    out: dict[int, list[list[int]]] = {}
    ranks = [threading.Thread(target=train, args=(r, out)) for r in range(DP)]
    for t in ranks:
        t.start()  # the trainers start first
    for start in range(0, N, 5):  # the rollout writes 5 samples at a time
        chunk = lengths[start : start + 5]
        client.put(
            {"input_ids": [torch.ones(n, dtype=torch.int64) for n in chunk]},
            partition_id="train@0",
            tags=[{"seq_len": n} for n in chunk],
        )
    for t in ranks:
        t.join(timeout=60)
    for rank in range(DP):
        print(f"rank {rank}: tokens per micro-batch, step by step: {out[rank]}")
    counts = [[len(step) for step in out[r]] for r in range(DP)]
    assert counts[0] == counts[1]  # the same number of micro-batches in every step
    assert client.check_consumption_status("update_actor", "train@0")
    tq.close()


def main() -> None:
    group_filter()
    token_budget()
    print("group filters and token budget: OK")


if __name__ == "__main__":
    main()
