"""Samplers under the public TransferQueue's module path (``transfer_queue.sampler``).

They live in :mod:`transferqueue.controller.samplers` (the contract: ``sampler_base``);
this module re-exports the base class and the built-in samplers, so a custom sampler can
``from transferqueue.sampler import BaseSampler``.
"""

from transferqueue.controller.samplers import (
    CONTEXT_KEYS,
    BaseSampler,
    GRPOGroupNSampler,
    RankAwareSampler,
    SeqlenBalancedSampler,
    SequentialSampler,
    TokenBudgetSampler,
)

__all__ = [
    "CONTEXT_KEYS",
    "BaseSampler",
    "GRPOGroupNSampler",
    "RankAwareSampler",
    "SeqlenBalancedSampler",
    "SequentialSampler",
    "TokenBudgetSampler",
]
