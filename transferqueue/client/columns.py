"""Batches as columns: what the client sends to storage units and how it rebuilds them.

A *column* is one field of a batch of B rows, in one of three forms:

* a dense tensor of shape ``(B, *row_shape)``;
* a list of B per-row tensors (a jagged field: row shapes differ);
* a list of B plain values (a non-tensor field: strings, dicts, numbers).

:func:`to_columns` turns user input (a ``TensorDict`` with one batch dimension, or a dict of
tensors / lists) into columns plus a :class:`FieldSpec` per field; :func:`assemble` turns the
per-unit columns that storage units return into one ``TensorDict`` in batch order.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase

from transferqueue.client import routing
from transferqueue.client.device import ToDevice
from transferqueue.errors import SchemaError
from transferqueue.storage._arena import word_rows

Column = Any  # torch.Tensor | list[torch.Tensor] | list[Any]


def field_spec(column: Column) -> dict[str, Any]:
    """``{"dtype": "torch.float32" | "object", "ndim": per-row rank or -1}``."""
    if isinstance(column, torch.Tensor):
        return {
            "dtype": str(column.dtype),
            "ndim": column.dim() - 1,
        }  # nested: dim() counts the batch
    tensors = [v for v in column if isinstance(v, torch.Tensor)]
    if tensors and len(tensors) == len(column):
        dtypes = {t.dtype for t in tensors}
        ranks = {t.dim() for t in tensors}
        if len(dtypes) > 1 or len(ranks) > 1:
            raise SchemaError(
                f"the rows of one field must share dtype and rank; got dtypes {sorted(map(str, dtypes))} "
                f"and ranks {sorted(ranks)}"
            )
        return {"dtype": str(tensors[0].dtype), "ndim": tensors[0].dim()}
    if tensors:
        raise SchemaError("a field mixes tensors and non-tensor values")
    return {"dtype": "object", "ndim": -1}


def _dtype_of(column: Column) -> torch.dtype | None:
    if isinstance(column, torch.Tensor):
        return column.dtype
    if column and all(isinstance(v, torch.Tensor) for v in column):
        return column[0].dtype
    return None


def cast(column: Column, dtype: torch.dtype) -> Column:
    """A tensor column (dense, nested or per-row tensors) in ``dtype``."""
    if isinstance(column, torch.Tensor):
        return column.to(dtype)
    return [v.to(dtype) for v in column]


def cast_columns(columns: dict[str, Column], dtypes: Mapping[str, str] | None) -> dict[str, Column]:
    """``columns`` with the fields ``dtypes`` names (``{field: "torch.float32"}``, what the
    partition holds them as) cast to those dtypes."""
    if not dtypes:
        return columns
    out = dict(columns)
    for name, dtype in dtypes.items():
        target = getattr(torch, dtype.removeprefix("torch."), None)
        if name in out and isinstance(target, torch.dtype) and _dtype_of(out[name]) is not None:
            out[name] = cast(out[name], target)
    return out


def common_dtype(columns: Sequence[Column]) -> torch.dtype | None:
    """``torch.promote_types`` of the dtypes of tensor ``columns`` (the pieces of one field
    from several units) when they differ; ``None`` when they agree (or hold no tensors)."""
    dtypes = {d for d in map(_dtype_of, columns) if d is not None}
    if len(dtypes) < 2:
        return None
    out = dtypes.pop()
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def payload_bytes(columns: dict[str, Column]) -> int:
    """About the bytes a put stores (what the controller reserves against the capacity;
    the commit replaces it by what the units report)."""
    total = 0
    for col in columns.values():
        if isinstance(col, torch.Tensor):
            if col.is_nested:
                values = getattr(col, "values", None)
                if col.layout == torch.jagged and values is not None:
                    total += values().nbytes
                else:
                    total += sum(t.nbytes for t in col.unbind())
            else:
                total += col.nbytes
            continue
        for v in col:
            if isinstance(v, torch.Tensor):
                total += v.nbytes
            elif isinstance(v, (str, bytes)):
                total += len(v)
            else:
                total += sys.getsizeof(v)
    return total


def _column(name: str, value: Any) -> tuple[Column, int]:
    if isinstance(value, torch.Tensor):
        if value.is_nested:  # stays nested: storage keeps jagged fields as values + offsets
            return value, value.size(0)
        if value.dim() == 0:
            raise SchemaError(f"field {name!r} is a 0-d tensor; a field needs a batch dimension")
        return value.detach(), value.shape[0]
    if isinstance(value, NonTensorStack):
        items = value.tolist()
        return list(items), len(items)
    if isinstance(value, NonTensorData):
        return [value.data], -1  # broadcast to the batch below
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and all(isinstance(v, torch.Tensor) for v in items):
            shapes = {tuple(v.shape) for v in items}
            if len(shapes) == 1:
                return torch.stack(items), len(items)
        return items, len(items)
    raise SchemaError(
        f"field {name!r}: expected a tensor, a nested tensor or a list; got {type(value).__name__}"
    )


def _plain_columns(data: Mapping[Any, Any]) -> tuple[int, dict[str, Column]] | None:
    """The fast path of :func:`to_columns` (a rollout's dict of plain dense tensors of one
    batch size: the columns as they are); ``None``: not that case."""
    columns: dict[str, Column] = {}
    n = -1
    for key, value in data.items():
        if type(value) is not torch.Tensor or value.is_nested or not value.dim():
            return None
        size = value.shape[0]
        if size != n:
            if n >= 0 or size == 0:
                return None  # the general path says what is wrong
            n = size
        columns[str(key)] = value.detach() if value.requires_grad else value
    return (n, columns) if columns else None


def to_columns(data: Any) -> tuple[int, dict[str, Column]]:
    """User data -> (batch size, columns). Raises SchemaError for malformed batches."""
    if type(data) is dict:
        plain = _plain_columns(data)
        if plain is not None:
            return plain
    if isinstance(data, TensorDictBase):
        if len(data.batch_size) != 1:
            raise SchemaError(
                f"a put takes a TensorDict with one batch dimension; got batch_size {list(data.batch_size)}"
            )
        items = [(str(k), data.get(k)) for k in data.keys()]
    elif isinstance(data, Mapping):
        items = [(str(k), v) for k, v in data.items()]
    else:
        raise SchemaError(f"put takes a TensorDict or a dict of columns; got {type(data).__name__}")
    if not items:
        raise SchemaError("the batch has no fields")
    columns: dict[str, Column] = {}
    sizes: dict[str, int] = {}
    for name, value in items:
        if isinstance(value, TensorDictBase) and not isinstance(
            value, (NonTensorStack, NonTensorData)
        ):
            raise SchemaError(
                f"field {name!r}: nested TensorDicts are not supported; flatten the keys"
            )
        columns[name], size = _column(name, value)
        if size >= 0:
            sizes[name] = size
    distinct = set(sizes.values())
    if len(distinct) > 1:
        raise SchemaError(f"fields have different batch sizes: {sizes}")
    if not distinct:
        raise SchemaError("cannot tell the batch size: every field is a single broadcast value")
    n = distinct.pop()
    if n == 0:
        raise SchemaError("the batch is empty (0 rows)")
    for name, col in columns.items():
        if name not in sizes:
            columns[name] = col * n
    return n, columns


def assemble(
    n: int,
    fields: Sequence[str],
    parts: Sequence[tuple[Any, Mapping[str, Column]]],
    device: torch.device | str | None = None,
    copy: bool = False,
) -> TensorDict:
    """Merge per-unit columns (``(positions, columns)``) into one TensorDict of ``n`` rows.

    ``copy``: the columns share memory with the store (inproc replies); the result won't."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cpu":
        copy = False  # the move to ``device`` below is the copy
    if dev is not None and dev.type == "cuda":
        with ToDevice(dev) as move:  # through pinned staging buffers (client/device.py)
            return _assemble(n, fields, parts, copy, move)
    td = _assemble(n, fields, parts, copy, None)
    return td.to(dev) if dev is not None else td


