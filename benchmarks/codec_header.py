"""msgspec vs msgpack on the codec's hot path: encoding and decoding small headers.

Run from the repository root: ``python -m benchmarks.codec_header``. Prints microseconds per encode+decode (best of
several repeats) for

1. the raw libraries on plain dicts (no tuples, no tensors): what each costs at best;
2. a complete strategy with each library, keeping tuples as tuples and tensors as frames:
   - msgpack (what ``transferqueue.runtime.codec`` does): a reused ``Packer(strict_types=True)``
     walks the tree in C and calls back into Python only for tuples and tensors, which it
     writes as marker lists; ``unpackb(list_hook=...)`` rebuilds them;
   - msgspec: its encoder writes tuples and sets as arrays without a hook, so a Python walk
     has to convert and validate the tree first;
3. ``transferqueue.runtime.codec`` itself.
"""

from __future__ import annotations

import functools
import timeit
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import torch

from transferqueue.runtime import codec

SMALL = {
    "id": 17,
    "method": "get_meta",
    "args": [["a", "b"], 64, "train@0", "task"],
    "kwargs": {"wait": True},
}
SMALL_TUPLE = dict(SMALL, args=(["a", "b"], 64, "train@0", "task"))
TENSORS = [torch.zeros(4, 8) for _ in range(5)]
DESCRIPTORS = dict(
    SMALL, tensors=[{"dtype": "float32", "shape": [64, 1024], "frame": i} for i in range(5)]
)
BATCH_META = {  # a BatchMeta-sized header: 1024 rows with per-row tags
    "partition": "train@0",
    "rows": list(range(1024)),
    "tags": [{"uid": f"u{i}", "group": i // 8, "length": 512} for i in range(1024)],
}
WITH_TENSORS = dict(SMALL_TUPLE, kwargs={"wait": True, "data": TENSORS})

_MSGSPEC_ENC = msgspec.msgpack.Encoder()
_MSGSPEC_DEC = msgspec.msgpack.Decoder()


# ---- the msgspec strategy: validate + convert in Python, encode in C ----
def _walk(o: Any, frames: list[Any]) -> Any:
    t = type(o)
    if t is str or t is bool or t is float or o is None:
        return o
    if t is int:
        if not -(2**63) <= o < 2**64:
            raise TypeError("int out of range")
        return o
    if t is list:
        return [_walk(x, frames) for x in o]
    if t is dict:
        return {k: _walk(v, frames) for k, v in o.items()}
    if t is tuple:
        return msgspec.msgpack.Ext(1, _MSGSPEC_ENC.encode([_walk(x, frames) for x in o]))
    if t is torch.Tensor:
        frames.append(codec._tensor_buffer(o))  # same tensor handling as the codec
        desc = [str(o.dtype)[6:], list(o.shape), len(frames) - 1]
        return msgspec.msgpack.Ext(2, _MSGSPEC_ENC.encode(desc))
    raise TypeError(f"cannot encode {t.__name__}")


def msgspec_encode(obj: Any) -> list[Any]:
    frames: list[Any] = [b""]
    frames[0] = _MSGSPEC_ENC.encode(_walk(obj, frames))
    return frames


def msgspec_decode(frames: list[Any]) -> Any:
    bufs = [codec._as_buffer(f) for f in frames]  # same frame and tensor handling as the codec

    def hook(code: int, data: memoryview) -> Any:
        value = msgspec.msgpack.decode(data, ext_hook=hook)
        if code == 1:
            return tuple(value)
        return codec._decode_tensor([None, *value], bufs)

    return msgspec.msgpack.decode(bufs[0], ext_hook=hook)


# ---- timing ----
def best_us(fn: Callable[[], Any], number: int = 5000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=15)) / number * 1e6


def row(label: str, spec_us: float, pack_us: float) -> None:
    print(f"{label:<44} {spec_us:8.2f} {pack_us:8.2f} {spec_us / pack_us:8.2f}")


def _msgspec_raw(obj: Any, blob: bytes) -> Any:
    return _MSGSPEC_ENC.encode(obj), _MSGSPEC_DEC.decode(blob)


def _msgpack_raw(obj: Any, blob: bytes) -> Any:
    return msgpack.packb(obj), msgpack.unpackb(blob)


def _msgspec_full(obj: Any) -> Any:
    return msgspec_decode(msgspec_encode(obj))


def _codec_full(obj: Any) -> Any:
    return codec.decode(codec.encode(obj))


def main() -> None:
    print(f"{'us per encode+decode':<44} {'msgspec':>8} {'msgpack':>8} {'ratio':>8}")
    raw_cases: list[tuple[str, Any]] = [
        ("raw libs, small header", SMALL),
        ("raw libs, 5 descriptors", DESCRIPTORS),
    ]
    for label, obj in raw_cases:
        blob = _MSGSPEC_ENC.encode(obj)
        spec_us = best_us(functools.partial(_msgspec_raw, obj, blob))
        row(label, spec_us, best_us(functools.partial(_msgpack_raw, obj, blob)))
    cases: list[tuple[str, Any]] = [
        ("full strategy, small header", SMALL),
        ("full strategy, small header with a tuple", SMALL_TUPLE),
        ("full strategy, header + 5 tensors", WITH_TENSORS),
        ("full strategy, 1024 rows with tags", BATCH_META),
    ]
    for label, obj in cases:
        number = 50 if obj is BATCH_META else 5000
        spec_us = best_us(functools.partial(_msgspec_full, obj), number)
        row(label, spec_us, best_us(functools.partial(_codec_full, obj), number))
    print("(ratio > 1: msgpack is faster. transferqueue.runtime.codec uses msgpack)")


if __name__ == "__main__":
    main()
