"""The client room: the async client (the one implementation), its sync facade, the
column encoding of batches and the row routing to storage units."""

from transferqueue.client.async_client import AsyncTransferQueueClient
from transferqueue.client.sync_facade import TransferQueueClient

__all__ = ["AsyncTransferQueueClient", "TransferQueueClient"]
