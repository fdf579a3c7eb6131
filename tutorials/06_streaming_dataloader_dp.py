"""Tutorial 06 -- StreamingDataLoader with data-parallel ranks; reset and step.

Four trainer ranks: 2 data-parallel groups x 2 ranks per group (think tensor parallelism:
both ranks of a group must see the same data). With the RankAwareSampler both ranks of a
group get identical micro-batches, the two groups get disjoint ones, and every rank stops
after the same number of steps. Each rank streams micro-batches as soon as they are ready,
here while the producer is still writing.

Ranks are threads here to keep the tutorial in one process; in a real job each rank is its
own process and builds the same dataset from the config ``tq.init`` returned. With the zmq
or ray transport, ``StreamingDataLoader(ds, num_workers=2)`` also works: workers share the
task's rows, each delivered once.

Run: python tutorials/06_streaming_dataloader_dp.py
"""

from __future__ import annotations

import threading

import torch

import transferqueue as tq

GROUPS, RANKS_PER_GROUP, N = 2, 2, 32


def train(group: int, rank: int, out: dict[tuple[int, int], list[list[int]]]) -> None:
    dataset = tq.StreamingDataset(
        data_fields=["input_ids"],
        batch_size=4,  # rows per group and step
        partition_id="train@0",
        task_name="update_actor",
        micro_batch_size=2,  # each step's batch arrives as micro-batches of 2
        # the dataset keeps "batch_index" itself, one per step
        sampling_config={"dp_rank": group, "group_size": RANKS_PER_GROUP, "num_groups": GROUPS},
    )
    seen = []
    for data, meta in tq.StreamingDataLoader(dataset):
        assert data["input_ids"][:, 0].tolist() == meta.rows  # data and meta agree
        seen.append(meta.rows)  # a forward/backward pass on `data` would go here
    out[group, rank] = seen


def main() -> None:
    tq.init({"controller": {"sampler": "rank_aware"}})
    client = tq.get_client()
    client.create_partition("train@0", expected_size=N)  # the ranks know N samples come

    out: dict[tuple[int, int], list[list[int]]] = {}
    ranks = [
        threading.Thread(target=train, args=(g, r, out))
        for g in range(GROUPS)
        for r in range(RANKS_PER_GROUP)
    ]
    for t in ranks:
        t.start()  # the trainers start first
    for start in range(0, N, 4):  # the producer (a rollout) writes 4 samples at a time
        ids = torch.arange(start, start + 4)
        client.put({"input_ids": torch.stack([ids, ids * 10], dim=1)}, partition_id="train@0")
    for t in ranks:
        t.join()

    for g in range(GROUPS):
        same = out[g, 0] == out[g, 1]
        print(f"group {g}: {len(out[g, 0])} micro-batches, identical on both ranks: {same}")
    steps = {len(v) for v in out.values()}
    print("every rank took the same number of steps:", len(steps) == 1)

    # A second epoch over the same rows: reset() gives them back to the task (call it once,
    # when every rank has finished the epoch).
    # (The sampler is chosen per system: under rank_aware a lone consumer is one group of one.)
    alone = {"dp_rank": 0, "group_size": 1, "num_groups": 1}
    replay = tq.StreamingDataset(["input_ids"], 8, "train@0", "epoch-demo", sampling_config=alone)
    print("epoch 1:", sum(len(m) for _, m in tq.StreamingDataLoader(replay)), "rows")
    replay.reset()
    print("epoch 2:", sum(len(m) for _, m in tq.StreamingDataLoader(replay)), "rows")

    # step(partition_id): move on to the next partition (e.g. the next training step).
    client.put({"input_ids": torch.zeros(3, 2, dtype=torch.int64)}, partition_id="train@1")
    client.seal("train@1")
    replay.step("train@1")
    print("train@1:", sum(len(m) for _, m in tq.StreamingDataLoader(replay)), "rows")
    tq.close()
    print("streaming dataloader with DP ranks: OK")


if __name__ == "__main__":
    main()
