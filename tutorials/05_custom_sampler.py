"""Tutorial 05 -- a custom sampler.

A sampler decides which ready rows a ``get_meta`` call returns and which it marks consumed:
``sample(ready_rows, batch_size, **sampling_config) -> (sampled, consumed)``. The controller
also passes context: ``tags(row)`` (a row's tags), ``final`` (no more rows can come, so a
short batch is the last one), ``drop_last``, ``partition_id`` and ``task_name``.

Configure it with ``tq.init({"controller": {"sampler": ...}})``: a BaseSampler subclass or
instance, or an import path ``"package.module:Class"``. On zmq the controller runs in another
process, so the class must be importable there by module path (a class defined in
``__main__``, like this one, works on inproc and ray only). This tutorial runs on inproc.

Run: python tutorials/05_custom_sampler.py
"""

from __future__ import annotations

from typing import Any

import torch

import transferqueue as tq
from transferqueue import BaseSampler


class LongestFirstSampler(BaseSampler):
    """Hands out the longest ready samples first (tag ``length``), e.g. to fail fast on
    out-of-memory batches."""

    def sample(
        self,
        ready_rows: list[int],
        batch_size: int,
        *,
        tags: Any = None,
        final: bool = False,
        drop_last: bool = False,
        **_: Any,
    ) -> tuple[list[int], list[int]]:
        if len(ready_rows) < batch_size and not (final and not drop_last):
            return [], []  # not enough yet: the controller waits for more rows
        ranked = sorted(ready_rows, key=lambda r: -tags(r)["length"])
        picked = ranked[:batch_size]
        return picked, picked  # (the batch, the rows to mark consumed)


def main() -> None:
    tq.init({"controller": {"sampler": LongestFirstSampler}})
    client = tq.get_client()
    lengths = [3, 9, 1, 7, 5, 2]
    client.put(
        {"tokens": [torch.ones(n) for n in lengths]},
        partition_id="p",
        tags=[{"length": n} for n in lengths],
    )
    client.seal("p")
    while not (meta := client.get_meta(["tokens"], 4, "p", "train")).is_empty:
        print("batch lengths:", [len(t) for t in client.get_data(meta)["tokens"].unbind()])
    tq.close()
    print("custom sampler: OK")


if __name__ == "__main__":
    main()
