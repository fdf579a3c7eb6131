"""Tutorial 01 -- quick start: init, put, get_meta, get_data, close.

Run: python tutorials/01_quick_start.py
"""

from __future__ import annotations

import torch

import transferqueue as tq


def main() -> None:
    # Start a system in this process (the default "inproc" transport): a controller that
    # tracks which fields of which rows are ready, and storage units that hold the bytes.
    tq.init()
    client = tq.get_client()

    # Put a batch of 4 samples into partition "train@0". Columns may be dense tensors,
    # lists of tensors of different lengths (stored jagged) or lists of plain values.
    meta = client.put(
        {
            "input_ids": torch.arange(12).reshape(4, 3),
            "responses": [torch.arange(n) for n in (2, 5, 3, 1)],
            "text": ["a", "b", "c", "d"],
        },
        partition_id="train@0",
    )
    print("put rows:", meta.rows)

    # A consumer (a "task") asks for rows whose fields are ready. get_meta waits until it can
    # fill the batch and marks the rows consumed for this task; get_data fetches the bytes.
    meta = client.get_meta(
        ["input_ids", "responses"], batch_size=4, partition_id="train@0", task_name="update_actor"
    )
    batch = client.get_data(meta)  # a TensorDict, rows in meta order
    print("got rows:", meta.rows, "input_ids:", batch["input_ids"].tolist())
    print("response lengths:", [len(r) for r in batch["responses"].unbind()])

    # Tasks are independent: another task reads the same rows again.
    other = client.get_meta(["text"], 4, "train@0", task_name="compute_log_prob")
    print("another task got:", list(client.get_data(other)["text"]))

    client.clear_partition("train@0")  # free the partition's bytes
    tq.close()
    print("quick start: OK")


if __name__ == "__main__":
    main()
