"""CUDA tensors through pinned staging buffers (client/device.py, runtime/staging.py): put
and ``get_data(device="cuda")`` on every transport. Real tests: they run on a machine with
a GPU (``benchmarks/gpu_check.sh``) and are skipped, with the reason, where CUDA is absent;
the pool's logic is tested on the CPU in tests/unit/test_staging.py."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from transferqueue.client.device import ToDevice, staging_pool, to_host
from transferqueue.runtime.staging import StagingPool, pinned

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: GPU cycles torch.cuda._sleep spins (~0.25 s at 2 GHz): copies queued behind it are still
#: in flight when the host goes on (the tests check that the spin had not ended)
SPIN = 500_000_000


def _spin() -> torch.cuda.Event:
    """Spin the current stream; the event completes when the spin ends."""
    torch.cuda._sleep(SPIN)
    done = torch.cuda.Event()
    done.record()
    return done


def _batch(n: int = 16) -> TensorDict:
    g = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.randn(n, 64, device="cuda", generator=g)
    return TensorDict(
        {
            "ids": torch.arange(n * 8, device="cuda").reshape(n, 8),
            "logp": torch.randn(n, 5, device="cuda", generator=g).to(torch.bfloat16),
            "mask": torch.arange(n, device="cuda") % 3 == 0,
            "strided": wide[:, ::4],  # not contiguous
            "resp": torch.nested.nested_tensor(
                [torch.arange(k % 5 + 1, device="cuda") for k in range(n)], layout=torch.jagged
            ),
        },
        batch_size=[n],
    )


def test_pinned_allocator_pins() -> None:
    assert pinned(4096).is_pinned()


def test_round_trip_lands_on_the_device_equal(client, pid) -> None:
    data = _batch()
    meta = client.put(data, partition_id=pid)
    got = client.get_data(meta, device="cuda")
    for name in ("ids", "logp", "mask", "strided"):
        assert got[name].is_cuda and got[name].dtype == data[name].dtype, name
        assert torch.equal(got[name], data[name]), name
    assert got["resp"].is_cuda
    assert [t.tolist() for t in got["resp"].unbind()] == [t.tolist() for t in data["resp"].unbind()]
    on_host = client.get_data(meta)  # no device: host tensors, as before
    assert on_host["ids"].device.type == "cpu" and torch.equal(on_host["ids"], data["ids"].cpu())
    client.clear_partition(pid)


def test_rows_in_any_order_from_several_units(client, pid) -> None:
    data = _batch(64)
    meta = client.put(data, partition_id=pid)
    order = list(range(63, -1, -2)) + list(range(0, 64, 2))  # odd rows down, even up
    picked = meta.select_samples(order)
    got = client.get_data(picked, device="cuda")
    index = torch.tensor(order, device="cuda")
    assert torch.equal(got["ids"], data["ids"][index])
    assert torch.equal(got["strided"], data["strided"][index])
    client.clear_partition(pid)


def test_put_copies_so_the_caller_may_change_its_tensors(client, pid) -> None:
    x = torch.full((8, 1024), 3.0, device="cuda")
    rows = [torch.full((k + 1,), k, device="cuda") for k in range(8)]
    meta = client.put({"x": x, "rows": rows}, partition_id=pid)
    x.fill_(-1.0)  # after put returned: the stored bytes must not change
    for r in rows:
        r.zero_()
    got = client.get_data(meta, device="cuda")
    assert bool((got["x"] == 3.0).all())
    assert [t.tolist() for t in got["rows"].unbind()] == [[k] * (k + 1) for k in range(8)]
    assert got["x"].data_ptr() != x.data_ptr()
    got["x"].fill_(5.0)  # the result is the caller's: a second get is unchanged
    again = client.get_data(meta, device="cuda")
    assert bool((again["x"] == 3.0).all()) and again["x"].data_ptr() != got["x"].data_ptr()
    client.clear_partition(pid)


def test_put_sees_work_queued_on_the_current_stream(client, pid) -> None:
    side = torch.cuda.Stream()
    x = torch.zeros(32, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        _spin()  # the fill below runs late, on this stream
        x.fill_(7.0)
        meta = client.put({"x": x}, partition_id=pid)  # its copy is queued behind the fill
    got = client.get_data(meta)
    assert bool((got["x"] == 7.0).all())
    client.clear_partition(pid)


def test_get_results_are_ready_on_the_current_stream(client, pid) -> None:
    a = torch.arange(64 * 4096, device="cuda", dtype=torch.float32).view(64, 4096)
    meta = client.put({"a": a}, partition_id=pid)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _spin()  # the copies to the device queue behind this
        got = client.get_data(meta, device="cuda")
        total = got["a"].sum()  # on the same stream: sees the copied values
    side.synchronize()
    assert float(total) == float(a.sum())
    client.clear_partition(pid)


def test_get_copies_run_on_the_callers_stream_not_the_loop_threads(client, pid) -> None:
    """The sync client runs get_data on its loop thread; its copies must still be ordered
    on the calling thread's current stream: a copy on another stream, queued behind the
    spin there, would not be done when the caller's stream reads the result."""
    a = torch.arange(64 * 4096, device="cuda", dtype=torch.float32).view(64, 4096)
    meta = client.put({"a": a}, partition_id=pid)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    spun = _spin()  # on the default stream
    with torch.cuda.stream(side):
        got = client.get_data(meta, device="cuda")
        total = got["a"].sum()
        side.synchronize()
        seen = float(total)
    assert not spun.query()  # read while the default stream still spun
    assert seen == float(a.sum())
    client.clear_partition(pid)


