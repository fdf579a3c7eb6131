"""Checkpoint and restore: the client's side (``save`` / ``load``).

**Save** (:func:`save`): the controller starts a hold and snapshots its state at one instant
(committed rows only; see :mod:`transferqueue.controller.checkpoints`); the client reads
the bytes of those rows from the storage units, chunk by chunk (reading the next chunk while
the last one is written), each chunk to its own frame file, renewing the hold as it goes;
ends the hold once every byte is read; writes the state and the manifest; and swaps the new
snapshot in atomically (:mod:`.checkpoint_format`). Puts committed after the snapshot are
out, whole; a clear during the save does not touch the bytes it reads.

**Load** (:func:`load`): validates the manifest and the files, stages the restore on the
controller (which refuses a system holding partitions unless ``overwrite``; rows are placed
on the units this system has, however many), writes every chunk's rows to their new units,
then commits: the partitions appear in one step. Returns the user metadata.

``hook`` (a testing seam, like the client's ``put_hook``) is awaited with ``"chunk"`` after
each data file is written, ``"files"`` once every file is written and fsynced, and
``"renamed"`` after the snapshot directory got its final name, before ``CURRENT`` points to
it; fault tests kill the saving process there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferqueue.client.routing import group_by_unit, runs, take
from transferqueue.controller.partition import COMMITTED
from transferqueue.errors import CheckpointError
from transferqueue.ops.checkpoint_format import (
    Layout,
    check_manifest,
    manifest_of,
    read_frames,
    write_frames,
    write_manifest,
)

if TYPE_CHECKING:
    from transferqueue.client import AsyncTransferQueueClient

__all__ = [
    "CHUNK_BYTES",
    "HOLD_S",
    "async_load_checkpoint",
    "async_save_checkpoint",
    "load",
    "load_checkpoint",
    "save",
    "save_checkpoint",
]

#: bytes of one data file (rows are grouped to about this size)
CHUNK_BYTES = 64 << 20
#: seconds the controller keeps a save's hold (or a load's staging) without hearing from
#: the client; renewed after every chunk
HOLD_S = 60.0

Hook = Callable[[str], Awaitable[None]] | None


def _progress(total: int, enabled: bool | None, what: str) -> Any:
    from tqdm import tqdm

    on = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=not on, leave=False)


def _check_metadata(metadata: Any) -> Any:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"checkpoint metadata must be JSON-serializable (dict, list, str, numbers, "
            f"bool, None): {exc}"
        ) from None
    return metadata


# ---------------------------------------------------------------------------- save
def _field_groups(p: dict[str, Any]) -> list[tuple[list[str], np.ndarray]]:
    """Fields of a partition grouped by the committed rows that have them (one read per
    group and unit): ``[(fields, rows)]``."""
    groups: dict[bytes, tuple[list[str], np.ndarray]] = {}
    for name, f in p["fields"].items():
        mask = f["rows"].numpy()
        if not mask.any():
            continue
        key = np.packbits(mask).tobytes()
        groups.setdefault(key, ([], np.flatnonzero(mask)))[0].append(name)
    return list(groups.values())


def _plan(
    begun: dict[str, Any], stats: list[dict[str, Any]], chunk_bytes: int
) -> tuple[list[tuple[str, list[str], int, list[int]]], int]:
    """Read chunks ``[(pid, fields, unit, rows)]`` and the bytes they are estimated at."""
    out: list[tuple[str, list[str], int, list[int]]] = []
    total = 0
    for p in begun["partitions"]:
        pid = p["pid"]
        units = begun["units"][pid].numpy()
        for fields, rows in _field_groups(p):
            for unit in np.unique(units[rows]).tolist():
                mine = rows[units[rows] == unit]
                held = stats[unit]["partitions"].get(pid, {}) if unit < len(stats) else {}
                per_row = held.get("nbytes", 0) / max(1, held.get("rows", 1))
                per_row *= len(fields) / max(1, len(held.get("fields", fields)))
                total += int(per_row * len(mine))
                step = max(1, int(chunk_bytes // max(per_row, 1.0)))
                for i in range(0, len(mine), step):
                    out.append((pid, fields, int(unit), mine[i : i + step].tolist()))
    return out, total


def _summary(partitions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        p["pid"]: {
            "rows": int((p["state"] == COMMITTED).sum()),
            "fields": {n: {"dtype": f["dtype"], "ndim": f["ndim"]} for n, f in p["fields"].items()},
            "tasks": sorted(p["tasks"]),
            "keys": len(p["keys"]),
        }
        for p in partitions
    }


def _nbytes(columns: dict[str, Any]) -> int:
    from transferqueue.client.columns import payload_bytes

    return payload_bytes(columns)


async def save(
    client: AsyncTransferQueueClient,
    path: str | os.PathLike[str],
    metadata: Any = None,
    *,
    progress: bool | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    hold_s: float = HOLD_S,
    hook: Hook = None,
) -> dict[str, Any]:
    """Save everything the system holds to ``path`` (see the module docstring); returns
    ``{"path", "snapshot", "bytes", "files", "seconds"}``."""
    metadata = _check_metadata(metadata)
    started = time.time()
    layout = Layout(path)
    controller = client._controller
    with layout.locked():
        tmp, final = layout.new_snapshot()
        try:
            # bytes per row, to size the chunks (a dead unit's rows are lost: not read)
            got = await asyncio.gather(*(u.call("stats") for u in client._units), return_exceptions=True)  # fmt: skip
            stats = [s if isinstance(s, dict) else {"partitions": {}} for s in got]
            begun = await controller.call("checkpoint_begin", hold_s)
            hold = begun["hold"]
            try:
                chunks, files = await _write_chunks(
                    client, tmp, begun, stats, chunk_bytes, hold_s, progress, hook
                )
            finally:
                await controller.call("checkpoint_end", hold)
            files["state.tqc"] = await asyncio.to_thread(
                write_frames, tmp / "state.tqc", {"partitions": begun["partitions"]}
            )
            manifest = manifest_of(metadata, chunks, files, _summary(begun["partitions"]), started)
            await asyncio.to_thread(write_manifest, tmp, manifest)
            await asyncio.to_thread(layout.seal, tmp)
            if hook is not None:
                await hook("files")
            await asyncio.to_thread(layout.rename, tmp, final)
        except BaseException:
            await asyncio.to_thread(_remove, tmp)
            raise
        if hook is not None:
            await hook("renamed")
        await asyncio.to_thread(layout.point_to, final)
    return {
        "path": str(layout.path),
        "snapshot": final.name,
        "bytes": manifest["bytes"],
        "files": len(files),
        "seconds": time.time() - started,
    }


def _remove(tmp: Path) -> None:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


async def _write_chunks(
    client: AsyncTransferQueueClient,
    tmp: Path,
    begun: dict[str, Any],
    stats: list[dict[str, Any]],
    chunk_bytes: int,
    hold_s: float,
    progress: bool | None,
    hook: Hook,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read every chunk from its unit and write it to its file (the next read overlaps
    the last write); returns the chunk entries and file sizes of the manifest."""
    plan, estimate = _plan(begun, stats, chunk_bytes)
    chunks: list[dict[str, Any]] = []
    files: dict[str, int] = {}
    writing: asyncio.Future[int] | None = None
    renewed = time.monotonic()
    bar = _progress(estimate, progress, "saving checkpoint")
    try:
        for i, (pid, fields, unit, rows) in enumerate(plan):
            cols = await client._unit_call(pid, unit, rows, "get", pid, rows, fields)
            name = f"data/{i:06d}.tqc"
            value = {"partition": pid, "rows": torch.tensor(rows), "columns": cols}
            entry = {"file": name, "partition": pid, "fields": fields, "rows": len(rows)}
            entry["data_bytes"] = _nbytes(cols)
            if writing is not None:
                files[chunks[-1]["file"]] = await writing
                if hook is not None:
                    await hook("chunk")
            writing = asyncio.ensure_future(asyncio.to_thread(write_frames, tmp / name, value))
            chunks.append(entry)
            bar.update(entry["data_bytes"])
            if time.monotonic() - renewed > hold_s / 4:
                if not await client._controller.call("checkpoint_renew", begun["hold"], hold_s):
                    raise CheckpointError(
                        f"the controller ended this save's hold (not renewed within "
                        f"{hold_s} s): the checkpoint would not be consistent; save again"
                    )
                renewed = time.monotonic()
        if writing is not None:
            files[chunks[-1]["file"]] = await writing
            writing = None
            if hook is not None:
                await hook("chunk")
    finally:
        bar.close()
        if writing is not None:  # a failure while a write runs: let it end first
            await asyncio.gather(writing, return_exceptions=True)
    return chunks, files