def _assemble(
    n: int,
    fields: Sequence[str],
    parts: Sequence[tuple[Any, Mapping[str, Column]]],
    copy: bool,
    move: ToDevice | None,
) -> TensorDict:
    out: dict[str, Any] = {}
    # every field has the same pieces of the batch: find their runs once
    found = [routing.runs(pos) for pos, _ in parts] if n >= routing.SMALL else None
    by_field = {}
    for name in fields:
        pieces = [(pos, cols[name]) for pos, cols in parts]
        dtype = common_dtype([col for _, col in pieces]) if len(pieces) > 1 else None
        if dtype is not None:  # units caught mid-promotion (a put widening the field)
            pieces = [
                (p, col if _dtype_of(col) in (None, dtype) else cast(col, dtype))
                for p, col in pieces
            ]
        by_field[name] = pieces
    if move is not None:  # to a device: dense fields through one pinned buffer each
        for name, pieces in by_field.items():
            moved = move.dense(pieces, n)
            if moved is None:
                moved = move.column(_merged(pieces, n, copy, found, None))
            out[name] = moved
        return TensorDict(out, batch_size=[n], device=move.device)
    # the dense results of a big many-field batch share one pooled buffer
    plans = {k: routing.dense_result(p, n, copy) for k, p in by_field.items()}
    into = routing.carve({k: plan for k, plan in plans.items() if plan is not None})
    done = routing.in_parallel(
        lambda name: _merged(by_field[name], n, copy, found, into[name]), list(into)
    )
    for name, pieces in by_field.items():
        out[name] = done[name] if name in done else _merged(pieces, n, copy, found, None)
    return TensorDict(out, batch_size=[n])


