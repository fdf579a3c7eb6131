"""transferqueue: a streaming data plane for LLM post-training pipelines.

Rollout workers put samples field by field; training tasks consume them in micro-batches
as soon as the fields they need are ready. See README.md.
"""

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
