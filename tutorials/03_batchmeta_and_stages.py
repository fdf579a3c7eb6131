"""Tutorial 03 -- BatchMeta and multi-stage fields.

A row gains fields over time: prompts, then responses, then rewards. Each stage is a task
that asks for the fields it needs and writes its output back into the same rows with
``put(..., metadata=meta)``. A BatchMeta is the handle on a batch: partition, rows, fields
and per-row tags -- no data.

Run: python tutorials/03_batchmeta_and_stages.py
"""

from __future__ import annotations

import torch

import transferqueue as tq
from transferqueue import BatchMeta


def main() -> None:
    tq.init()
    client = tq.get_client()
    pid = "train@0"

    # Stage 0: prompts, with a per-row "uid" tag (the prompt group a sample belongs to).
    client.put(
        {"prompts": torch.arange(12).reshape(6, 2)},
        partition_id=pid,
        tags=[{"uid": i // 2} for i in range(6)],
    )

    # Stage 1 ("rollout"): read prompts, write responses (jagged) into the same rows.
    meta = client.get_meta(["prompts"], batch_size=6, partition_id=pid, task_name="rollout")
    print(
        "rollout got rows", meta.rows, "fields", meta.fields, "uids", [t["uid"] for t in meta.tags]
    )
    prompts = client.get_data(meta)["prompts"]
    responses = [torch.arange(int(p[0]) % 4 + 1) for p in prompts]
    client.put({"responses": responses}, metadata=meta)

    # Stage 2 ("reward"): only rows with both fields are ready; it processes them in two
    # halves -- BatchMeta.chunk / split / concat work on metadata alone.
    meta = client.get_meta(["prompts", "responses"], 6, pid, task_name="reward")
    first, second = meta.chunk(2)
    for part in (first, second):
        lengths = [len(r) for r in client.get_data(part)["responses"].unbind()]
        client.put({"reward": torch.tensor(lengths, dtype=torch.float32)}, metadata=part)
    whole = BatchMeta.concat([first, second])
    print("chunks", [p.rows for p in (first, second)], "-> concat", whole.rows)

    # Stage 3 ("train"): every field is there now; select_fields narrows a meta.
    meta = client.get_meta(["prompts", "responses", "reward"], 6, pid, task_name="train")
    print("train reads", client.get_data(meta.select_fields(["reward"]))["reward"].tolist())

    # Production and consumption status, per field and per task.
    info = client.partition_info(pid)
    print("produced:", info.produced, "consumed:", info.consumed)

    client.clear_partition(pid)
    tq.close()
    print("batchmeta and stages: OK")


if __name__ == "__main__":
    main()