def _merged(
    pieces: list[tuple[Any, Column]],
    n: int,
    copy: bool,
    found: list[list[tuple[int, int]]] | None,
    into: torch.Tensor | None,
) -> Any:
    """One field's pieces merged into one column (``into``: the planned dense result)."""
    merged = _merge_small_dense(pieces, n)
    if merged is None:
        merged = routing.assemble(pieces, n, copy, found, into)
    return merged if isinstance(merged, torch.Tensor) else _from_list(merged)


def _merge_small_dense(pieces: list[tuple[Any, Column]], n: int) -> torch.Tensor | None:
    """A small batch's dense CPU pieces from several units merged into one new tensor with
    one numpy scatter per piece (as integer words, so every dtype goes). Single-threaded on
    purpose: torch's intra-op threads made ``cat`` + ``index_select`` of 64 rows of 32 KB
    take 14-22 ms on a busy 2-core host (0.4 ms this way). ``None``: not that case."""
    if len(pieces) < 2 or n >= routing.SMALL:
        return None
    kind = routing.dense_pieces(pieces)
    if kind is None or kind[2] != n:
        return None
    shape, dtype, _ = kind
    out = torch.empty((n, *shape), dtype=dtype)
    if out[0:1].numel() == 0:
        return out
    dst = word_rows(out).numpy()
    for pos, col in pieces:
        index = pos.numpy() if isinstance(pos, torch.Tensor) else np.asarray(pos, dtype=np.int64)
        dst[index] = word_rows(col.contiguous()).numpy()
    return out


def _from_list(rows: list[Any]) -> Any:
    if rows and all(isinstance(r, torch.Tensor) for r in rows):
        try:
            return torch.nested.nested_tensor(rows, layout=torch.jagged)
        except (RuntimeError, ValueError):  # ragged in more than one dim: strided layout
            return torch.nested.nested_tensor(rows)
    if not any(isinstance(r, (list, tuple)) for r in rows):
        return NonTensorStack.from_list(rows)  # same stack, built ~40% faster
    return NonTensorStack(*rows)  # from_list would nest list values as stacks of their own
