"""This process's default client: the one ``tq.init`` connects and ``tq.get_client()``,
the kv functions and ``StreamingDataset(config=None)`` use. ``tq.init`` sets it and
``tq.close`` clears it; a forked child does not inherit it (it calls ``tq.init`` itself)."""

from __future__ import annotations

import os

from transferqueue.client.async_client import AsyncTransferQueueClient
from transferqueue.client.sync_facade import TransferQueueClient
from transferqueue.errors import NotInitializedError

_default: tuple[int, TransferQueueClient] | None = None


def set_default(client: TransferQueueClient | None) -> None:
    global _default
    _default = None if client is None else (os.getpid(), client)


def get_client() -> TransferQueueClient:
    """The synchronous client of the default system."""
    if _default is None or _default[0] != os.getpid():
        raise NotInitializedError("call tq.init() first (in this process)")
    return _default[1]


def get_async_client() -> AsyncTransferQueueClient:
    """The async client of the default system."""
    return get_client().async_client
