"""A custom sampler importable by actor processes (zmq, ray)."""

from __future__ import annotations

from typing import Any

from transferqueue.controller.samplers import BaseSampler


class EveryOtherSampler(BaseSampler):
    """Takes every other ready row (a toy custom sampler)."""

    def sample(
        self, ready_rows: list[int], batch_size: int, **kwargs: Any
    ) -> tuple[list[int], list[int]]:
        picked = ready_rows[::2][:batch_size]
        return picked, picked
