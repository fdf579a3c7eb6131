"""Tutorial 04 -- partitions, pre-allocated slots and seal.

The scenario every streaming trainer needs: the consumer starts *before* any sample exists,
producers arrive later, and the consumer stops exactly when the data is done -- never early
(because nothing was there yet), never hanging (waiting for data that will never come).

* ``create_partition(pid, expected_size=N)`` reserves N pending slots: consumers know N
  samples are coming and wait for them; the stream ends once all N are produced and consumed.
* ``seal(pid)`` says "no more rows": the stream ends with what was produced.

Run: python tutorials/04_partitions_slots_seal.py
"""

from __future__ import annotations

import threading

import torch

import transferqueue as tq


def consume(pid: str, out: list[int]) -> None:
    client = tq.get_client()
    while True:
        # Waits (woken by the producers' commits, not by polling) until a batch of 3 is
        # ready, or the partition is exhausted for this task: then the last, short batch,
        # and after it an empty BatchMeta -- the end of the stream.
        meta = client.get_meta(["x"], batch_size=3, partition_id=pid, task_name="train")
        if meta.is_empty:
            return
        out.extend(client.get_data(meta)["x"].tolist())


def produce(pid: str, values: list[int]) -> None:
    client = tq.get_client()
    for v in values:  # one sample at a time
        client.put({"x": torch.tensor([v])}, partition_id=pid)


def run(pid: str, expected: int, produced: int, seal: bool) -> list[int]:
    client = tq.get_client()
    client.create_partition(pid, expected_size=expected)
    got: list[int] = []
    consumer = threading.Thread(target=consume, args=(pid, got))
    consumer.start()  # the consumer first: no sample exists yet
    values = list(range(produced))
    producers = [threading.Thread(target=produce, args=(pid, values[i::2])) for i in range(2)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    if seal:
        client.seal(pid)  # fewer samples than reserved: say so, and the stream ends
    consumer.join()
    print(f"{pid}: reserved {expected}, produced {produced}, consumer got {len(got)} and stopped")
    return got


def main() -> None:
    tq.init()
    # 1. The reservation is filled: the consumer ends after exactly 8 samples.
    assert sorted(run("train@0", expected=8, produced=8, seal=False)) == list(range(8))
    # 2. Only 5 of 8 arrive, then the driver seals: the consumer ends with those 5.
    assert sorted(run("train@1", expected=8, produced=5, seal=True)) == list(range(5))
    info = tq.get_client().partition_info("train@1")
    print(f"train@1 after seal: size={info.size} sealed={info.sealed}")
    tq.close()
    print("partitions, slots and seal: OK")


if __name__ == "__main__":
    main()
