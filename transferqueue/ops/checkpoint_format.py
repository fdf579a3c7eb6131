"""The checkpoint on disk: frame files, the manifest, and the atomic directory swap.

No asyncio, no pickle. Layout of a checkpoint at ``path`` (a directory)::

    path/CURRENT                 the name of the live snapshot directory, one line
    path/LOCK                    flock'ed by a save (one save at a time per path)
    path/snap-000007-1a2b3c4d/   a complete snapshot:
        manifest.json            format, version, user metadata, files and their sizes
        state.tqc                the controller's state (transferqueue.controller.snapshot)
        data/000000.tqc ...      the bytes: one file per (partition, fields, unit, rows) chunk

A ``.tqc`` file holds the codec frames of one value (:mod:`transferqueue.runtime.codec`: a msgpack
header plus one raw buffer per tensor): ``MAGIC``, the frame count and sizes (little-endian
u64), then the frames, each starting at a 64-byte boundary so tensors read back aligned.

Atomic: a save writes ``snap-N-ID.tmp/``, fsyncs every file and the directory, renames it
to ``snap-N-ID/``, fsyncs ``path``, then writes ``CURRENT.tmp``, fsyncs it and
``os.replace``-s it onto ``CURRENT`` (fsync ``path`` again). A crash at any point leaves
``CURRENT`` naming the previous complete snapshot; leftovers are removed by the next save.
Files are checked for size and structure on load, not checksummed (crc32 runs at about
1 GB/s here: it would halve a save).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from transferqueue.errors import CheckpointError
from transferqueue.runtime import codec

__all__ = [
    "FORMAT",
    "VERSION",
    "Layout",
    "check_manifest",
    "read_frames",
    "write_frames",
]

FORMAT = "transferqueue-checkpoint"
VERSION = 1
MAGIC = b"TQFRAME1"
_ALIGN = 64
_SNAP = re.compile(r"^snap-(\d{6,})-[0-9a-f]{8}$")


def _pad(n: int) -> int:
    return -n % _ALIGN


def write_frames(path: Path, value: Any) -> int:
    """Write ``value`` (a codec payload) to ``path`` and fsync it; returns the file size."""
    frames = codec.encode(value)
    sizes = [memoryview(f).nbytes for f in frames]
    head = MAGIC + struct.pack(f"<Q{len(sizes)}Q", len(sizes), *sizes)
    with open(path, "wb", buffering=0) as f:
        written = f.write(head + b"\0" * _pad(len(head)))
        for frame, size in zip(frames, sizes):
            view = memoryview(frame).cast("B") if size else b""
            while view:
                done = f.write(view)
                written += done
                view = view[done:]
            written += f.write(b"\0" * _pad(size))
        os.fsync(f.fileno())
    return written


def read_frames(path: Path, expected_size: int | None = None) -> Any:
    """The value written by :func:`write_frames` (tensors share one buffer read from the
    file); :class:`CheckpointError` for a missing, truncated or malformed file."""
    try:
        size = path.stat().st_size
        if expected_size is not None and size != expected_size:
            raise CheckpointError(
                f"checkpoint file {path} has {size} bytes, the manifest says {expected_size}: "
                f"it is truncated or was changed"
            )
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy().data).cast("B")
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from None
    if got != size or view[: len(MAGIC)] != MAGIC or size < len(MAGIC) + 8:
        raise CheckpointError(f"checkpoint file {path} is not a transferqueue frame file")
    (count,) = struct.unpack_from("<Q", view, len(MAGIC))
    start = len(MAGIC) + 8
    if count > (size - start) // 8:
        raise CheckpointError(f"checkpoint file {path} is corrupt (frame count {count})")
    sizes = struct.unpack_from(f"<{count}Q", view, start)
    pos = start + 8 * count
    pos += _pad(pos)
    frames = []
    for n in sizes:
        if pos + n > size:
            raise CheckpointError(f"checkpoint file {path} is truncated")
        frames.append(view[pos : pos + n])
        pos += n + _pad(n)
    try:
        return codec.decode(frames)
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {exc}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the snapshot directory ``path``, validated."""
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no manifest.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint manifest {file} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a transferqueue checkpoint manifest")
    version = manifest.get("version")
    if version != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this transferqueue reads "
            f"version {VERSION} (was it written by another release?)"
        )
    files = manifest.get("files")
    chunks = manifest.get("chunks")
    if not isinstance(files, dict) or "state.tqc" not in files or not isinstance(chunks, list):
        raise CheckpointError(f"checkpoint manifest {file} is corrupt: no file list")
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("file") not in files:
            raise CheckpointError(f"checkpoint manifest {file} is corrupt: a chunk names no file")
    for name, size in files.items():
        if not isinstance(size, int) or "/" in name.replace("data/", "", 1) or ".." in name:
            raise CheckpointError(f"checkpoint manifest {file} is corrupt: file {name!r}")
    return manifest


class Layout:
    """The directory of a checkpoint (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ reading
    def current(self) -> Path:
        """The live snapshot directory; :class:`CheckpointError` if there is none."""
        pointer = self.path / "CURRENT"
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            if (self.path / "manifest.json").exists():  # a snapshot directory itself
                return self.path
            raise CheckpointError(f"no checkpoint at {self.path} (no CURRENT file)") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from None
        if not _SNAP.match(name) or not (self.path / name).is_dir():
            raise CheckpointError(f"checkpoint {self.path}: CURRENT names {name!r}, not a snapshot")
        return self.path / name

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``path/LOCK`` (another save to the same path raises)."""
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"checkpoint path {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CheckpointError(
                    f"another save to checkpoint {self.path} is in progress"
                ) from None
            yield
        finally:
            os.close(fd)

    def _snapshots(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name.startswith("snap-")]

    def new_snapshot(self) -> tuple[Path, Path]:
        """A fresh temporary directory (with ``data/``) and the name it is to be renamed to;
        leftovers of crashed saves are removed first. Call under :meth:`locked`."""
        seqs = [0]
        for p in self._snapshots():
            m = _SNAP.match(p.name.removesuffix(".tmp"))
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
            elif m:
                seqs.append(int(m.group(1)))
        final = self.path / f"snap-{max(seqs) + 1:06d}-{uuid.uuid4().hex[:8]}"
        tmp = final.with_name(final.name + ".tmp")
        (tmp / "data").mkdir(parents=True)
        return tmp, final

    @staticmethod
    def seal(tmp: Path) -> None:
        """fsync the directories of a written snapshot (its files are fsynced already)."""
        _fsync_dir(tmp / "data")
        _fsync_dir(tmp)

    def rename(self, tmp: Path, final: Path) -> None:
        os.rename(tmp, final)
        _fsync_dir(self.path)

    def point_to(self, final: Path) -> None:
        """Make ``final`` the live snapshot (atomic), then remove the others."""
        pointer = self.path / "CURRENT.tmp"
        with open(pointer, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, self.path / "CURRENT")
        _fsync_dir(self.path)
        for p in self._snapshots():
            if p.name != final.name:
                shutil.rmtree(p, ignore_errors=True)


def manifest_of(
    metadata: Any,
    chunks: Sequence[dict[str, Any]],
    files: dict[str, int],
    summary: dict[str, Any],
    created: float,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_unix": created,
        "metadata": metadata,
        "bytes": sum(c["data_bytes"] for c in chunks),
        "partitions": summary,
        "chunks": list(chunks),
        "files": files,
    }


def write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
