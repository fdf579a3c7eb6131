"""The key-value API, with the names of the public TransferQueue project.

Each sample of a partition may have a string key. ``kv_batch_put`` writes fields and/or
merges tags by key (new keys get new rows; a tag-only put tracks sample status);
``kv_batch_get`` reads by key, in key order. Unlike the public project, a missing key
raises ``KeyError`` naming it, and so does a selected field that some key lacks.
``kv_clear`` of keys that are already gone is a no-op (Redis ``DEL``). A row's id is
reused after its key is cleared, so a long-lived partition with put/clear churn stays
as small as its live keys. Every function has an ``async_`` twin. They use the default client (``tq.init``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from transferqueue.client.default import get_async_client, get_client
from transferqueue.metadata import BatchMeta


def _one_row(fields: Any) -> Any:
    """A single sample (unbatched values) as a batch of one row."""
    if fields is None:
        return None
    if isinstance(fields, TensorDictBase):
        return fields if fields.batch_size == torch.Size([1]) else fields.unsqueeze(0)
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a dict or TensorDict; got {type(fields).__name__}")
    return {
        name: value.unsqueeze(0) if isinstance(value, torch.Tensor) else [value]
        for name, value in fields.items()
    }


def kv_put(
    key: str, partition_id: str, fields: Any = None, tag: dict[str, Any] | None = None
) -> BatchMeta:
    """Write one sample's ``fields`` and/or merge ``tag`` into its tags."""
    return get_client().kv_put(
        [key], partition_id, _one_row(fields), None if tag is None else [tag]
    )


def kv_batch_put(
    keys: Sequence[str],
    partition_id: str,
    fields: Any = None,
    tags: Sequence[dict[str, Any]] | None = None,
) -> BatchMeta:
    """Write a batch (one row per key) and/or merge one tag dict per key."""
    return get_client().kv_put(keys, partition_id, fields, tags)


def kv_batch_get(
    keys: str | Sequence[str], partition_id: str, select_fields: str | Sequence[str] | None = None
) -> TensorDict:
    """The samples of ``keys`` (a key or a list) in key order: ``select_fields``, or every
    field all keys have."""
    return get_client().kv_get(keys, partition_id, select_fields)


def kv_list(partition_id: str | None = None) -> dict[str, dict[str, Any]]:
    """``{partition: {key: tags}}``; ``{}`` for an unknown partition."""
    return get_client().kv_list(partition_id)


def kv_clear(keys: str | Sequence[str], partition_id: str) -> None:
    """Forget the samples of ``keys`` (a key or a list) and free their bytes; keys that are
    already gone are ignored (as Redis ``DEL``: clearing again on resume is safe)."""
    get_client().kv_clear(keys, partition_id)


async def async_kv_put(
    key: str, partition_id: str, fields: Any = None, tag: dict[str, Any] | None = None
) -> BatchMeta:
    return await get_async_client().kv_put(
        [key], partition_id, _one_row(fields), None if tag is None else [tag]
    )


async def async_kv_batch_put(
    keys: Sequence[str],
    partition_id: str,
    fields: Any = None,
    tags: Sequence[dict[str, Any]] | None = None,
) -> BatchMeta:
    return await get_async_client().kv_put(keys, partition_id, fields, tags)


async def async_kv_batch_get(
    keys: str | Sequence[str], partition_id: str, select_fields: str | Sequence[str] | None = None
) -> TensorDict:
    return await get_async_client().kv_get(keys, partition_id, select_fields)


async def async_kv_list(partition_id: str | None = None) -> dict[str, dict[str, Any]]:
    return await get_async_client().kv_list(partition_id)


async def async_kv_clear(keys: str | Sequence[str], partition_id: str) -> None:
    await get_async_client().kv_clear(keys, partition_id)
