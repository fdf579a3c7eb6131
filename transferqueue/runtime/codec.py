"""Wire encoding of tensors and plain values: a msgpack header plus one raw frame per tensor.

``encode(obj)`` returns ``[header, buf1, buf2, ...]``. The header is the msgpack encoding of
``obj`` in which every tensor is replaced by a small descriptor (dtype name, shape, frame
index); each ``buf`` is a flat byte ``memoryview`` of the tensor's own storage (it keeps the
tensor alive), so nothing is copied unless the tensor is not contiguous (then
``.contiguous()`` makes one copy). Sizes are msgpack integers, i.e. 64-bit: a single tensor
may exceed 4 GiB.

``decode(frames)`` accepts anything with the buffer protocol (``bytes``, ``bytearray``,
``memoryview``, numpy arrays, ``zmq.Frame``; an object exposing ``.buffer`` also works) and
builds every tensor *on* the received buffer with :func:`torch.frombuffer`: no copy, and the
tensor keeps the buffer alive and shares memory with it. Writing to a tensor decoded from a
read-only buffer (``bytes``) is undefined, as torch warns; the warning itself is silenced in a
narrow scope. A buffer whose address is not aligned to the element size is copied once.

Payloads: ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``, ``bytes``/``bytearray``/
``memoryview`` (decoded as ``bytes``, carried inline in the header), ``list``, ``tuple`` (stays
a tuple; ``torch.Size`` decodes as a tuple), ``dict`` (``str``/``int`` keys keep their type),
dense tensors of every dtype (0-d, empty, non-contiguous), nested tensors (jagged and strided),
``TensorDict`` (batch size, key order, nested TensorDicts, ``NonTensorData``,
``NonTensorStack``) and types added with :func:`register_type`. Tensors are detached; CUDA
tensors are copied to CPU on encode and decode as CPU tensors (TensorDicts likewise lose their
device). Anything else raises ``TypeError`` naming the type and where it sits, e.g.
``payload['kwargs']['x'][2]``. No pickle, ever.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import torch

if TYPE_CHECKING:
    from tensordict import NonTensorStack

#: torch 2.13's ``torch.nested.nested_tensor_from_jagged`` (which decoding jagged fields and
#: splitting jagged batches call) calls the deprecated ``torch.fx.is_fx_tracing``, which logs
#: this once per process through logger ``torch.fx._symbolic_trace`` (not a Python warning).
#: It is about torch internals we use, not about the user's code: every process that loads
#: the codec (clients and actor processes alike) drops exactly this record.
FX_TRACING_NOTICE = "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"


def _not_fx_tracing_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(FX_TRACING_NOTICE)


logging.getLogger("torch.fx._symbolic_trace").addFilter(_not_fx_tracing_notice)

__all__ = ["decode", "encode", "register_type"]

# msgpack extension codes (0..127). Frame 0 is the header; a tensor names its frame by index.
_TUPLE, _TENSOR, _JAGGED, _STRIDED_NESTED, _TENSORDICT, _NON_TENSOR, _NON_TENSOR_STACK = range(1, 8)
_REGISTERED = 8
_MARKERS = {code: msgpack.ExtType(code, b"") for code in range(1, 9)}

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
_DTYPE_NAMES: dict[torch.dtype, str] = {d: name for name, d in _DTYPES.items()}
_NUMPY_DTYPES = frozenset(  # dtypes that Tensor.numpy() accepts directly (the fast path)
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16}
    | {torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64}
    | {torch.complex64, torch.complex128}
)
_SCALARS = frozenset({type(None), bool, float, str, bytes, bytearray, memoryview})
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_SUPPORTED = (
    "supported are None, bool, int, float, str, bytes, list, tuple, dict, torch.Tensor, "
    "TensorDict, and types added with transferqueue.runtime.codec.register_type()"
)
_NOT_WRITABLE = "The given buffer is not writable"
_NESTED_PROTOTYPE = "The PyTorch API of nested tensors is in prototype stage"

# name -> (cls, to_plain, from_plain), and cls -> name
_REGISTRY: dict[str, tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = {}
_REGISTERED_NAMES: dict[type, str] = {}


def _td() -> Any:
    """The tensordict module, imported on first use. Importing it costs ~1.4 s (it loads
    torch._dynamo); a process that never meets a TensorDict -- a controller or storage-unit
    actor -- does not pay that at start-up. An object whose type comes from tensordict can
    only exist once tensordict is imported, so the encoder asks for it only then."""
    import tensordict

    return tensordict


def _from_tensordict(t: type) -> bool:
    module = getattr(t, "__module__", None)
    return isinstance(module, str) and module.startswith("tensordict")


class _UnsupportedError(TypeError):
    """Raised inside the encoder; :func:`encode` turns it into a TypeError with a path."""


def register_type(
    cls: type, name: str, to_plain: Callable[[Any], Any], from_plain: Callable[[Any], Any]
) -> None:
    """Let objects whose type is exactly ``cls`` travel as ``to_plain(obj)``.

    ``to_plain`` returns any encodable value; the receiver (which must have registered the
    same ``name``) rebuilds the object with ``from_plain(plain)``. Registering the same
    ``(cls, name)`` again replaces the functions.
    """
    exact: tuple[type, ...] = (int, list, tuple, dict)
    subclasses: tuple[type, ...] = (torch.Tensor,)
    if any(_from_tensordict(c) for c in cls.__mro__):  # then tensordict is imported already
        td = _td()
        exact += (td.TensorDict, td.NonTensorData)
        subclasses += (td.NonTensorStack,)
    if cls in _SCALARS or cls in exact:
        raise ValueError(f"{cls.__qualname__} is encoded natively and cannot be registered")
    if issubclass(cls, subclasses):
        raise ValueError(f"{cls.__qualname__} is encoded natively and cannot be registered")
    owner = _REGISTRY.get(name)
    if owner is not None and owner[0] is not cls:
        raise ValueError(f"codec type name {name!r} is already used by {owner[0].__qualname__}")
    old_name = _REGISTERED_NAMES.get(cls)
    if old_name is not None and old_name != name:
        raise ValueError(f"{cls.__qualname__} is already registered as {old_name!r}")
    _REGISTRY[name] = (cls, to_plain, from_plain)
    _REGISTERED_NAMES[cls] = name


# ----------------------------------------------------------------------------- encoding
#
# A value msgpack cannot carry as is (tuple, tensor, TensorDict, registered type) is sent as a
# list whose first item is an empty msgpack extension, the marker: ``[<tuple>, 1, 2]``,
# ``[<tensor>, "float32", [2, 3], frame_index]``. The marker cannot come from user data (an
# ExtType is a tuple subclass, which the encoder rejects), the whole header is written by one
# C-level pass of a reused Packer, and the decoder rebuilds such lists in its ``list_hook``.


class _Encoder:
    """One per thread: a reused msgpack Packer and the frames of the call in progress."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(default=self.default, strict_types=True, autoreset=True)
        self.frames: list[bytes | memoryview] = []
        self.busy = False

    def encode(self, obj: Any) -> list[bytes | memoryview]:
        frames: list[bytes | memoryview] = [b""]
        self.frames = frames
        self.busy = True
        try:
            frames[0] = self.packer.pack(obj)
        except _UnsupportedError as exc:
            raise TypeError(_locate(obj, "payload") or str(exc)) from None
        finally:
            self.frames = []  # hold no tensor past the call
            self.busy = False
        return frames

    def default(self, o: Any) -> Any:  # called by msgpack for every non-native value
        t = type(o)
        if t is torch.Tensor:  # the common case first
            return self.tensor(o)
        if t is tuple or t is torch.Size:
            return [_MARKERS[_TUPLE], *o]
        if isinstance(o, torch.Tensor):
            return self.tensor(o)
        if _from_tensordict(t):
            td = _td()
            if t is td.TensorDict:
                keys = list(o.keys())
                return [_MARKERS[_TENSORDICT], list(o.batch_size), keys, list(o.values())]
            if t is td.NonTensorData:
                return [_MARKERS[_NON_TENSOR], o.data, list(o.batch_size)]
            if t is td.NonTensorStack:
                return [_MARKERS[_NON_TENSOR_STACK], o.tolist(), list(o.batch_size)]
        name = _REGISTERED_NAMES.get(t)
        if name is not None:
            return [_MARKERS[_REGISTERED], name, _REGISTRY[name][1](o)]
        raise _UnsupportedError(
            f"cannot encode object of type {t.__name__!r}: {_leaf_problem(o) or _SUPPORTED}"
        )

    def tensor(self, t: torch.Tensor) -> list[Any]:
        if t.is_nested:
            if t.layout is torch.jagged:
                ragged_idx = t._ragged_idx  # type: ignore[attr-defined]
                offsets, lengths = t.offsets(), t.lengths()  # type: ignore[attr-defined]
                return [_MARKERS[_JAGGED], t.values(), offsets, lengths, ragged_idx]
            parts = list(t.detach().unbind())
            return [_MARKERS[_STRIDED_NESTED], _DTYPE_NAMES[t.dtype], parts]
        if (  # a plain contiguous CPU tensor (most are): a view of its numpy array
            t.is_cpu
            and t.layout is torch.strided
            and t.dtype in _NUMPY_DTYPES
            and t.dim()
            and t.is_contiguous()
            and not (t.requires_grad or t.is_quantized or t.is_conj() or t.is_neg())
        ):
            # numpy ignores the strides of size-1 dims, so no as_strided is needed here
            self.frames.append(t.numpy().data.cast("B") if t.numel() else memoryview(b""))
        else:
            problem = _tensor_problem(t)
            if problem is not None:
                raise _UnsupportedError(f"cannot encode tensor: {problem}")
            self.frames.append(_tensor_buffer(t))
        return [_MARKERS[_TENSOR], _DTYPE_NAMES[t.dtype], list(t.shape), len(self.frames) - 1]


