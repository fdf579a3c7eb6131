"""The one exception tree of transferqueue.

Every error the library raises on purpose derives from :class:`TransferQueueError`.
Some also derive from a builtin (``ValueError``, ``KeyError``, ``TimeoutError``) so that
callers who catch the builtin keep working. Errors raised inside an actor travel back to
the caller with the same type (see :mod:`transferqueue.runtime.actor`).
"""

from __future__ import annotations


class TransferQueueError(Exception):
    """Base class of every transferqueue error."""


class ConfigError(TransferQueueError, ValueError):
    """A configuration value is unknown or invalid."""


class ActorError(TransferQueueError):
    """Something went wrong talking to an actor."""


class ActorDiedError(ActorError):
    """The actor's process or Ray actor is gone; the call cannot be answered."""


class ActorClosedError(ActorError):
    """The actor (or the channel to it) was closed by its owner."""


class RemoteError(ActorError):
    """An actor method raised an exception whose type does not travel.

    ``remote_type`` is the qualified name of the original type and ``remote_traceback``
    its formatted traceback, as text.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        if self.remote_traceback:
            return f"{base}\n--- remote traceback ---\n{self.remote_traceback}"
        return base


class TransportUnavailableError(TransferQueueError):
    """A transport cannot be used here (missing optional dependency, wrong process)."""


class NotInitializedError(TransferQueueError):
    """``tq.init`` has not been called in this process."""


class PartitionNotFoundError(TransferQueueError, KeyError):
    """The partition does not exist (never created, or cleared)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return Exception.__str__(self)


class PartitionSealedError(TransferQueueError):
    """Rows cannot be added to a sealed partition."""


class SchemaError(TransferQueueError, ValueError):
    """Data does not match what the partition already holds (dtype, rank, batch size)."""


class StorageFullError(TransferQueueError):
    """The storage capacity would be exceeded by this write."""


class SamplerError(TransferQueueError, ValueError):
    """A sampler was misconfigured or given invalid ``sampling_config``."""


class ProtocolError(ActorError):
    """A request or reply could not be decoded (a malformed message, or a peer speaking
    another version of the call protocol); the call it belongs to fails with this."""


class PutLeaseExpiredError(TransferQueueError):
    """A put's lease ended before its commit (``controller.put_lease_s`` passed, or it was
    aborted): its rows were released and nothing was published. Put again."""


class RowsLostError(TransferQueueError):
    """Rows whose bytes lived on a storage unit that died. ``partition_id`` and ``rows``
    name them."""

    def __init__(self, message: str, partition_id: str = "", rows: list[int] | None = None) -> None:
        super().__init__(message, partition_id, list(rows or []))
        self.partition_id = partition_id
        self.rows = list(rows or [])

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RowsBusyError(TransferQueueError):
    """The rows (or keys) a put names are being written by another put that has not
    committed yet; retry once it committed or its put lease ended."""


class CheckpointError(TransferQueueError):
    """A checkpoint cannot be saved or loaded: none at the path, a corrupt or unknown
    manifest, a missing or truncated file, or a system that changed during a load."""


class SystemNotEmptyError(CheckpointError):
    """``load_checkpoint`` into a system that holds partitions with rows: pass
    ``overwrite=True`` to clear them first."""


class AuthenticationError(ActorError):
    """A zmq server refused this process: its CURVE key is not among the server's allowed
    clients, it has no key where the server requires one (or one where the server has
    none), or it holds the wrong server public key (``zmq.curve``). Raised within
    milliseconds of the refused handshake; the server serves its other clients on."""
