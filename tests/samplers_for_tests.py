"""Custom samplers importable by actor processes (zmq, ray)."""

from __future__ import annotations

from typing import Any

from transferqueue.controller.samplers import BaseSampler, GRPOGroupNSampler


class EveryOtherSampler(BaseSampler):
    """Takes every other ready row (a toy custom sampler)."""

    def sample(
        self, ready_rows: list[int], batch_size: int, **kwargs: Any
    ) -> tuple[list[int], list[int]]:
        picked = ready_rows[::2][:batch_size]
        return picked, picked


class DistinctRewardGRPOSampler(GRPOGroupNSampler):
    """GRPO groups of 2 (tag ``uid``) with DAPO's dynamic-sampling filter: a group whose
    rewards (tag ``reward``) are all equal carries no learning signal and is dropped."""

    def __init__(self) -> None:
        super().__init__(n_samples_per_prompt=2)

    def keep_group(self, tags: list[dict[str, Any]]) -> bool:
        return len({t["reward"] for t in tags}) > 1
