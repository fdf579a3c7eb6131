"""The samplers a ``get_meta`` call can use, and ``resolve_sampler`` (a spec -> an
instance). The contract every sampler follows is in ``sampler_base`` (``BaseSampler``);
the data-parallel ones are in ``dp_samplers``. Import them from here."""

from __future__ import annotations

import importlib
from typing import Any

from transferqueue.controller.balancing import balanced_partition
from transferqueue.controller.dp_samplers import (
    RankAwareSampler,
    SeqlenBalancedSampler,
    TokenBudgetSampler,
)
from transferqueue.controller.sampler_base import (
    CONTEXT_KEYS,
    BaseSampler,
    GRPOGroupNSampler,
    SequentialSampler,
    complete_groups,
)
from transferqueue.errors import SamplerError

__all__ = [
    "CONTEXT_KEYS",
    "BaseSampler",
    "GRPOGroupNSampler",
    "RankAwareSampler",
    "SeqlenBalancedSampler",
    "SequentialSampler",
    "TokenBudgetSampler",
    "balanced_partition",
    "complete_groups",
    "resolve_sampler",
]

BUILTIN_SAMPLERS: dict[str, type[BaseSampler]] = {
    "sequential": SequentialSampler,
    "grpo": GRPOGroupNSampler,
    "rank_aware": RankAwareSampler,
    "seqlen_balanced": SeqlenBalancedSampler,
    "token_budget": TokenBudgetSampler,
}


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SamplerError(f"cannot import sampler {path!r}: {exc}") from exc
    return obj


def resolve_sampler(spec: Any = None, **kwargs: Any) -> BaseSampler:
    """A sampler instance from a spec: None (sequential), a built-in name
    (``"sequential"``, ``"grpo"``, ``"rank_aware"``, ``"seqlen_balanced"``,
    ``"token_budget"``), a
    :class:`BaseSampler` subclass or instance, or an import path ``"package.module:Class"``.
    ``kwargs`` go to the constructor (not allowed with an instance).
    """
    if spec is None:
        spec = "sequential"
    if isinstance(spec, BaseSampler):
        if kwargs:
            raise SamplerError(f"sampler arguments {sorted(kwargs)} given with a sampler instance")
        return spec
    if isinstance(spec, str):
        if spec in BUILTIN_SAMPLERS:
            spec = BUILTIN_SAMPLERS[spec]
        elif ":" in spec:
            spec = _import_path(spec)
            if isinstance(spec, BaseSampler):
                return resolve_sampler(spec, **kwargs)
        else:
            raise SamplerError(
                f"unknown sampler {spec!r}: use one of {sorted(BUILTIN_SAMPLERS)}, a BaseSampler "
                f"subclass or instance, or an import path 'package.module:Class'"
            )
    if isinstance(spec, type) and issubclass(spec, BaseSampler):
        try:
            return spec(**kwargs)
        except TypeError as exc:
            raise SamplerError(f"cannot construct {spec.__name__}: {exc}") from exc
    raise SamplerError(f"a sampler must be a BaseSampler subclass or instance, got {spec!r}")
