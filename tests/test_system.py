"""tq.init / attach / close, configuration, capacity and the serve command."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import signal
import subprocess
import sys
from collections.abc import Mapping

import pytest
import torch

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.errors import ConfigError, StorageFullError
from transferqueue.runtime.loop import runtime_loop
from transferqueue.system import attach_system, start_system


def test_init_defaults_to_inproc_and_close_is_idempotent() -> None:
    config = tq.init()
    try:
        assert config.transport == "inproc" and config.system is not None
        assert tq.init() == config  # already initialised: same system
        client = tq.get_client()
        meta = client.put({"a": torch.arange(3)}, partition_id="p")
        assert client.get_data(meta)["a"].tolist() == [0, 1, 2]
        assert pickle.loads(pickle.dumps(config)) == config  # picklable
    finally:
        tq.close()
        tq.close()
    with pytest.raises(tq.NotInitializedError):
        tq.get_client()


def test_unknown_config_key_names_valid_ones() -> None:
    with pytest.raises(ConfigError, match="units"):
        load_config({"storage": {"unitz": 2}})
    with pytest.raises(ConfigError, match="transport"):
        load_config({"transport": "carrier-pigeon"})
    for stripe in (0, 2.5, True):
        with pytest.raises(ConfigError, match="stripe_rows"):
            load_config({"storage": {"stripe_rows": stripe}})


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_bad_pre_alloc_env_says_what_to_set(value: str) -> None:
    from transferqueue.config import apply_env

    with pytest.raises(ValueError, match="global batch size"):
        apply_env(load_config(), {"TQ_PRE_ALLOC_SAMPLE_NUM": value})


def test_pre_alloc_env_sets_default_reservation() -> None:
    from transferqueue.config import apply_env

    config = apply_env(load_config(), {"TQ_PRE_ALLOC_SAMPLE_NUM": "8"})
    assert config.controller.pre_allocate == 8


def test_inproc_system_cannot_be_reached_from_another_process(python_env) -> None:
    config = tq.init()
    try:
        code = "import pickle, sys, transferqueue as tq; tq.init(pickle.loads(sys.stdin.buffer.read()))"
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=pickle.dumps(config),
            capture_output=True,
            env=python_env,
            timeout=120,
        )
        assert proc.returncode != 0
        assert b"TransportUnavailableError" in proc.stderr and b"zmq" in proc.stderr
    finally:
        tq.close()


def test_ray_transport_without_ray_names_the_extra(python_env) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import transferqueue as tq\n"
        "tq.init({'transport': 'ray'})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=python_env, timeout=120
    )
    assert proc.returncode != 0
    assert b'pip install "transferqueue[ray]"' in proc.stderr


def _worker(config, queue) -> None:  # runs in a spawned or forked child
    try:
        tq.init(config)
        client = tq.get_client()
        meta = client.put({"a": torch.arange(5) * 3}, partition_id="from-worker")
        tq.close()  # a worker's close disconnects only
        queue.put(("ok", meta.rows))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", repr(exc)))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_client_in_worker_process_attaches_and_close_keeps_system(
    system, transport_name, method
) -> None:
    if transport_name == "inproc":
        pytest.skip("an inproc system is not reachable from other processes (tested above)")
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(system.config, queue))
    proc.start()
    status, rows = queue.get(timeout=120)
    proc.join(timeout=60)
    assert status == "ok", rows  # ray too: requests travel over zmq, not through Ray
    client = system.client  # the system still serves after the worker closed
    data = client.get_data(tq.BatchMeta("from-worker", rows, ["a"]))
    assert data["a"].tolist() == [0, 3, 6, 9, 12][: len(rows)]
    client.clear_partition("from-worker")


def own_namespace(base_config: dict, **extra) -> dict:
    """A config for a second system; on ray it needs a namespace of its own."""
    import uuid

    return {**base_config, "ray": {"namespace": f"tq-test-{uuid.uuid4().hex[:8]}"}, **extra}


def _small_system(base_config: dict, **storage):
    # row by row across units: the few small rows here split evenly over the capacity shares
    storage = {"units": 2, "stripe_rows": 1, **storage}
    config = load_config(own_namespace(base_config, storage=storage))
    return runtime_loop().run(start_system(config))


def test_capacity_limit_raises_with_numbers_and_publishes_nothing(base_config, pid) -> None:
    system = _small_system(base_config, capacity_bytes=4096)
    try:
        client = system.client
        client.create_partition(pid, expected_size=4)
        with pytest.raises(StorageFullError, match="bytes"):
            client.put({"x": torch.zeros(4, 1100, dtype=torch.uint8)}, partition_id=pid)
        info = client.partition_info(pid)
        assert info.produced == {} and info.size == 4  # slots went back to pending
        meta = client.put({"x": torch.zeros(4, 256, dtype=torch.uint8)}, partition_id=pid)
        assert meta.rows == [0, 1, 2, 3]
        client.clear_partition(pid)  # clearing frees the space again
        client.put({"x": torch.zeros(4, 256, dtype=torch.uint8)}, partition_id=pid)
    finally:
        runtime_loop().run(system.aclose())


def test_block_when_full_waits_for_a_clear(base_config, pid) -> None:
    system = _small_system(base_config, capacity_bytes=4096, block_when_full=True)

    async def scenario() -> list[int]:
        client = system.async_client
        first = await client.put({"x": torch.zeros(4, 1024, dtype=torch.uint8)}, partition_id=pid)
        blocked = asyncio.ensure_future(
            client.put({"x": torch.zeros(4, 1024, dtype=torch.uint8)}, partition_id=pid + "-2")
        )
        done, _ = await asyncio.wait([blocked], timeout=0.5)
        assert not done  # no space until the first batch is cleared
        await client.clear_samples(first)
        return (await blocked).rows

    try:
        assert runtime_loop().run(scenario()) == [0, 1, 2, 3]
    finally:
        runtime_loop().run(system.aclose())


def test_capacity_is_a_system_wide_bound_and_small_puts_use_every_unit(base_config, pid) -> None:
    mib = 1 << 20
    config = load_config(
        own_namespace(base_config, storage={"units": 2, "capacity_bytes": 4 * mib})
    )
    system = runtime_loop().run(start_system(config))
    try:
        client = system.client
        # more than half the capacity in one row, into an empty system: it fits
        big = client.put({"x": torch.zeros(1, 2 * mib + 64, dtype=torch.uint8)}, partition_id=pid)
        with pytest.raises(StorageFullError):
            client.put({"x": torch.zeros(1, 2 * mib, dtype=torch.uint8)}, partition_id=pid)
        client.clear_samples(big)
        small = [
            client.put({"x": torch.zeros(1, 64, dtype=torch.uint8)}, partition_id=pid)
            for _ in range(8)
        ]
        assert sorted(m.units[0] for m in small) == [0, 0, 0, 0, 1, 1, 1, 1]
        stats = [runtime_loop().run(u.call("stats")) for u in system.async_client._units]
        assert [s["partitions"][pid]["rows"] for s in stats] == [4, 4]
    finally:
        runtime_loop().run(system.aclose())


def test_a_failed_put_gives_back_its_reservation_and_nothing_else(base_config, pid) -> None:
    mib = 1 << 20
    config = load_config(
        own_namespace(base_config, storage={"units": 2, "capacity_bytes": 4 * mib})
    )
    system = runtime_loop().run(start_system(config))
    try:
        client, ctrl = system.client, system.async_client._controller
        client.put({"x": torch.zeros(1, mib, dtype=torch.uint8)}, partition_id=pid)
        writer = system.new_async_client()

        async def fail(point: str) -> None:
            if point == "written":  # its bytes are on a unit: the abort clears them
                raise RuntimeError("the writer gave up")

        writer.put_hook = fail
        with pytest.raises(RuntimeError, match="gave up"):
            runtime_loop().run(
                writer.put({"x": torch.zeros(1, mib, dtype=torch.uint8)}, partition_id=pid)
            )
        held = runtime_loop().run(ctrl.call("capacity"))
        assert (held["used_bytes"], held["reserved_bytes"]) == (mib, 0)
        stats = [runtime_loop().run(u.call("stats")) for u in system.async_client._units]
        assert sum(s["nbytes"] for s in stats) == mib
        runtime_loop().run(writer.close())
    finally:
        runtime_loop().run(system.aclose())


def test_a_sync_client_keeps_working_in_a_forked_child(system, client, transport_name, pid) -> None:
    client.put({"a": torch.arange(3)}, partition_id=pid)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:  # the parent's client object, used in the child
            queue.put(("ok", client.partition_info(pid).size))
        except Exception as exc:
            queue.put((type(exc).__name__, str(exc)))

    proc = ctx.Process(target=child)
    proc.start()
    status, value = queue.get(timeout=60)
    proc.join(timeout=30)
    if transport_name in ("zmq", "ray"):  # ray: requests travel over zmq, not through Ray
        assert (status, value) == ("ok", 3)
    else:  # inproc actors live in the parent only
        assert status == "TransportUnavailableError", value
    client.clear_partition(pid)


def test_custom_sampler_by_import_path(base_config, pid) -> None:
    config = load_config(
        own_namespace(base_config, controller={"sampler": "samplers_for_tests:EveryOtherSampler"})
    )
    system = runtime_loop().run(start_system(config))
    try:
        system.client.put({"a": torch.arange(8)}, partition_id=pid)
        assert system.client.get_meta(["a"], 3, pid, "t").rows == [0, 2, 4]
    finally:
        runtime_loop().run(system.aclose())


def test_serve_command_prints_an_address_clients_attach_to(python_env) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferqueue", "serve", "--units", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("transferqueue serving at tcp://127.0.0.1:"), line
        address = line.split()[-1]
        system = attach_system(load_config({"transport": "zmq", "system": {"controller": address}}))
        meta = system.client.put({"a": torch.arange(2)}, partition_id="served")
        assert system.client.get_data(meta)["a"].tolist() == [0, 1]
        runtime_loop().run(system.aclose())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


class _FrozenMapping(Mapping):
    """A Mapping that is not a dict (the shape of OmegaConf's DictConfig)."""

    def __init__(self, data: dict) -> None:
        self._data = {k: _FrozenMapping(v) if isinstance(v, dict) else v for k, v in data.items()}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_config_from_any_mapping() -> None:
    config = load_config(_FrozenMapping({"transport": "zmq", "storage": {"units": 3}}))
    assert config.transport == "zmq" and config.storage.units == 3
    with pytest.raises(ConfigError, match=r"unknown config key 'storage\.nope'"):
        load_config(_FrozenMapping({"storage": {"nope": 1}}))