def test_a_pinned_buffer_is_not_reused_while_its_copy_is_in_flight(client, pid) -> None:
    first = torch.full((64, 8192), 1.0, device="cuda")
    second = torch.full((64, 8192), 2.0, device="cuda")
    m1 = client.put({"v": first}, partition_id=pid)
    m2 = client.put({"v": second}, partition_id=pid)
    torch.cuda.synchronize()
    spun = _spin()  # the first result's copy from its pinned buffer waits behind this
    got1 = client.get_data(m1, device="cuda")
    got2 = client.get_data(m2, device="cuda")  # must not write into that buffer meanwhile
    assert not spun.query()  # the first copy was still in flight during the second get
    torch.cuda.synchronize()
    assert bool((got1["v"] == 1.0).all()) and bool((got2["v"] == 2.0).all())
    client.clear_partition(pid)


def test_repeated_puts_and_gets_reuse_the_pinned_buffers(client, pid) -> None:
    pool = staging_pool()
    x = torch.ones(256, 4096, device="cuda")  # 4 MiB
    for _ in range(2):  # warm: the pool has the buffers it needs
        client.get_data(client.put({"x": x}, partition_id=pid), device="cuda")
    torch.cuda.synchronize()
    before, held = pool.allocations, pool.held_bytes
    for _ in range(5):
        got = client.get_data(client.put({"x": x}, partition_id=pid), device="cuda")
        torch.cuda.synchronize()
        assert torch.equal(got["x"], x)
    assert pool.allocations == before and pool.held_bytes == held <= pool.max_bytes
    client.clear_partition(pid)


def test_staging_falls_back_to_plain_copies_when_the_pool_is_full() -> None:
    tiny = StagingPool(max_bytes=1024)
    x = torch.arange(4096, device="cuda", dtype=torch.float32).view(16, 256)  # 16 KiB
    out, staged = to_host({"x": x, "rows": list(x.unbind())}, tiny)
    assert out["x"].device.type == "cpu" and torch.equal(out["x"], x.cpu())
    assert torch.equal(torch.stack(out["rows"]), x.cpu())
    staged.release()
    with ToDevice(torch.device("cuda"), tiny) as move:
        back = move.column(out["x"])
    assert back.is_cuda and torch.equal(back, x)
    assert tiny.allocations == 0


def test_staged_put_buffers_go_back_to_the_pool() -> None:
    pool = StagingPool(max_bytes=1 << 20)
    x = torch.randn(16, 256, device="cuda")
    out, staged = to_host({"x": x}, pool)
    assert out["x"].is_pinned() and torch.equal(out["x"], x.cpu())
    assert pool.busy() == 1
    staged.release()
    del out
    assert pool.busy() == 0


async def test_the_async_client_copies_on_the_current_stream_of_its_thread(aclient, pid) -> None:
    a = torch.arange(32 * 4096, device="cuda", dtype=torch.float32).view(32, 4096)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _spin()
        a2 = a * 2  # late, on this stream
        meta = await aclient.put({"a": a2}, partition_id=pid)
    torch.cuda.synchronize()
    spun = _spin()  # on the default stream
    with torch.cuda.stream(side):
        got = await aclient.get_data(meta, device="cuda")
        total = got["a"].sum()
        side.synchronize()
        seen = float(total)
    assert not spun.query()
    assert seen == float((a * 2).sum())
    await aclient.clear_partition(pid)


def test_kv_put_of_cuda_tensors_goes_through_staging(client, pid) -> None:
    x = torch.randn(4, 16, device="cuda")
    expected = x.cpu()
    client.kv_put(["a", "b", "c", "d"], pid, fields={"x": x})
    x.zero_()
    got = client.kv_get(["d", "a"], pid)
    assert got["x"].device.type == "cpu" and torch.equal(got["x"], expected[[3, 0]])
    client.clear_partition(pid)
