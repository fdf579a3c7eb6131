"""A write's input, validated: row ids, and the columns of one write (:class:`FieldData`).

Row ids come in as lists, ranges or 1-D integer tensors and leave as int64 numpy arrays
(:func:`row_array`; :func:`as_rows` as a tensor): the store indexes its per-slot state with
numpy, which handles a few slots in ~1 us where a torch call costs 5-10 us.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transferqueue.errors import SchemaError

__all__ = [
    "MAX_ROW",
    "FieldData",
    "as_rows",
    "copy_value",
    "dense_rows",
    "lo_hi",
    "row_array",
    "tensor_nbytes",
    "value_nbytes",
]

MAX_ROW = 2**31 - 1
_IMMUTABLE = (str, bytes, int, float, bool, complex, type(None))


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def value_nbytes(value: Any) -> int:
    """Rough size of a non-tensor value."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, torch.Tensor):
        return tensor_nbytes(value)
    return sys.getsizeof(value)


def copy_value(value: Any) -> Any:
    return value if type(value) in _IMMUTABLE else copy.deepcopy(value)


def lo_hi(a: np.ndarray) -> tuple[int, int]:
    """``(min, max)`` of a non-empty array (plain Python for a few values: a numpy
    reduction costs more to set up than the loop)."""
    if a.size <= 16:
        values = a.tolist()
        return min(values), max(values)
    return int(a.min()), int(a.max())