_local = threading.local()


def encode(obj: Any) -> list[bytes | memoryview]:
    """Encode ``obj`` into ``[header, *tensor_buffers]`` (see the module docstring)."""
    encoder: _Encoder | None = getattr(_local, "encoder", None)
    if encoder is None:
        encoder = _local.encoder = _Encoder()
    elif encoder.busy:  # re-entered, e.g. from a to_plain function
        encoder = _Encoder()
    return encoder.encode(obj)


def _tensor_problem(t: torch.Tensor) -> str | None:
    if t.is_nested:
        return None
    if t.layout is not torch.strided:
        return f"layout {t.layout} is not supported (send a dense tensor)"
    if t.is_quantized:
        return "quantized tensors are not supported (send int_repr() and the scales)"
    if t.device.type == "meta":
        return "meta tensors have no data"
    return None


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    """A flat byte view of ``t``'s data: no copy for a contiguous CPU tensor."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.as_strided((t.numel(),), (1,))  # reshape(-1) may keep the stride of a size-1 dim
    if t.dtype in _NUMPY_DTYPES:
        return flat.numpy().data.cast("B")
    return flat.view(torch.uint8).numpy().data


def _leaf_problem(o: Any) -> str | None:
    """Why the leaf ``o`` cannot be encoded, or None when it can."""
    t = type(o)
    if t in _SCALARS:
        return None
    if t is int:
        return None if _INT_MIN <= o <= _INT_MAX else f"{o} does not fit in 64 bits"
    if isinstance(o, torch.Tensor):
        return _tensor_problem(o)
    return _SUPPORTED


def _children(o: Any) -> list[tuple[str, Any]] | None:
    """The values the encoder descends into, each with its path suffix; None for a leaf."""
    t = type(o)
    if t is list or t is tuple or t is torch.Size:
        return [(f"[{i}]", x) for i, x in enumerate(o)]
    if t is dict:
        return [item for k, v in o.items() for item in ((f" (key {k!r})", k), (f"[{k!r}]", v))]
    if _from_tensordict(t):
        td = _td()
        if t is td.TensorDict:
            return [(f"[{k!r}]", v) for k, v in o.items()]
        if t is td.NonTensorData:
            return [(".data", o.data)]
        if t is td.NonTensorStack:
            return [(".tolist()", o.tolist())]
    name = _REGISTERED_NAMES.get(t)
    if name is not None:
        return [(f"<{name}>", _REGISTRY[name][1](o))]
    return None


def _locate(o: Any, path: str) -> str | None:
    """The error message for the first value under ``o`` that cannot be encoded."""
    children = _children(o)
    if children is None:
        problem = _leaf_problem(o)
        if problem is None:
            return None
        return f"cannot encode object of type {type(o).__name__!r} at {path}: {problem}"
    for suffix, child in children:
        found = _locate(child, path + suffix)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- decoding


class _Marker:
    """What the decoder's ext_hook returns for a marker; ``list_hook`` rebuilds its list."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


