"""Tutorial 07 -- choosing a transport: the same code on inproc, zmq and ray.

=========  =========================================  =====================================
transport  where the controller and storage units run  use it for
=========  =========================================  =====================================
inproc     a background event loop in this process     tests, notebooks, one-process loops
zmq        processes of their own, reached over ZMQ    several processes/hosts without Ray
ray        Ray actors on the cluster                   multi-node jobs that already use Ray
=========  =========================================  =====================================

Only the config passed to ``tq.init`` changes. The config ``tq.init`` returns names the
running system: hand it to another process, which attaches with ``tq.init(config)``. Here a
producer process writes while this process streams; on inproc (one process only) the
producer is a thread instead.

Run: python tutorials/07_choosing_a_transport.py --transport inproc|zmq|ray
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import threading
from typing import Any

import torch

import transferqueue as tq

N = 24


def produce(client: tq.TransferQueueClient, n: int) -> None:
    for start in range(0, n, 4):
        ids = torch.arange(start, start + 4)
        client.put({"x": ids, "y": [torch.ones(int(i) % 3 + 1) for i in ids]}, "train@0")


def producer_process(config: tq.Config, n: int) -> None:
    tq.init(config)  # attach to the running system (it is not started a second time)
    try:
        produce(tq.get_client(), n)
    finally:
        tq.close()  # only disconnects: the process that started the system stops it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["inproc", "zmq", "ray"], default="inproc")
    args = parser.parse_args()

    wanted: dict[str, Any] = {"transport": args.transport}
    if args.transport == "ray":  # a namespace of its own: never attach to another job's system
        wanted["ray"] = {"namespace": f"tutorial-07-{os.getpid()}"}
    config = tq.init(wanted)
    client = tq.get_client()
    client.create_partition("train@0", expected_size=N)

    if args.transport == "inproc":
        producer: Any = threading.Thread(target=produce, args=(client, N))
    else:
        spawn = multiprocessing.get_context("spawn")
        producer = spawn.Process(target=producer_process, args=(config, N))
    producer.start()

    # The consumer code is the same on every transport.
    dataset = tq.StreamingDataset(
        ["x", "y"], batch_size=8, partition_id="train@0", task_name="train"
    )
    rows = [r for _, meta in tq.StreamingDataLoader(dataset) for r in meta.rows]
    producer.join()

    print(
        f"{args.transport}: streamed {len(rows)} rows, each once: {sorted(rows) == list(range(N))}"
    )
    tq.close()
    print(f"choosing a transport ({args.transport}): OK")


if __name__ == "__main__":
    main()
