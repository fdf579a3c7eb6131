"""Tutorial 12 -- tag-filtered waits: ``get_meta(where=...)`` and ``kv_list(min_count=...)``.

Frameworks track each sample's status in its tags (``{"status": "running"}``, then
``"finished"``) with tag-only puts: ``client.kv_put(keys, pid, tags=[...])`` writes no data.
Two waits build on that, both woken by the controller's commits, never by a timer:

- ``get_meta(fields, n, pid, task, where={"status": "finished"})``: only rows whose tags
  match (equality on each key) count as ready, so a stage waits for *finished* samples; a
  tag-only put that makes a row match wakes it. (A callable ``where`` works only where the
  controller runs in-process with ``runtime.inproc_codec: False``: functions do not travel.)
- ``kv_list(pid, where=..., min_count=n, timeout=...)`` returns as soon as n keys match
  (``TimeoutError`` after ``timeout``). It replaces the polling loop::

      while len(client.kv_list(pid, where={"status": "finished"}).get(pid, {})) < n:
          time.sleep(2)  # each sample waits up to 2 s more than it had to

Rollout workers are threads here to keep the tutorial in one process.

Run: python tutorials/12_tag_filtered_waits.py
"""

from __future__ import annotations

import threading

import torch

import transferqueue as tq

PID = "agent@0"


def where_waiter(client: tq.TransferQueueClient) -> None:
    keys = ["p0", "p1", "p2"]
    # a multi-turn agent loop: responses are written turn by turn while the sample runs
    client.kv_put(keys, PID, {"response": torch.zeros(3, 4)}, tags=[{"status": "running"}] * 3)

    got: list[tq.BatchMeta] = []

    def reward_stage() -> None:  # scores finished samples only
        got.append(
            client.get_meta(
                ["response"], 1, PID, "reward", where={"status": "finished"}, timeout=30
            )
        )

    thread = threading.Thread(target=reward_stage)
    thread.start()
    while client.partition_info(PID).waiting.get("reward", 0) < 1:  # it waits: the data is
        assert not got  # there, but no row is finished
    print(f"reward stage waiting: {client.partition_info(PID).waiting}")

    client.kv_put(["p1"], PID, tags=[{"status": "finished"}])  # tags only, no data
    thread.join(30)
    (meta,) = got
    print(f"woken by the tag-only put: row {meta.rows}, tags {meta.tags}")
    assert meta.rows == [1] and meta.tags[0]["status"] == "finished"
    client.kv_clear(keys, PID)


def kv_list_min_count(client: tq.TransferQueueClient) -> None:
    keys = [f"q{i}" for i in range(6)]
    client.kv_put(keys, PID, tags=[{"status": "running"}] * len(keys))
    go = threading.Event()

    def rollout_worker(mine: list[str]) -> None:
        go.wait(30)
        for key in mine:  # finish a sample: its data, then its status
            client.kv_put([key], PID, {"response": torch.ones(1, 4)}, tags=[{"status": "done"}])

    workers = [threading.Thread(target=rollout_worker, args=(keys[i::2],)) for i in range(2)]
    for w in workers:
        w.start()
    go.set()
    # the driver wants 4 finished samples: it returns as soon as 4 match, no polling loop
    found = client.kv_list(PID, where={"status": "done"}, min_count=4, timeout=30)[PID]
    print(f"at least 4 finished: {sorted(found)}")
    assert len(found) >= 4 and all(tags["status"] == "done" for tags in found.values())
    data = client.kv_get(sorted(found), PID, select_fields="response")
    assert data["response"].shape == (len(found), 4)
    for w in workers:
        w.join(30)

    try:  # more than will ever match: a TimeoutError after `timeout`
        client.kv_list(PID, where={"status": "done"}, min_count=7, timeout=0.2)
        raise AssertionError("kv_list should have timed out")
    except TimeoutError:
        print("kv_list(min_count=7) timed out: only 6 keys are done")
    client.kv_clear(keys, PID)


def main() -> None:
    tq.init()
    client = tq.get_client()
    try:
        where_waiter(client)
        kv_list_min_count(client)
    finally:
        tq.close()
    print("tag-filtered waits: OK")


if __name__ == "__main__":
    main()
