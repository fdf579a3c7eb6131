"""``python -m transferqueue demo``: a small pipeline on the default in-process transport."""

from __future__ import annotations

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=["inproc", "zmq", "ray"], default="inproc")


def run(args: argparse.Namespace) -> int:
    import transferqueue as tq

    tq.init({"transport": args.transport})
    try:
        client = tq.get_client()
        data = {"input_ids": torch.arange(12).reshape(4, 3), "text": ["a", "b", "c", "d"]}
        meta = client.put(data, partition_id="demo")
        got = client.get_data(client.get_meta(["input_ids", "text"], 4, "demo", "trainer"))
        ok = torch.equal(got["input_ids"], data["input_ids"]) and got["text"] == data["text"]
        print(f"put {len(meta)} rows into 'demo' and got them back: {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    finally:
        tq.close()
