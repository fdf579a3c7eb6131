"""transferqueue: a streaming data plane for LLM post-training pipelines.

Rollout workers put samples field by field; training tasks consume them in micro-batches
as soon as the fields they need are ready. See README.md.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferqueue.client import AsyncTransferQueueClient, TransferQueueClient, connect
    from transferqueue.client.default import get_async_client, get_client
    from transferqueue.config import Config, load_config
    from transferqueue.controller.samplers import (
        BaseSampler,
        GRPOGroupNSampler,
        RankAwareSampler,
        SeqlenBalancedSampler,
        SequentialSampler,
        TokenBudgetSampler,
    )
    from transferqueue.errors import (
        ActorClosedError,
        ActorDiedError,
        ActorError,
        AuthenticationError,
        CheckpointError,
        ConfigError,
        NotInitializedError,
        PartitionNotFoundError,
        PartitionSealedError,
        ProtocolError,
        PutLeaseExpiredError,
        RemoteError,
        RowsBusyError,
        RowsLostError,
        SamplerError,
        SchemaError,
        StorageFullError,
        SystemNotEmptyError,
        TransferQueueError,
        TransportUnavailableError,
    )
    from transferqueue.kv import (
        async_kv_batch_get,
        async_kv_batch_put,
        async_kv_clear,
        async_kv_list,
        async_kv_put,
        kv_batch_get,
        kv_batch_put,
        kv_clear,
        kv_list,
        kv_put,
    )
    from transferqueue.metadata import BatchMeta, PartitionInfo
    from transferqueue.ops.checkpoint import (
        async_load_checkpoint,
        async_save_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from transferqueue.ops.status import status
    from transferqueue.streaming import StreamingDataLoader, StreamingDataset
    from transferqueue.system import close, init

#: every public name and the module that holds it. They are imported on first use (PEP 562),
#: so that ``import transferqueue.<module>`` -- what an actor process does at start-up --
#: costs only that module's imports, not the client's (tensordict, torch._dynamo: ~2 s).
_EXPORTS: dict[str, str] = {
    "ActorClosedError": "transferqueue.errors",
    "ActorDiedError": "transferqueue.errors",
    "ActorError": "transferqueue.errors",
    "AsyncTransferQueueClient": "transferqueue.client",
    "AuthenticationError": "transferqueue.errors",
    "BaseSampler": "transferqueue.controller.samplers",
    "BatchMeta": "transferqueue.metadata",
    "CheckpointError": "transferqueue.errors",
    "Config": "transferqueue.config",
    "ConfigError": "transferqueue.errors",
    "GRPOGroupNSampler": "transferqueue.controller.samplers",
    "NotInitializedError": "transferqueue.errors",
    "PartitionInfo": "transferqueue.metadata",
    "PartitionNotFoundError": "transferqueue.errors",
    "PartitionSealedError": "transferqueue.errors",
    "ProtocolError": "transferqueue.errors",
    "PutLeaseExpiredError": "transferqueue.errors",
    "RankAwareSampler": "transferqueue.controller.samplers",
    "RemoteError": "transferqueue.errors",
    "RowsBusyError": "transferqueue.errors",
    "RowsLostError": "transferqueue.errors",
    "SamplerError": "transferqueue.errors",
    "SchemaError": "transferqueue.errors",
    "SeqlenBalancedSampler": "transferqueue.controller.samplers",
    "SequentialSampler": "transferqueue.controller.samplers",
    "StorageFullError": "transferqueue.errors",
    "StreamingDataLoader": "transferqueue.streaming",
    "StreamingDataset": "transferqueue.streaming",
    "SystemNotEmptyError": "transferqueue.errors",
    "TokenBudgetSampler": "transferqueue.controller.samplers",
    "TransferQueueClient": "transferqueue.client",
    "TransferQueueError": "transferqueue.errors",
    "TransportUnavailableError": "transferqueue.errors",
    "async_kv_batch_get": "transferqueue.kv",
    "async_kv_batch_put": "transferqueue.kv",
    "async_kv_clear": "transferqueue.kv",
    "async_kv_list": "transferqueue.kv",
    "async_kv_put": "transferqueue.kv",
    "async_load_checkpoint": "transferqueue.ops.checkpoint",
    "async_save_checkpoint": "transferqueue.ops.checkpoint",
    "close": "transferqueue.system",
    "connect": "transferqueue.client",
    "get_async_client": "transferqueue.client.default",
    "get_client": "transferqueue.client.default",
    "init": "transferqueue.system",
    "kv_batch_get": "transferqueue.kv",
    "kv_batch_put": "transferqueue.kv",
    "kv_clear": "transferqueue.kv",
    "kv_list": "transferqueue.kv",
    "kv_put": "transferqueue.kv",
    "load_checkpoint": "transferqueue.ops.checkpoint",
    "load_config": "transferqueue.config",
    "save_checkpoint": "transferqueue.ops.checkpoint",
    "status": "transferqueue.ops.status",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transferqueue' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "ActorClosedError",
    "ActorDiedError",
    "ActorError",
    "AsyncTransferQueueClient",
    "AuthenticationError",
    "BaseSampler",
    "BatchMeta",
    "CheckpointError",
    "Config",
    "ConfigError",
    "GRPOGroupNSampler",
    "NotInitializedError",
    "PartitionInfo",
    "PartitionNotFoundError",
    "PartitionSealedError",
    "ProtocolError",
    "PutLeaseExpiredError",
    "RankAwareSampler",
    "RemoteError",
    "RowsBusyError",
    "RowsLostError",
    "SamplerError",
    "SchemaError",
    "SeqlenBalancedSampler",
    "SequentialSampler",
    "StorageFullError",
    "StreamingDataLoader",
    "StreamingDataset",
    "SystemNotEmptyError",
    "TokenBudgetSampler",
    "TransferQueueClient",
    "TransferQueueError",
    "TransportUnavailableError",
    "async_kv_batch_get",
    "async_kv_batch_put",
    "async_kv_clear",
    "async_kv_list",
    "async_kv_put",
    "async_load_checkpoint",
    "async_save_checkpoint",
    "close",
    "connect",
    "get_async_client",
    "get_client",
    "init",
    "kv_batch_get",
    "kv_batch_put",
    "kv_clear",
    "kv_list",
    "kv_put",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "status",
]
