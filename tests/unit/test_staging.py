"""The staging pool (runtime/staging.py) and the device checks of client/device.py, on the
CPU: the pool's logic runs with pageable buffers injected for pinned ones (the CUDA half
is in tests/test_gpu.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from tensordict import TensorDict

from transferqueue.client import device as device_mod
from transferqueue.client.columns import assemble
from transferqueue.client.device import ToDevice, check_device, on_device, to_host
from transferqueue.runtime import memory
from transferqueue.runtime.staging import ALIGN, StagingPool, aligned, pageable

KIB = 1024


class Fence:
    """A fence the test completes by hand (a ``torch.cuda.Event`` on a GPU)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def pool(max_bytes: int = 64 * KIB) -> StagingPool:
    return StagingPool(max_bytes, allocate=pageable)


def test_a_buffer_given_back_is_reused() -> None:
    p = pool()
    a = p.take(10 * KIB)
    assert a is not None and a.numel() == 10 * KIB and a.dtype == torch.uint8
    ptr = a.data_ptr()
    p.give(a)
    del a
    b = p.take(8 * KIB)  # fits the 10 KiB buffer (less than 4x its size)
    assert b is not None and b.data_ptr() == ptr and b.numel() == 8 * KIB
    assert p.allocations == 1 and p.held_bytes == 10 * KIB


def test_a_taken_buffer_is_not_handed_out_again() -> None:
    p = pool()
    a = p.take(4 * KIB)
    b = p.take(4 * KIB)
    assert a is not None and b is not None and a.data_ptr() != b.data_ptr()
    assert p.allocations == 2 and p.busy() == 2


def test_a_buffer_whose_fence_is_pending_is_not_reused() -> None:
    p = pool()
    a = p.take(4 * KIB)
    assert a is not None
    ptr, fence = a.data_ptr(), Fence()
    p.give(a, fence)
    del a
    b = p.take(4 * KIB)
    assert b is not None and b.data_ptr() != ptr  # the copy from it may be in flight
    p.give(b)
    del b
    fence.done = True
    c = p.take(4 * KIB)
    assert c is not None and c.data_ptr() == ptr  # the oldest idle one that fits


def test_a_buffer_still_viewed_is_not_reused() -> None:
    p = pool()
    a = p.take(4 * KIB)
    assert a is not None
    frame = a[:KIB].view(torch.int32)  # e.g. a zmq frame still being sent
    ptr = a.data_ptr()
    p.give(a)
    del a
    b = p.take(4 * KIB)
    assert b is not None and b.data_ptr() != ptr
    p.give(b)
    del b, frame
    c = p.take(4 * KIB)
    assert c is not None and c.data_ptr() == ptr


def test_the_pool_is_bounded_and_makes_room_from_idle_buffers() -> None:
    p = pool(max_bytes=20 * KIB)
    a = p.take(8 * KIB)
    b = p.take(8 * KIB)
    assert a is not None and b is not None and p.held_bytes == 16 * KIB
    assert p.take(8 * KIB) is None  # both busy, no room for a third: the caller copies unstaged
    assert p.take(32 * KIB) is None  # bigger than the bound
    p.give(a)
    del a
    c = p.take(12 * KIB)  # the idle 8 KiB one is too small: dropped to make room
    assert c is not None and p.held_bytes == 20 * KIB and p.allocations == 3
    p.give(b)
    p.give(c)
    del b, c
    p.clear()
    assert p.held_bytes == 0 and p.busy() == 0


def test_a_small_request_does_not_take_a_much_bigger_buffer() -> None:
    p = pool()
    big = p.take(32 * KIB)
    assert big is not None
    ptr = big.data_ptr()
    p.give(big)
    del big
    small = p.take(KIB)  # 32x smaller: a buffer of its own
    assert small is not None and small.data_ptr() != ptr


def test_give_refuses_a_foreign_buffer() -> None:
    with pytest.raises(ValueError, match="handed out"):
        pool().give(torch.empty(16, dtype=torch.uint8))


def test_concurrent_takers_never_share_a_buffer() -> None:
    p = pool(max_bytes=1 << 20)
    seen: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait(timeout=10)
        for _ in range(200):
            buf = p.take(KIB)
            assert buf is not None
            buf.fill_(threading.get_ident() % 251)
            with lock:
                assert buf.data_ptr() not in seen
                seen.append(buf.data_ptr())
            assert bool((buf == threading.get_ident() % 251).all())
            with lock:
                seen.remove(buf.data_ptr())
            p.give(buf)
            del buf

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert p.allocations <= 4 and p.busy() == 0


def test_aligned_offsets_fit_every_dtype() -> None:
    assert [aligned(n) for n in (0, 1, ALIGN, ALIGN + 1)] == [0, ALIGN, ALIGN, 2 * ALIGN]
    assert all(ALIGN % d.itemsize == 0 for d in (torch.float64, torch.complex128, torch.int8))


@pytest.mark.parametrize("bad", ["nope", "cuda:99", "meta", 3])
def test_a_bad_device_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="device"):
        check_device(bad)  # type: ignore[arg-type]


def test_cpu_devices_pass_through() -> None:
    assert check_device(None) is None
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")


