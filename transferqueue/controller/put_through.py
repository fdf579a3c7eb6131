"""A small put in one round trip: the controller writes it to the units and commits.

Mixed into :class:`~transferqueue.controller.actor.ControllerActor`. A client's small put
(:data:`transferqueue.client.async_client.PUT_THROUGH_BYTES`) sends ``begin_put``'s
arguments *and the batch* in one call. The controller takes the put lease as ``begin_put``
does, writes each unit's share of the batch itself (a small put's rows are one stripe
block: one unit, and the batch goes as is) -- bounded by the lease, as a client's write
is -- and commits: the client waits on one round trip to the controller and the controller
on one to the unit (4 messages in a row instead of 6). The lease protocol is the one of
:mod:`.leases`: a failed or cancelled write ends the lease (the bytes are cleared from the
units, then the rows go back); the client having died meanwhile changes nothing, the put
is the controller's once the batch arrived (docs/architecture.md "The put path").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from transferqueue.errors import ActorDiedError, RowsLostError

if TYPE_CHECKING:
    from transferqueue.controller.state import ControllerState
    from transferqueue.metadata import BatchMeta
    from transferqueue.runtime.actor import ActorRef

__all__ = ["PutThrough"]


class PutThrough:
    #: a testing seam: awaited with "written" once a put's bytes landed, before its commit
    put_hook: Callable[[str], Awaitable[None]] | None = None

    if TYPE_CHECKING:
        _state: ControllerState
        _units: list[ActorRef]

        async def begin_put(
            self,
            pid: str,
            specs: Mapping[str, Any],
            n: int = 0,
            rows: Sequence[int] | None = None,
            keys: Sequence[str] | None = None,
            tags: Sequence[Mapping[str, Any] | None] | None = None,
            nbytes: int = 0,
            client: str = "",
            node: str | None = None,
        ) -> dict[str, Any]: ...
        async def commit(
            self, pid: str, lease: int, net_bytes: int = 0, crossed_bytes: int = 0
        ) -> BatchMeta: ...
        async def _end(self, lease: int, reason: str) -> list[int]: ...
        async def _confirm_dead(self, unit: int) -> bool: ...
        def _own(self, coro: Any, what: str) -> None: ...

    async def put(
        self,
        pid: str,
        specs: Mapping[str, Any],
        columns: dict[str, Any],
        n: int = 0,
        rows: Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
        tags: Sequence[Mapping[str, Any] | None] | None = None,
        nbytes: int = 0,
        client: str = "",
        node: str | None = None,
    ) -> BatchMeta:
        """``begin_put``, the writes and ``commit`` in one call: the BatchMeta of the rows
        written (the batch is small: a client sends larger ones to the units itself)."""
        started = time.monotonic()
        begun = await self.begin_put(pid, specs, n, rows, keys, tags, nbytes, client, node)
        units: list[int] = begun["units"]
        lease = begun["lease"]
        try:
            net = 0
            if columns:
                left = max(begun["ttl"] - (time.monotonic() - started), 0.001)
                shares = _shares(begun["rows"], units, _cast(columns, begun["dtypes"]))
                net = await self._write_shares(pid, shares, left)
            if self.put_hook is not None:
                await self.put_hook("written")
            crossed = self._crossed_bytes_of(units, nbytes, node)
            return await self.commit(pid, lease, net, crossed_bytes=crossed)
        except Exception:
            await self._end(lease, "aborted")
            raise
        except BaseException:  # cancelled: the release runs on its own
            self._own(self._end(lease, "aborted"), "aborting a cancelled put")
            raise

    async def _write_shares(
        self, pid: str, shares: dict[int, tuple[list[int], dict[str, Any]]], timeout: float
    ) -> int:
        """Every unit's share, in parallel; all of them have ended (landed, failed or been
        cut off by ``timeout``) before the first error is raised, so the release that
        follows clears bytes no write is still bringing."""
        results = await asyncio.gather(
            *(self._write_through(pid, u, r, cols, timeout) for u, (r, cols) in shares.items()),
            return_exceptions=True,
        )
        net = 0
        for result in results:
            if isinstance(result, BaseException):
                raise result
            net += int(result)
        return net

    async def _write_through(
        self, pid: str, unit: int, rows: list[int], columns: dict[str, Any], timeout: float
    ) -> Any:
        """The unit's write; a dead unit (confirmed) makes the rows lost, as a client's
        write that meets it does."""
        try:
            return await self._units[unit].call("put", pid, rows, columns, timeout=timeout)
        except ActorDiedError:
            if not await self._confirm_dead(unit):
                raise
            raise RowsLostError(
                f"rows {rows[:32]} of partition {pid!r} are lost: storage unit {unit}, which "
                f"held their bytes, died",
                pid,
                list(rows),
            ) from None

    def _crossed_bytes_of(self, units: list[int], nbytes: int, node: str | None) -> int:
        """The put's bytes that went to a unit on another node than the writer's."""
        nodes = self._state.placement.nodes
        if node is None or not units:
            return 0
        remote = sum(1 for u in units if nodes[u] not in (None, node))
        return nbytes * remote // len(units)


def _cast(columns: dict[str, Any], dtypes: Mapping[str, str]) -> dict[str, Any]:
    """Fields the partition holds in a wider dtype, cast to it (tensors, lists of tensors)."""
    if not dtypes:
        return columns
    out = dict(columns)
    for name, dtype in dtypes.items():
        target = getattr(torch, dtype.removeprefix("torch."), None)
        col = out.get(name)
        if not isinstance(target, torch.dtype) or col is None:
            continue
        if isinstance(col, torch.Tensor):
            out[name] = col.to(target)
        elif all(isinstance(v, torch.Tensor) for v in col):
            out[name] = [v.to(target) for v in col]
    return out


def _shares(
    rows: list[int], units: list[int], columns: dict[str, Any]
) -> dict[int, tuple[list[int], dict[str, Any]]]:
    """``{unit: (its rows, its columns)}``: the whole batch when one unit holds every row,
    else each unit's positions taken out of every column (a small batch: a few rows)."""
    if min(units) == max(units):
        return {units[0]: (rows, columns)}
    positions: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        positions.setdefault(u, []).append(i)
    out = {}
    for u, pos in positions.items():
        index = torch.tensor(pos, dtype=torch.int64)
        share = {
            name: col.index_select(0, index)
            if isinstance(col, torch.Tensor)
            else [col[i] for i in pos]
            for name, col in columns.items()
        }
        out[u] = ([rows[i] for i in pos], share)
    return out
