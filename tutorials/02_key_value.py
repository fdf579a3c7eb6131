"""Tutorial 02 -- the key-value API: samples addressed by a string key.

Run: python tutorials/02_key_value.py
"""

from __future__ import annotations

import torch

import transferqueue as tq


def main() -> None:
    tq.init()

    # Write three samples under keys; tags are small per-sample dicts (status, scores, ...).
    keys = ["prompt-0", "prompt-1", "prompt-2"]
    tq.kv_batch_put(
        keys,
        partition_id="rollouts",
        fields={"input_ids": torch.arange(6).reshape(3, 2), "text": ["x", "y", "z"]},
        tags=[{"status": "pending"} for _ in keys],
    )

    # A tag-only put is how a framework tracks sample status; a new field extends the rows.
    tq.kv_batch_put(["prompt-1"], "rollouts", tags=[{"status": "done", "score": 0.5}])
    tq.kv_batch_put(["prompt-1"], "rollouts", fields={"reward": torch.tensor([1.0])})

    # Read by key, in key order; select_fields picks fields (every key must have them).
    batch = tq.kv_batch_get(["prompt-2", "prompt-0"], "rollouts", select_fields=["input_ids"])
    print("input_ids of prompt-2, prompt-0:", batch["input_ids"].tolist())
    print("prompt-1 reward:", tq.kv_batch_get(["prompt-1"], "rollouts")["reward"].tolist())

    # kv_list: {partition: {key: tags}}.
    print("status:", {k: t["status"] for k, t in tq.kv_list("rollouts")["rollouts"].items()})

    # kv_clear forgets keys (and frees their bytes); a missing key raises KeyError naming it.
    tq.kv_clear(["prompt-0"], "rollouts")
    try:
        tq.kv_batch_get(["prompt-0"], "rollouts")
    except KeyError as exc:
        print("after kv_clear:", type(exc).__name__)
    print("keys left:", sorted(tq.kv_list("rollouts")["rollouts"]))

    tq.close()
    print("key-value: OK")


if __name__ == "__main__":
    main()
