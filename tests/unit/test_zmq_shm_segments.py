"""The same-host shared-memory segments of the zmq transport (zmq_shm), without sockets:
descriptors, ownership by flock, reuse, refusal, and real SIGKILLs of either side."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

import msgpack
import pytest
import torch

from transferqueue.errors import ActorDiedError, ConfigError, ProtocolError
from transferqueue.runtime import memory
from transferqueue.runtime.transports import zmq_shm
from transferqueue.runtime.transports.zmq_shm import MARK, Pool, ShmSettings

MiB = 1 << 20


def _frames(*tensors: torch.Tensor) -> list:
    return [b"header", *(memoryview(t.numpy()).cast("B") for t in tensors)]


def _tensor(view: memoryview, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.frombuffer(view, dtype=dtype)


def _segments_mapped() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:tq-shm" in line for line in f)


def test_large_frames_travel_in_a_segment_and_come_back_equal() -> None:
    pool = Pool(64 * MiB)
    a, b = torch.randn(MiB // 2), torch.randn(MiB)
    small = torch.arange(10, dtype=torch.float32)
    frames = _frames(a, small, b)
    out = pool.pack(frames, [1, 3], 1)
    assert out is not None and len(out) == len(frames) + 1
    assert out[1][0] == MARK and out[2] == b"" and out[4] == b""  # moved, left empty
    assert out[0] == b"header" and out[3] is frames[2]  # small frames travel as they are
    got = zmq_shm.unpack(out, 1)
    assert len(got) == len(frames) and got[0] == b"header"
    assert torch.equal(_tensor(got[1]), a) and torch.equal(_tensor(got[3]), b)
    assert torch.equal(_tensor(got[2]), small)


def test_pack_decides_by_size_host_and_setting() -> None:
    big = torch.ones(2 * MiB, dtype=torch.uint8)
    frames = _frames(big)
    before = zmq_shm.COUNTERS.snapshot()
    assert zmq_shm.pack(frames, 1, ShmSettings(), same_host=False) is frames
    assert zmq_shm.pack(frames, 1, ShmSettings(enabled=False), same_host=True) is frames
    small = ShmSettings(min_bytes=4 * MiB)
    assert zmq_shm.pack(frames, 1, small, same_host=True) is frames
    mid = zmq_shm.COUNTERS.snapshot()
    assert mid["sent_socket"] - before["sent_socket"] == 2 * big.nbytes
    assert mid["sent_shm"] == before["sent_shm"]
    out = zmq_shm.pack(frames, 1, ShmSettings(), same_host=True)
    assert out is not frames and zmq_shm.is_descriptor(out[1])
    after = zmq_shm.COUNTERS.snapshot()
    assert after["sent_shm"] - mid["sent_shm"] == big.nbytes
    assert after["messages_shm"] - mid["messages_shm"] == 1
    zmq_shm.unpack(out, 1)
    assert zmq_shm.COUNTERS.received_shm - after["received_shm"] == big.nbytes


def test_a_message_larger_than_the_pool_takes_the_socket() -> None:
    assert Pool(2 * MiB).pack(_frames(torch.ones(3 * MiB, dtype=torch.uint8)), [1], 1) is None


def test_what_you_sent_you_may_change_what_you_received_is_yours() -> None:
    pool = Pool(64 * MiB)
    src = torch.randn(MiB)
    expected = src.clone()
    got = zmq_shm.unpack(pool.pack(_frames(src), [1], 1), 1)  # type: ignore[arg-type]
    held = _tensor(got[1])
    src.add_(1.0)  # the sender changes its tensor after the send
    for _ in range(3):  # further messages while the receiver holds its tensor
        other = zmq_shm.unpack(pool.pack(_frames(torch.zeros(MiB)), [1], 1), 1)  # type: ignore[arg-type]
        del other
    assert torch.equal(held, expected)
    assert len(pool) == 2  # the held segment was not reused; the other one was, each time


def test_a_segment_is_reused_once_its_receiver_lets_go() -> None:
    pool = Pool(64 * MiB)
    frames = _frames(torch.ones(MiB))
    got = zmq_shm.unpack(pool.pack(frames, [1], 1), 1)  # type: ignore[arg-type]
    t = _tensor(got[1])
    del got
    zmq_shm.unpack(pool.pack(frames, [1], 1), 1)  # type: ignore[arg-type]
    assert len(pool) == 2  # the tensor still holds the first segment
    del t
    for _ in range(3):
        zmq_shm.unpack(pool.pack(frames, [1], 1), 1)  # type: ignore[arg-type]
    assert len(pool) == 2
    base = _segments_mapped()
    pool.close()
    zmq_shm.sweep()  # the receiver forgets the segments their sender closed
    assert _segments_mapped() == base - 4  # two segments, each mapped by sender and receiver


def test_a_handler_keeps_consecutive_frames_as_one_buffer_that_holds_the_segment() -> None:
    pool = Pool(64 * MiB)
    a, b = torch.randn(MiB // 4), torch.randn(MiB // 4)  # 1 MiB each: end to end in a segment
    expected = torch.cat([a, b])
    got = zmq_shm.unpack(pool.pack(_frames(a, b), [1, 2], 1), 1)  # type: ignore[arg-type]
    owned = zmq_shm.owned(got)
    assert owned is not None and zmq_shm.owned([b"h", memoryview(b"x")]) is None
    ta, tb = _tensor(got[1]), _tensor(got[2])
    token = memory.request_frames(owned)
    try:
        assert memory.take_ownership(ta[:-1]) is None  # not a whole frame
        kept = memory.take_ownership([ta, tb])
        assert memory.take_ownership(ta) is None  # each frame is offered once
    finally:
        memory.reset_request_frames(token)
    assert kept is not None and torch.equal(kept, expected)
    del got, ta, tb, owned
    other = _frames(torch.zeros(MiB // 2))
    zmq_shm.unpack(pool.pack(other, [1], 1), 1)  # type: ignore[arg-type]
    assert len(pool) == 2  # the kept buffer holds the first segment
    assert torch.equal(kept, expected)
    del kept
    zmq_shm.unpack(pool.pack(other, [1], 1), 1)  # type: ignore[arg-type]
    zmq_shm.unpack(pool.pack(other, [1], 1), 1)  # type: ignore[arg-type]
    assert len(pool) == 2  # both reused
    pool.close()
    zmq_shm.sweep()


def test_frames_apart_in_the_segment_are_not_kept_as_one() -> None:
    pool = Pool(64 * MiB)
    a, b = torch.randn(MiB // 4 + 1), torch.randn(MiB // 4 + 1)  # 4 bytes past a cache line
    got = zmq_shm.unpack(pool.pack(_frames(a, b), [1, 2], 1), 1)  # type: ignore[arg-type]
    owned = zmq_shm.owned(got)
    assert owned is not None
    ta, tb = _tensor(got[1]), _tensor(got[2])
    assert tb.data_ptr() > ta.data_ptr() + ta.nbytes  # aligned: a gap between them
    token = memory.request_frames(owned)
    try:
        assert memory.take_ownership([ta, tb]) is None
        kept = memory.take_ownership(ta)  # each alone still can be
    finally:
        memory.reset_request_frames(token)
    assert kept is not None and torch.equal(kept, a)
    del got, ta, tb, owned, kept
    pool.close()
    zmq_shm.sweep()


def test_segments_their_receivers_keep_do_not_count_toward_the_pool() -> None:
    pool = Pool(4 * MiB)  # one 4 MiB segment (3 MiB rounded up to 2 MiB steps)
    held = []
    for i in range(4):  # 12 MiB kept by the receiver: three times the pool
        out = pool.pack(_frames(torch.full((3 * MiB // 4,), float(i))), [1], 1)
        assert out is not None  # not the socket
        held.append(_tensor(zmq_shm.unpack(out, 1)[1]))  # type: ignore[arg-type]
    # the pool remembers at most pool_bytes of kept segments beside the newest; the
    # receiver's data outlives the sender's handle of the older ones
    assert len(pool) == 2
    assert [int(t[0]) for t in held] == [0, 1, 2, 3] and all(bool((t == t[0]).all()) for t in held)
    del held
    for _ in range(3):
        zmq_shm.unpack(pool.pack(_frames(torch.ones(3 * MiB // 4)), [1], 1), 1)  # type: ignore[arg-type]
    assert len(pool) == 2  # let go of: reused
    pool.close()
    zmq_shm.sweep()


def test_the_receiver_maps_a_segment_once_for_many_messages() -> None:
    pool = Pool(64 * MiB)
    frames = _frames(torch.ones(MiB))
    zmq_shm.unpack(pool.pack(frames, [1], 1), 1)  # type: ignore[arg-type]
    mapped = _segments_mapped()
    for _ in range(5):
        got = zmq_shm.unpack(pool.pack(frames, [1], 1), 1)  # type: ignore[arg-type]
        assert _segments_mapped() == mapped + 1  # one lease page per message in flight
        del got
    assert _segments_mapped() == mapped and len(pool) == 1
    pool.close()
    zmq_shm.sweep()


def test_an_unacknowledged_segment_is_not_reused() -> None:
    pool = Pool(64 * MiB)
    frames = _frames(torch.ones(MiB))
    first = pool.pack(frames, [1], 1)
    pool.pack(frames, [1], 1)  # the first is in flight: its receiver has not mapped it yet
    assert len(pool) == 2
    zmq_shm.unpack(first, 1)  # type: ignore[arg-type]


def test_descriptors_that_do_not_resolve_are_refused() -> None:
    pool = Pool(64 * MiB)
    out = pool.pack(_frames(torch.ones(MiB)), [1], 1)
    assert out is not None
    pid, fd, gen, parts = msgpack.unpackb(out[1][1:])

    def forged(*desc: object) -> list:
        return [b"header", bytes([MARK]) + msgpack.packb(list(desc)), b""]

    with pytest.raises(ProtocolError, match="reclaimed"):
        zmq_shm.unpack(forged(pid, fd, gen ^ 2, parts), 1)
    with pytest.raises(ProtocolError, match="could not be decoded"):
        zmq_shm.unpack([b"header", bytes([MARK, 1, 2])], 1)
    with (
        open(os.devnull, "rb") as other,  # an fd that is no segment
        pytest.raises(ProtocolError, match="not a transferqueue segment"),
    ):
        zmq_shm.unpack(forged(pid, other.fileno(), gen, parts), 1)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    with pytest.raises(ActorDiedError):
        zmq_shm.unpack(forged(int(gone.stdout), fd, gen, parts), 1)
    assert torch.equal(_tensor(zmq_shm.unpack(out, 1)[1]), torch.ones(MiB))  # the real one works


def test_host_id_is_stable_and_settings_are_checked() -> None:
    from transferqueue.config import load_config

    assert zmq_shm.host_id() == zmq_shm.host_id() and len(zmq_shm.host_id()) == 32
    cfg = load_config({"zmq": {"shared_memory": False, "shm_min_bytes": 4096}})
    assert ShmSettings.of(cfg.zmq) == ShmSettings(False, 4096, 1 << 30, True)
    bads = [{"shared_memory": "yes"}, {"shm_min_bytes": 0}, {"shm_pool_bytes": True}]
    for bad in [*bads, {"shm_keep": 1}]:
        with pytest.raises(ConfigError):
            load_config({"zmq": bad})


_RECEIVER = textwrap.dedent(
    """
    import sys
    from transferqueue.runtime.transports import zmq_shm
    got = zmq_shm.unpack([b"h", bytes.fromhex(sys.argv[1]), b""], 1)
    print(bytes(got[1][:4]).hex(), flush=True)
    sys.stdin.read()
    """
)

_SENDER = textwrap.dedent(
    """
    import sys, torch
    from transferqueue.runtime.transports.zmq_shm import Pool
    t = torch.arange(1 << 18, dtype=torch.int32)
    out = Pool(1 << 26).pack([b"h", memoryview(t.numpy()).cast("B")], [1], 1)
    print(out[1].hex(), flush=True)
    sys.stdin.read()
    """
)


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@pytest.mark.timeout(60)
def test_a_receiver_killed_while_it_holds_a_segment_gives_it_back() -> None:
    pool = Pool(64 * MiB)
    frames = _frames(torch.full((MiB,), 7, dtype=torch.uint8))
    out = pool.pack(frames, [1], 1)
    assert out is not None
    child = _child(_RECEIVER, bytes(out[1]).hex())
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "07070707"  # the barrier: it maps the segment
        pool.pack(frames, [1], 1)
        assert len(pool) == 2  # held by the live receiver: a second segment
        _kill(child)
    finally:
        _reap(child)
    for _ in range(2):
        zmq_shm.unpack(pool.pack(frames, [1], 1), 1)  # type: ignore[arg-type]
    assert len(pool) == 2  # the killed receiver's segment came back: no growth


@pytest.mark.timeout(60)
def test_a_sender_killed_after_sending_leaves_the_receiver_its_data_and_nothing_behind() -> None:
    shm_before = set(os.listdir("/dev/shm"))
    base = _segments_mapped()
    child = _child(_SENDER)
    try:
        assert child.stdout is not None
        descriptor = bytes.fromhex(child.stdout.readline().strip())  # the barrier: it sent
        got = zmq_shm.unpack([b"h", descriptor, b""], 1)
        _kill(child)
    finally:
        _reap(child)
    held = _tensor(got[1], torch.int32)
    del got
    assert torch.equal(held, torch.arange(1 << 18, dtype=torch.int32))
    assert _segments_mapped() == base + 2  # only this receiver's mapping and lease keep them
    del held
    zmq_shm.sweep()  # forget the dead sender's segment: the last reference, the kernel frees it
    assert _segments_mapped() == base
    assert set(os.listdir("/dev/shm")) <= shm_before  # segments never have a name there


@pytest.mark.timeout(60)
def test_a_forked_child_sends_from_a_pool_of_its_own() -> None:
    frames = _frames(torch.ones(2 * MiB, dtype=torch.uint8))
    parent_pool = zmq_shm.pool(1 << 30)
    zmq_shm.unpack(zmq_shm.pack(frames, 1, ShmSettings(), same_host=True), 1)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit code
        ok = False
        try:
            out = zmq_shm.pack(frames, 1, ShmSettings(), same_host=True)
            pid = msgpack.unpackb(out[1][1:])[0]
            got = zmq_shm.unpack(out, 1)
            ok = zmq_shm.pool(1 << 30) is not parent_pool and pid == os.getpid()
            ok = ok and bytes(got[1][:2]) == b"\x01\x01"
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)  # a child that hangs fails the test
        assert ready and os.read(read, 1) == b"1"
    finally:
        os.close(read)
        if not os.waitpid(child, os.WNOHANG)[0]:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