def test_cpu_columns_are_not_staged() -> None:
    columns = {
        "d": torch.arange(6).view(3, 2),
        "rows": [torch.arange(n) for n in (1, 2, 3)],
        "text": ["a", "b", "c"],
        "empty": [],
    }
    assert not on_device(columns)
    used = pool()
    out, staged = to_host(columns, used)
    assert all(out[k] is columns[k] for k in ("d", "text", "empty"))
    assert all(a is b for a, b in zip(out["rows"], columns["rows"]))
    staged.release()
    assert used.allocations == 0


def test_assemble_on_cpu_is_unchanged_by_the_device_argument() -> None:
    parts = [
        (torch.tensor([0, 2]), {"x": torch.tensor([[0.0], [2.0]]), "s": ["a", "c"]}),
        (torch.tensor([1]), {"x": torch.tensor([[1.0]]), "s": ["b"]}),
    ]
    plain = assemble(3, ["x", "s"], parts)
    on_cpu = assemble(3, ["x", "s"], parts, device="cpu")
    for td in (plain, on_cpu):
        assert td["x"].device.type == "cpu" and td["x"].flatten().tolist() == [0.0, 1.0, 2.0]
        assert td.get("s").tolist() == ["a", "b", "c"]


@pytest.mark.transport
def test_cpu_put_and_get_do_not_touch_the_staging_pool(client, pid) -> None:
    created = device_mod._pool is None  # no CUDA put or get ran in this process before
    batch = TensorDict({"x": torch.arange(8).view(4, 2)}, batch_size=[4])
    meta = client.put(batch, partition_id=pid)
    got = client.get_data(meta, device="cpu")
    assert torch.equal(got["x"], batch["x"]) and got["x"].device.type == "cpu"
    with pytest.raises(ValueError, match="device"):
        client.get_data(meta, device="cuda:99")
    if created:
        assert device_mod._pool is None
    client.clear_partition(pid)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_dense_pieces_are_gathered_in_batch_order_through_one_buffer() -> None:
    """The gather of get_data(device=...) (on a GPU the scatter runs on the device; here the
    same code runs with the host as the device and pageable buffers)."""
    used = pool()
    x = torch.arange(40, dtype=torch.float64).view(10, 4)
    pos_a, pos_b = [9, 0, 4, 2], [1, 3, 5, 6, 7, 8]
    pieces = [(torch.tensor(pos_a), x[pos_a]), (pos_b, x[pos_b])]
    with ToDevice(torch.device("cpu"), used) as move:
        got = move.dense(pieces, 10)
        assert used.busy() == 1
    assert got is not None and torch.equal(got, x)
    assert not any(_shares_memory(got, col) for _, col in pieces)
    assert used.busy() == 0 and used.allocations == 1
    in_order = [(range(10), x)]
    with ToDevice(torch.device("cpu"), used) as move:
        again = move.dense(in_order, 10)
    assert again is not None and torch.equal(again, x) and not _shares_memory(again, x)
    assert used.allocations == 1  # the buffer was reused


def test_only_dense_pieces_of_one_kind_take_the_dense_gather() -> None:
    used = pool()
    with ToDevice(torch.device("cpu"), used) as move:
        assert move.dense([([0], ["a"])], 1) is None
        assert move.dense([([0], torch.zeros(1, 2)), ([1], torch.zeros(1, 3))], 2) is None
        assert (
            move.dense([([0], torch.zeros(1, 2)), ([1], torch.zeros(1, 2, dtype=torch.int32))], 2)
            is None
        )
    assert used.allocations == 0


def test_columns_move_through_the_pool_and_fall_back_when_it_is_full() -> None:
    jagged = torch.nested.nested_tensor_from_jagged(
        torch.arange(6.0), offsets=torch.tensor([0, 1, 3, 6])
    )
    dense = torch.ones(4, 4)
    with ToDevice(torch.device("cpu"), pool()) as move:
        moved = move.column(jagged)
        plain = move.column(["a", "b"])
        copied = move.column(dense)
    assert [t.tolist() for t in moved.unbind()] == [[0.0], [1.0, 2.0], [3.0, 4.0, 5.0]]
    assert plain == ["a", "b"] and torch.equal(copied, dense)
    assert not _shares_memory(copied, dense)
    full = pool(max_bytes=16)
    with ToDevice(torch.device("cpu"), full) as move:
        fallback = move.column(dense)  # 64 bytes: more than the bound
    assert torch.equal(fallback, dense) and not _shares_memory(fallback, dense)
    assert full.allocations == 0


@pytest.mark.transport
def test_no_transport_keeps_a_view_of_a_puts_buffers(client, pid) -> None:
    """What lets a put's staging buffers be reused: once put returns, nothing -- the codec,
    the transport, the store -- holds a view of the tensors it was given (the store keeps
    copies). Checked with host buffers from the pool standing in for pinned ones."""
    used = pool(max_bytes=1 << 22)
    for i in range(3):
        buf = used.take(64 * 1024 * 4)
        assert buf is not None
        x = buf.view(torch.float32).view(64, 1024).fill_(i)
        rows = [x[j, : j % 8 + 1] for j in range(64)]
        before = memory.storage_users(buf.untyped_storage())
        meta = client.put({"x": x, "rows": rows}, partition_id=pid)
        assert memory.storage_users(buf.untyped_storage()) == before  # no holder added
        used.give(buf)
        del buf, x, rows
        assert used.busy() == 0 and used.allocations == 1
        got = client.get_data(meta)
        assert bool((got["x"] == i).all())
    client.clear_partition(pid)
