"""The client's put path, mixed into
:class:`~transferqueue.client.async_client.AsyncTransferQueueClient`.

A put is *write, then publish*: the controller validates it and gives it rows (and the
unit of each) under a put lease, every field is written to the storage units in parallel,
bounded by the lease, and only then is the put committed to the controller, which makes the
rows' fields and tags visible in one step. Any failure -- a write, the commit itself, a
cancellation -- aborts the lease, and the controller gives the rows back; a client that
dies mid-put leaves a lease that expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from transferqueue.client.columns import cast_columns, field_spec, payload_bytes, to_columns
from transferqueue.client.device import on_device, to_host
from transferqueue.client.routing import group_by_unit, runs, take
from transferqueue.errors import ActorDiedError, RowsLostError, SchemaError
from transferqueue.metadata import BatchMeta
from transferqueue.runtime.loop import background
from transferqueue.runtime.transports import transport_class

if TYPE_CHECKING:
    from transferqueue.config import Config
    from transferqueue.runtime.actor import ActorRef

log = logging.getLogger("transferqueue.client")

#: seconds the controller may take to confirm a storage unit died (it asks the unit)
_REPORT_TIMEOUT_S = 2.0

__all__ = ["WriteMethods"]


class WriteMethods:
    """``put`` and the write path under it (see the module docstring)."""

    if TYPE_CHECKING:
        config: Config
        client_id: str
        put_hook: Callable[[str], Awaitable[None]] | None
        _controller: ActorRef
        _units: list[ActorRef]
        _my_node: str | None
        _node_known: bool

    async def put(
        self,
        data: Any,
        partition_id: str | None = None,
        metadata: BatchMeta | None = None,
        *,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        """Write a batch; returns the BatchMeta of the rows written.

        Without ``metadata`` new rows are allocated in ``partition_id`` (pending slots
        first). With ``metadata`` the fields are written into its rows. A BatchMeta passed
        second, as the public TransferQueue's ``put(data, metadata)`` does, is taken as
        ``metadata``. ``metadata``'s own tags are not sent: pass ``tags`` (or call
        :meth:`set_custom_meta`).
        """
        if isinstance(partition_id, BatchMeta) and metadata is None:
            partition_id, metadata = None, partition_id
        n, columns = to_columns(data)
        if metadata is not None:
            if partition_id is not None and partition_id != metadata.partition_id:
                raise ValueError(
                    f"partition_id {partition_id!r} differs from metadata's {metadata.partition_id!r}"
                )
            partition_id = metadata.partition_id
            if len(metadata) != n:
                raise SchemaError(f"the batch has {n} rows but metadata names {len(metadata)}")
        elif partition_id is None:
            raise ValueError("put needs a partition_id (or the metadata of existing rows)")
        if tags is not None and len(tags) != n:
            raise SchemaError(f"tags must hold one dict per row: {n} rows, {len(tags)} tags")
        specs = {name: field_spec(col) for name, col in columns.items()}
        rows = metadata.rows if metadata is not None else None
        if on_device(columns):
            return await self._write_staged(partition_id, columns, specs, rows=rows, n=n, tags=tags)
        return await self._write(partition_id, columns, specs, rows=rows, n=n, tags=tags)

    async def _write_staged(
        self, partition_id: str, columns: dict[str, Any], specs: dict[str, Any], **kwargs: Any
    ) -> BatchMeta:
        """:meth:`_write` of columns holding CUDA tensors: copied to the host through pinned
        staging buffers first (client/device.py), given back once the write is done."""
        host, staged = to_host(columns)
        try:
            return await self._write(partition_id, host, specs, **kwargs)
        finally:
            del host
            staged.release()

    async def _write(
        self,
        partition_id: str,
        columns: dict[str, Any],
        specs: dict[str, Any],
        *,
        rows: list[int] | None = None,
        n: int = 0,
        keys: list[str] | None = None,
        tags: Sequence[dict[str, Any]] | None = None,
    ) -> BatchMeta:
        started = time.monotonic()
        nbytes = payload_bytes(columns)
        tag_list = list(tags) if tags is not None else None
        begun = await self._controller.call(
            "begin_put", partition_id, specs, n, rows, keys, tag_list, nbytes,
            self.client_id, node=self._node(),
        )  # fmt: skip
        lease = begun["lease"]
        try:
            columns = cast_columns(columns, begun.get("dtypes"))  # a field's one dtype
            if self.put_hook is not None:
                await self.put_hook("begun")
            nets = []
            if columns:
                # the writes are bounded by the lease: no byte lands after it ended
                left = begun["ttl"] - (time.monotonic() - started)
                results = await self._write_units(
                    partition_id, begun["rows"], begun["units"], columns, max(left, 0.001)
                )
                nets = [int(r) for r in results]
            if self.put_hook is not None:
                await self.put_hook("written")
            crossed = self._crossed_bytes(begun["units"], nbytes)
            return await self._controller.call(
                "commit", partition_id, lease, sum(nets), crossed_bytes=crossed
            )
        except Exception:
            await self._abort(partition_id, lease)
            raise
        except BaseException:  # cancelled (or closed): we may not await any more
            with contextlib.suppress(RuntimeError):  # no loop left to run it: it expires
                background(self._abort(partition_id, lease), "aborting a cancelled put")
            raise

    def _node(self) -> str | None:
        """This process's node, as the transport names nodes (None: it does not say)."""
        if not self._node_known and self._units:
            self._my_node = transport_class(self._units[0].address.transport).local_node()
            self._node_known = True  # None too: asked once, not on every put
        return self._my_node

    def _crossed_bytes(self, units: list[int], nbytes: int) -> int:
        """The put's bytes that went to units on other nodes (pro rata by rows)."""
        node, unit_nodes = self._my_node, (self.config.system or {}).get("unit_nodes")
        if node is None or not unit_nodes or not units:
            return 0
        remote = sum(1 for u in units if unit_nodes[u] not in (None, node))
        return nbytes * remote // len(units)

    async def _abort(self, partition_id: str, lease: int) -> None:
        """End a failed put's lease; the controller gives its rows back. Best effort: a
        lease that cannot be aborted (controller gone) expires."""
        try:
            await self._controller.call("abort_put", partition_id, lease)
        except Exception as exc:  # the put's own error is what the caller must see
            log.debug("could not abort put lease %s: %s", lease, exc)

    async def _write_units(
        self,
        partition_id: str,
        rows: list[int],
        units: list[int],
        columns: dict[str, Any],
        timeout: float,
    ) -> list[Any]:
        """Write each unit's share of ``columns``, in parallel."""
        if units and min(units) == max(units) and _plain(columns):
            # one unit holds every row (a small put): its share is the whole batch, as is
            return [
                await self._unit_call(
                    partition_id, units[0], rows, "put", partition_id, rows, columns,
                    timeout=timeout,
                )
            ]  # fmt: skip
        calls = []
        for unit, (positions, unit_rows) in group_by_unit(rows, units).items():
            found = runs(positions)  # the same for every column
            share = {name: take(col, positions, found) for name, col in columns.items()}
            calls.append(
                self._unit_call(
                    partition_id, unit, unit_rows, "put", partition_id, unit_rows, share,
                    timeout=timeout,
                )
            )  # fmt: skip
        return list(await asyncio.gather(*calls))

    async def _unit_call(
        self, partition_id: str, unit: int, rows: Any, method: str, *args: Any, **kwargs: Any
    ) -> Any:
        """Call a unit; a dead unit is reported to the controller and its rows as lost."""
        try:
            return await self._units[unit].call(method, *args, **kwargs)
        except ActorDiedError:
            # tell the controller first, so partition_info counts the rows lost from now on;
            # it asks the unit itself, and a unit that answers is not dead (a missed
            # heartbeat on a loaded host): then this call just failed
            confirmed = False
            with contextlib.suppress(Exception):
                confirmed = await self._controller.call(
                    "unit_died", unit, timeout=_REPORT_TIMEOUT_S + 1.0
                )
            if not confirmed:
                raise
            lost = rows.tolist() if hasattr(rows, "tolist") else list(rows)
            raise RowsLostError(
                f"rows {lost[:32]} of partition {partition_id!r} are lost: storage unit "
                f"{unit}, which held their bytes, died",
                partition_id,
                lost,
            ) from None


def _plain(columns: dict[str, Any]) -> bool:
    """Whether every column is a plain (not nested) tensor or a list: sent to one unit as is."""
    return all(
        isinstance(c, list) or (isinstance(c, torch.Tensor) and not c.is_nested)
        for c in columns.values()
    )
