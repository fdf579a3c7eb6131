"""Tutorial 10 -- consumer leases: ack, nack, expiry and redelivery.

A plain ``get_meta`` marks the rows it hands out consumed at once: a consumer that dies
holding them loses them for its task. With ``lease_s`` the rows are *leased* instead:

- ``client.ack(meta)`` consumes them; it returns ``{"acked", "not_leased", "ended"}`` --
  an ack of a lease that already ended (acked, nacked, expired) acks nothing and says why;
- ``client.nack(meta)`` gives them back at once, and a lease that is not acked within
  ``lease_s`` seconds gives them back by itself; rows given back are handed out first;
- ``partition_info(pid).leased`` / ``.redelivered`` count rows in hand / handed out again.

The guarantee: every row is acked exactly once per task, and a row is delivered more than
once only after a nack or an expired lease. A consumer's death is noticed by its lease
expiring (the controller does not watch processes), so choose ``lease_s`` longer than one
training step. ``StreamingDataset(..., lease_s=...)`` acks micro-batch *i* when *i+1* is
asked for (the step in between finished) and the last one at the normal end of the stream.

Round-based samplers (rank-aware, seqlen-balanced, token budget) form batches for every rank
at once and refuse leases. See docs/async-rl.md.

Run: python tutorials/10_consumer_leases.py
"""

from __future__ import annotations

import torch

import transferqueue as tq

PID, TASK = "train@0", "update_actor"


def rows(n: int, start: int = 0) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1)}


def ack_and_nack(client: tq.TransferQueueClient) -> None:
    client.create_partition(PID, expected_size=6)
    client.put(rows(6), partition_id=PID)

    first = client.get_meta(["x"], 2, PID, TASK, lease_s=30)
    second = client.get_meta(["x"], 2, PID, TASK, lease_s=30)  # leased rows are not ready
    print(f"leased {first.rows} and {second.rows}: {client.partition_info(PID).leased}")
    assert (first.rows, second.rows) == ([0, 1], [2, 3])

    print("ack:", client.ack(first))  # consumed now
    assert client.partition_info(PID).consumed == {TASK: 2}

    assert client.nack(second) == 2  # e.g. the step failed: give the batch back
    again = client.get_meta(["x"], 2, PID, TASK, lease_s=30)
    print(f"after the nack, {again.rows} come back first (before rows 4, 5)")
    assert again.rows == second.rows
    client.ack(again)

    rest = client.get_meta(["x"], 2, PID, TASK, lease_s=30)
    client.ack(rest)
    info = client.partition_info(PID)
    print(f"consumed {info.consumed}, redelivered {info.redelivered}")
    assert info.consumed == {TASK: 6} and info.redelivered == {TASK: 2}
    assert client.check_consumption_status(TASK, PID)  # every row acked: the stream ended
    client.clear_partition(PID)


def expiry_and_late_ack(client: tq.TransferQueueClient) -> None:
    client.create_partition(PID, expected_size=2)
    client.put(rows(2), partition_id=PID)
    held = client.get_meta(["x"], 2, PID, TASK, lease_s=0.5)  # a consumer that then hangs

    # another consumer waits for rows; it is woken when the lease expires, not by polling
    again = client.get_meta(["x"], 2, PID, TASK, lease_s=30, timeout=30)
    print(f"the expired lease's rows {again.rows} were handed out again")
    assert again.rows == held.rows and again.lease != held.lease

    late = client.ack(held)  # the hung consumer wakes up and acks: too late, reported
    print("late ack:", late)
    assert late == {"acked": 0, "not_leased": 2, "ended": "expired"}
    assert client.ack(again)["acked"] == 2  # acked exactly once
    assert client.partition_info(PID).consumed == {TASK: 2}
    client.clear_partition(PID)


def streaming_with_leases(client: tq.TransferQueueClient) -> None:
    client.create_partition(PID, expected_size=8)
    client.put(rows(8), partition_id=PID)

    # a trainer that stops (or dies) in the middle of its second step; its lease is short
    # only to keep the tutorial short: choose one longer than your longest step
    crashed = tq.StreamingDataset(["x"], 2, PID, TASK, lease_s=2, prefetch=False)
    for step, (_, meta) in enumerate(crashed):
        if step == 1:
            held = meta.rows  # never acked: the "crash" happens during this step
            break
    info = client.partition_info(PID)
    print(f"stopped holding {held}: consumed {info.consumed}, leased {info.leased}")
    assert info.consumed == {TASK: 2} and info.leased == {TASK: 2}

    # its replacement streams the rest; the held batch comes back once its lease expired
    seen = []
    replacement = tq.StreamingDataset(["x"], 2, PID, TASK, lease_s=30, prefetch=False)
    for _, meta in replacement:
        seen += meta.rows  # forward, backward and optimizer.step() go here
    print(f"the replacement trained on {seen}")
    assert sorted(seen) == [r for r in range(8) if r not in (0, 1)]
    assert set(held) <= set(seen)
    info = client.partition_info(PID)
    assert info.consumed == {TASK: 8} and info.leased == {}  # each row acked once
    client.clear_partition(PID)


def main() -> None:
    tq.init()
    client = tq.get_client()
    try:
        ack_and_nack(client)
        expiry_and_late_ack(client)
        streaming_with_leases(client)
    finally:
        tq.close()
    print("consumer leases: OK")


if __name__ == "__main__":
    main()