# ---------------------------------------------------------------------------- load
def _read_state(snap: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    state = read_frames(snap / "state.tqc", manifest["files"]["state.tqc"])
    if not isinstance(state, dict) or not isinstance(state.get("partitions"), list):
        raise CheckpointError(f"checkpoint state {snap / 'state.tqc'} is corrupt")
    return state["partitions"]


def _check_files(snap: Path, manifest: dict[str, Any]) -> None:
    for name, size in manifest["files"].items():
        file = snap / name
        try:
            got = file.stat().st_size
        except OSError:
            raise CheckpointError(f"checkpoint {snap} is missing file {name}") from None
        if got != size:
            raise CheckpointError(
                f"checkpoint file {file} has {got} bytes, the manifest says {size}: it is "
                f"truncated or was changed"
            )


def _read_chunk(snap: Path, entry: dict[str, Any], size: int) -> dict[str, Any]:
    value = read_frames(snap / entry["file"], size)
    if (
        not isinstance(value, dict)
        or value.get("partition") != entry.get("partition")
        or not isinstance(value.get("rows"), torch.Tensor)
        or not isinstance(value.get("columns"), dict)
        or sorted(value["columns"]) != sorted(entry.get("fields", []))
    ):
        raise CheckpointError(f"checkpoint file {snap / entry['file']} does not match the manifest")
    return value


async def load(
    client: AsyncTransferQueueClient,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    hold_s: float = HOLD_S,
) -> Any:
    """Load the checkpoint at ``path`` into the system (see the module docstring);
    returns the metadata it was saved with."""
    snap = Layout(path).current()
    manifest = check_manifest(snap)
    await asyncio.to_thread(_check_files, snap, manifest)
    partitions = await asyncio.to_thread(_read_state, snap, manifest)
    controller = client._controller
    begun = await controller.call(
        "checkpoint_restore_begin", partitions, manifest["bytes"], overwrite, hold_s
    )
    restore = begun["restore"]
    try:
        net = await _put_chunks(client, snap, manifest, begun, hold_s, progress)
        await controller.call("checkpoint_restore_commit", restore, net)
    except BaseException:
        await controller.call("checkpoint_restore_abort", restore)
        raise
    return manifest["metadata"]


async def _put_chunks(
    client: AsyncTransferQueueClient,
    snap: Path,
    manifest: dict[str, Any],
    begun: dict[str, Any],
    hold_s: float,
    progress: bool | None,
) -> int:
    """Write every chunk's rows to their new units (the next file is read meanwhile)."""
    entries = manifest["chunks"]
    files = manifest["files"]
    net = 0
    renewed = time.monotonic()
    bar = _progress(int(manifest["bytes"]), progress, "loading checkpoint")

    def read(i: int) -> asyncio.Future[dict[str, Any]]:
        entry = entries[i]
        return asyncio.ensure_future(
            asyncio.to_thread(_read_chunk, snap, entry, files[entry["file"]])
        )

    reading = read(0) if entries else None
    try:
        for i, entry in enumerate(entries):
            assert reading is not None
            value = await reading
            reading = read(i + 1) if i + 1 < len(entries) else None
            pid, rows = value["partition"], value["rows"]
            placement = begun["units"].get(pid)
            if placement is None or (len(rows) and int(rows.max()) >= len(placement)):
                raise CheckpointError(f"checkpoint chunk {entry['file']} names unknown rows")
            calls = []
            for unit, (positions, unit_rows) in group_by_unit(rows, placement[rows]).items():
                found = runs(positions)
                share = {n: take(c, positions, found) for n, c in value["columns"].items()}
                calls.append(client._unit_call(pid, unit, unit_rows, "put", pid, unit_rows, share))
            net += sum(int(r) for r in await asyncio.gather(*calls))
            bar.update(entry.get("data_bytes", 0))
            if time.monotonic() - renewed > hold_s / 4:
                await client._controller.call("checkpoint_renew", begun["restore"], hold_s)
                renewed = time.monotonic()
    finally:
        bar.close()
        if reading is not None:
            await asyncio.gather(reading, return_exceptions=True)
    return net


# ------------------------------------------------------------ the default client's
def save_checkpoint(
    path: str | os.PathLike[str], metadata: Any = None, *, progress: bool | None = None
) -> dict[str, Any]:
    """:meth:`TransferQueueClient.save_checkpoint` of the default system (``tq.init``)."""
    from transferqueue.client.default import get_client

    return get_client().save_checkpoint(path, metadata, progress=progress)


def load_checkpoint(
    path: str | os.PathLike[str], *, overwrite: bool = False, progress: bool | None = None
) -> Any:
    """:meth:`TransferQueueClient.load_checkpoint` of the default system (``tq.init``)."""
    from transferqueue.client.default import get_client

    return get_client().load_checkpoint(path, overwrite=overwrite, progress=progress)


async def async_save_checkpoint(
    path: str | os.PathLike[str], metadata: Any = None, *, progress: bool | None = None
) -> dict[str, Any]:
    """:meth:`AsyncTransferQueueClient.save_checkpoint` of the default system."""
    from transferqueue.client.default import get_async_client

    return await get_async_client().save_checkpoint(path, metadata, progress=progress)


async def async_load_checkpoint(
    path: str | os.PathLike[str], *, overwrite: bool = False, progress: bool | None = None
) -> Any:
    """:meth:`AsyncTransferQueueClient.load_checkpoint` of the default system."""
    from transferqueue.client.default import get_async_client

    return await get_async_client().load_checkpoint(path, overwrite=overwrite, progress=progress)