def _rows_array(rows: Any) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        if rows.numel() and (
            rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex()
        ):
            raise SchemaError(f"rows must be integers, got dtype {rows.dtype}")
        if rows.dim() != 1:
            raise SchemaError(f"rows must be 1-D, got shape {tuple(rows.shape)}")
        return rows.detach().to(device="cpu", dtype=torch.int64).numpy()
    if isinstance(rows, range):
        return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    try:  # numpy converts a list of ints several times faster than torch does
        arr = np.asarray(rows)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"rows must be a list or 1-D tensor of ints: {exc}") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise SchemaError(f"rows must be integers, got {arr.dtype} values")
    if arr.ndim != 1:
        raise SchemaError(f"rows must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def row_array(rows: Any, unique: bool) -> np.ndarray:
    """``rows`` as a 1-D int64 numpy array of valid row ids; SchemaError otherwise."""
    arr = _rows_array(rows)
    if arr.size == 0:
        return arr
    lo, hi = lo_hi(arr)
    if lo < 0 or hi > MAX_ROW:
        raise SchemaError(f"rows must be in [0, {MAX_ROW}], got values in [{lo}, {hi}]")
    if unique and arr.size > 1:
        small = arr.size <= 16
        dup = len(set(arr.tolist())) != arr.size if small else np.unique(arr).size != arr.size
        if dup:
            raise SchemaError("rows of one write must be unique")
    return arr


def as_rows(rows: Any, unique: bool) -> torch.Tensor:
    """``rows`` as a 1-D int64 CPU tensor of valid row ids; SchemaError otherwise."""
    return torch.from_numpy(row_array(rows, unique))


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t  # a new tensor object costs ~5 us


def _tensors(data: Any) -> list[torch.Tensor]:
    return [data] if isinstance(data, torch.Tensor) else list(data)


def dense_rows(data: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A dense column given as one tensor or as consecutive chunks, as one tensor."""
    return data if isinstance(data, torch.Tensor) else torch.cat(data)


def _uniform(items: list[torch.Tensor]) -> bool:
    """Whether per-row tensors can be packed jagged (same ndim >= 1, same trailing dims)."""
    first = items[0]
    trail = first.shape[1:]
    return first.dim() >= 1 and all(t.dim() == first.dim() and t.shape[1:] == trail for t in items)


@dataclass(frozen=True)
class FieldData:
    """A validated column of one write (its data not copied yet).

    ``kind``: ``"dense"`` (``data`` a tensor), ``"jagged"`` (``data`` tensors whose
    concatenation holds the rows, split by ``lengths``), ``"rows"`` (``data`` per-row tensors
    of differing ndim or trailing dims) or ``"values"`` (``data`` a list of values).
    """

    kind: str
    data: Any
    nbytes: int
    dtype: torch.dtype | None = None
    lengths: torch.Tensor | None = None

    @property
    def is_tensor(self) -> bool:
        return self.kind != "values"

    def cast(self, dtype: torch.dtype) -> FieldData:
        """This column in ``dtype`` (a tensor column; itself when it is in it already)."""
        if self.dtype is None or self.dtype == dtype:
            return self
        data = (
            self.data.to(dtype)
            if isinstance(self.data, torch.Tensor)
            else [t.to(dtype) for t in self.data]
        )
        nbytes = sum(tensor_nbytes(t) for t in _tensors(data))
        return FieldData(self.kind, data, nbytes, dtype, self.lengths)

    @staticmethod
    def from_column(name: str, col: Any, n: int) -> FieldData:
        if isinstance(col, dict):
            return FieldData._from_pieces(name, col, n)
        if isinstance(col, torch.Tensor) and col.is_nested:
            return FieldData._from_nested(name, col.detach(), n)
        if isinstance(col, torch.Tensor):
            if col.dim() == 0 or col.shape[0] != n:
                raise SchemaError(
                    f"field {name!r}: tensor of shape {tuple(col.shape)} does not have "
                    f"one entry per row ({n} rows)"
                )
            return FieldData("dense", _detached(col), tensor_nbytes(col), col.dtype)
        if isinstance(col, (list, tuple)):
            return FieldData._from_list(name, list(col), n)
        raise SchemaError(
            f"field {name!r}: a column must be a tensor, a nested tensor or a list, "
            f"got {type(col).__name__}"
        )

    @staticmethod
    def _from_pieces(name: str, col: dict[str, Any], n: int) -> FieldData:
        """A column sent in runs (views of a caller's batch, see
        :func:`~transferqueue.client.routing.take`): ``{"pieces": [tensor, ...]}`` dense
        rows, or ``{"values": [tensor, ...], "lengths": tensor}`` jagged rows packed."""
        keys = sorted(col)
        parts = col.get("pieces") if keys == ["pieces"] else col.get("values")
        lengths = col.get("lengths") if keys == ["lengths", "values"] else None
        ok = keys == ["pieces"] or isinstance(lengths, torch.Tensor)
        if not (ok and isinstance(parts, list) and parts):
            raise SchemaError(
                f"field {name!r}: a dict column is {{'pieces': [tensor, ...]}} or "
                f"{{'values': [tensor, ...], 'lengths': tensor}}; got keys {keys}"
            )
        if not all(isinstance(t, torch.Tensor) and not t.is_nested and t.dim() for t in parts):
            raise SchemaError(f"field {name!r}: pieces must be plain tensors of rank >= 1")
        if len({(t.dtype, tuple(t.shape[1:])) for t in parts}) != 1:
            raise SchemaError(f"field {name!r}: pieces differ in dtype or trailing shape")
        total = sum(t.shape[0] for t in parts)
        nbytes = sum(tensor_nbytes(t) for t in parts)
        parts = [t.detach() for t in parts]
        if lengths is None:
            if total != n:
                raise SchemaError(f"field {name!r}: pieces hold {total} rows for {n} rows")
            return FieldData("dense", parts, nbytes, parts[0].dtype)
        lengths = lengths.to("cpu", torch.int64)
        if lengths.dim() != 1 or lengths.numel() != n:
            raise SchemaError(f"field {name!r}: lengths must hold one entry per row ({n} rows)")
        if bool((lengths < 0).any()) or int(lengths.sum()) != total:
            raise SchemaError(f"field {name!r}: lengths do not add up to the {total} values sent")
        return FieldData("jagged", parts, nbytes, parts[0].dtype, lengths)

    @staticmethod
    def _from_nested(name: str, col: torch.Tensor, n: int) -> FieldData:
        simple = getattr(col, "_lengths", None) is None and getattr(col, "_ragged_idx", 1) == 1
        if col.layout != torch.jagged or not simple:
            return FieldData._from_list(name, list(col.unbind()), n)
        if col.size(0) != n:
            raise SchemaError(f"field {name!r} has {col.size(0)} entries for {n} rows")
        offsets: torch.Tensor = col.offsets().cpu()  # type: ignore[attr-defined]
        start, end = int(offsets[0]), int(offsets[-1])
        values = col.values()[start:end]
        return FieldData("jagged", [values], tensor_nbytes(values), col.dtype, offsets.diff())

    @staticmethod
    def _from_list(name: str, items: list[Any], n: int) -> FieldData:
        if len(items) != n:
            raise SchemaError(f"field {name!r} has {len(items)} entries for {n} rows")
        n_tensors = sum(isinstance(x, torch.Tensor) for x in items)
        if n_tensors == 0:
            return FieldData("values", items, sum(value_nbytes(v) for v in items))
        if n_tensors != n:
            raise SchemaError(f"field {name!r} mixes tensors and non-tensor values")
        dtypes = {t.dtype for t in items}
        if len(dtypes) != 1 or any(t.is_nested for t in items):
            raise SchemaError(
                f"field {name!r}: per-row tensors must be plain tensors of one dtype, "
                f"got dtypes {sorted(str(d) for d in dtypes)}"
            )
        rows = [t.detach() for t in items]
        nbytes = sum(tensor_nbytes(t) for t in rows)
        if _uniform(rows):
            lengths = torch.tensor([t.shape[0] for t in rows], dtype=torch.int64)
            return FieldData("jagged", rows, nbytes, rows[0].dtype, lengths)
        return FieldData("rows", rows, nbytes, rows[0].dtype)
