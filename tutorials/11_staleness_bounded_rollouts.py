"""Tutorial 11 -- staleness-bounded rollouts (AReaL's max_head_offpolicyness).

In asynchronous RL the rollout workers generate with the policy they have while the trainer
trains; the bound on how far ahead they may run is the staleness bound k:

- ``client.create_partition(pid, max_staleness=k, global_batch_size=B)``;
- a producer ``meta = client.reserve(pid, n, timeout=...)`` *before* it generates: the
  reservation is admitted while the samples admitted so far plus it stay within
  ``(version + k + 1) * B``; otherwise it waits (event-driven) for the trainer.
  ``wait=False`` reserves what fits now, possibly nothing;
- the producer fills its slots with ``client.put(data, metadata=meta)``; each reserved row
  carries the ``version`` tag it was reserved under;
- the trainer calls ``client.advance_version(pid)`` after each optimizer step, which wakes
  the waiting producers;
- ``get_meta(..., max_version_lag=j)`` skips rows reserved more than j versions ago, and
  with ``evict=True`` consumes them for the task unseen and counts them
  (``partition_info(pid).evicted``).

k = 0 is synchronous RL (rollout and training alternate). Such a partition grows by
reservations, so its streams end only when it is sealed.

Producers and trainer are threads here to keep the tutorial in one process; there is no
sleep anywhere: the threads synchronise through events and the controller's own wake-ups.

Run: python tutorials/11_staleness_bounded_rollouts.py
"""

from __future__ import annotations

import threading

import torch

import transferqueue as tq

K, B = 1, 4  # at most one version of rollouts ahead of the trainer; 4 samples per step


def generate(meta: tq.BatchMeta) -> dict[str, torch.Tensor]:
    """Stands in for the inference engine: one response per reserved slot."""
    version = meta.tags[0]["version"]
    return {"response": torch.full((len(meta), 3), float(version))}


def bounded_producer(client: tq.TransferQueueClient) -> None:
    """One producer, one trainer: the producer runs exactly K versions ahead."""
    pid = "rollout"
    client.create_partition(pid, max_staleness=K, global_batch_size=B)
    reserved: list[tq.BatchMeta] = []
    put_done = [threading.Event() for _ in range(4)]

    def producer() -> None:
        for i in range(4):
            meta = client.reserve(pid, B, timeout=30)  # waits while it would run ahead
            reserved.append(meta)
            client.put(generate(meta), metadata=meta)
            put_done[i].set()

    thread = threading.Thread(target=producer)
    thread.start()
    put_done[0].wait(30)
    put_done[1].wait(30)  # (0 + K + 1) * B = 8 samples admitted at version 0 ...
    while client.partition_info(pid).reserving < 1:  # ... and the third reserve waits
        assert not put_done[2].is_set()
    info = client.partition_info(pid)
    print(f"version {info.version}: admitted {info.admitted}, {info.reserving} reserve waiting")
    assert info.admitted == (info.version + K + 1) * B
    assert client.reserve(pid, 1, wait=False).rows == []  # nothing fits now

    for step in range(4):
        meta = client.get_meta(["response"], B, pid, "train", timeout=30)
        versions = [t["version"] for t in meta.tags]
        print(f"step {step}: trains on rows reserved under versions {versions}")
        assert set(versions) == {max(0, step - K)}  # at most K versions old
        version = client.advance_version(pid)  # after optimizer.step(): wakes the producer
        if step < 2:
            put_done[step + 2].wait(30)  # the waiting reserve was admitted under it
            assert reserved[step + 2].tags[0]["version"] == version
    thread.join(30)
    assert [m.tags[0]["version"] for m in reserved] == [0, 0, 1, 2]
    client.seal(pid)  # a staleness partition's stream ends only when sealed
    assert client.get_meta(["response"], B, pid, "train", timeout=30).is_empty
    client.clear_partition(pid)


def straggler_evicted(client: tq.TransferQueueClient) -> None:
    """A slow producer's rows fall more than max_version_lag behind: evicted, and counted."""
    pid, b = "rollout2", 2
    client.create_partition(pid, max_staleness=K, global_batch_size=b)
    slow = client.reserve(pid, b)  # the straggler's slots, reserved under version 0
    go, slow_done = threading.Event(), threading.Event()

    def straggler() -> None:
        go.wait(30)  # a very long generation
        client.put(generate(slow), metadata=slow)
        slow_done.set()

    def fast_producer() -> None:
        for _ in range(3):
            meta = client.reserve(pid, b, timeout=30)
            client.put(generate(meta), metadata=meta)

    threads = [threading.Thread(target=straggler), threading.Thread(target=fast_producer)]
    for t in threads:
        t.start()
    trained = []
    for step in range(3):
        if step == 2:  # the straggler finishes only now, two versions late
            go.set()
            slow_done.wait(30)
        meta = client.get_meta(
            ["response"], b, pid, "train", max_version_lag=1, evict=True, timeout=30
        )
        trained.append([t["version"] for t in meta.tags])
        client.advance_version(pid)
    for t in threads:
        t.join(30)
    client.seal(pid)
    info = client.partition_info(pid)
    print(f"trained on versions {trained}; evicted {info.evicted} (the straggler's rows)")
    assert trained == [[0, 0], [1, 1], [2, 2]] and info.evicted == {"train": b}
    assert client.get_meta(["response"], b, pid, "train", timeout=30).is_empty

    # eviction is per task: a task without a lag bound (a logger, say) still sees them all
    logged = client.get_meta(["response"], 4 * b, pid, "logger", timeout=30)
    assert sorted(t["version"] for t in logged.tags) == [0, 0, 0, 0, 1, 1, 2, 2]
    client.clear_partition(pid)


def main() -> None:
    tq.init()
    client = tq.get_client()
    try:
        bounded_producer(client)
        straggler_evicted(client)
    finally:
        tq.close()
    print("staleness-bounded rollouts: OK")


if __name__ == "__main__":
    main()