_MARKER_OBJECTS = {code: _Marker(code) for code in _MARKERS}


def _marker_hook(code: int, data: bytes) -> _Marker:
    marker = _MARKER_OBJECTS.get(code)
    if marker is None or data:
        raise ValueError(f"unknown codec extension {code} (is the sender's transferqueue newer?)")
    return marker


def decode(frames: Sequence[Any]) -> Any:
    """Rebuild the object from ``frames`` as produced by :func:`encode`.

    Tensors are built on the given buffers without copying (see the module docstring).
    """
    if len(frames) == 1:  # the hot path: a header without tensors
        header = frames[0]
        return _unpack(
            header if type(header) is bytes else _as_buffer(header), _list_hook_no_frames
        )
    if len(frames) == 0:
        raise ValueError("decode() needs at least the header frame")
    bufs = [_as_buffer(f) for f in frames]
    used = 0

    def list_hook(items: list[Any]) -> Any:
        nonlocal used
        if not items or type(items[0]) is not _Marker:
            return items
        if items[0].code == _TENSOR:
            used += 1
            return _decode_tensor(items, bufs)
        return _rebuild(items)

    if any(b.readonly for b in bufs[1:]):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
            obj = _unpack(bufs[0], list_hook)
    else:
        obj = _unpack(bufs[0], list_hook)
    if used != len(bufs) - 1:
        raise ValueError(f"header describes {used} tensor frame(s) but {len(bufs) - 1} came")
    return obj


def _unpack(header: bytes | memoryview, list_hook: Callable[[list[Any]], Any]) -> Any:
    return msgpack.unpackb(header, ext_hook=_marker_hook, list_hook=list_hook, strict_map_key=False)


def _list_hook_no_frames(items: list[Any]) -> Any:
    if not items or type(items[0]) is not _Marker:
        return items
    if items[0].code == _TENSOR:
        raise ValueError("header describes a tensor frame but no frames came")
    return _rebuild(items)


def _as_buffer(frame: Any) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError:
        buffer = getattr(frame, "buffer", None)  # e.g. zmq.Frame on backends without __buffer__
        if buffer is None:
            raise TypeError(f"frame of type {type(frame).__name__!r} has no buffer") from None
        view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("frames must be C-contiguous buffers")
    return view


def _decode_tensor(items: list[Any], bufs: list[memoryview]) -> torch.Tensor:
    _, dtype_name, shape, index = items
    dtype = _dtype(dtype_name)
    if not 0 < index < len(bufs):
        raise ValueError(f"header refers to frame {index} but only {len(bufs)} frames came")
    buf = bufs[index]
    nbytes = math.prod(shape) * dtype.itemsize
    if buf.nbytes != nbytes:
        raise ValueError(f"frame {index} has {buf.nbytes} bytes, expected {nbytes}")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8).view(dtype).reshape(shape)
    raw = torch.frombuffer(buf, dtype=dtype)
    if raw.data_ptr() % min(dtype.itemsize, 8):  # a misaligned slice of a larger buffer
        raw = torch.frombuffer(buf, dtype=torch.uint8).clone().view(dtype)
    return raw if len(shape) == 1 else raw.view(shape)


def _dtype(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {name!r} (is the sender's torch newer?)")
    return dtype


def _rebuild(items: list[Any]) -> Any:
    code = items[0].code
    if code == _TUPLE:
        return tuple(items[1:])
    if code == _TENSORDICT:
        _, batch_size, keys, values = items
        return _td().TensorDict(dict(zip(keys, values, strict=True)), batch_size=batch_size)
    if code == _NON_TENSOR:
        return _td().NonTensorData(items[1], batch_size=items[2])
    if code == _NON_TENSOR_STACK:
        return _non_tensor_stack(items[1], items[2])
    if code == _JAGGED:
        _, values, offsets, lengths, ragged_idx = items
        return torch.nested.nested_tensor_from_jagged(
            values, offsets, lengths, jagged_dim=ragged_idx
        )
    if code == _STRIDED_NESTED:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NESTED_PROTOTYPE, category=UserWarning)
            return torch.nested.nested_tensor(items[2], dtype=_dtype(items[1]))
    name, plain = items[1], items[2]
    entry = _REGISTRY.get(name)
    if entry is None:
        raise TypeError(f"cannot decode type {name!r}: no codec.register_type() for it here")
    return entry[2](plain)


def _non_tensor_stack(items: list[Any], batch_size: list[int]) -> NonTensorStack:
    td = _td()
    if len(batch_size) == 1:
        return td.NonTensorStack(*[td.NonTensorData(x, batch_size=[]) for x in items])
    return td.NonTensorStack(*[_non_tensor_stack(x, batch_size[1:]) for x in items])
