"""The upstream Ray pattern: the driver calls ``tq.init(config)`` after ``ray.init()``; every
Ray worker (task or actor) calls a bare ``tq.init()`` and attaches to that system."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch

import transferqueue as tq


def _read_in_worker(pid: str) -> tuple[Any, list[list[int]], str]:
    """Runs in a Ray worker: a bare init, then read what the driver put."""
    import transferqueue as tq

    config = tq.init()
    try:
        client = tq.get_client()
        meta = client.get_meta(["x"], 3, pid, "worker", timeout=60)
        client.put({"y": client.get_data(meta)["x"] * 10}, metadata=meta)
        return config.system["controller"], client.get_data(meta)["x"].tolist(), config.transport
    finally:
        tq.close()  # disconnects only: the driver started the system


@pytest.mark.timeout(240)
def test_ray_tasks_and_actors_attach_with_a_bare_init(ray_cluster) -> None:
    import ray

    config = tq.init({"transport": "ray"})
    pid = f"bare-init-{uuid.uuid4().hex[:8]}"
    try:
        client = tq.get_client()
        client.put({"x": torch.arange(6).reshape(3, 2)}, partition_id=pid)
        task = ray.remote(num_cpus=0)(_read_in_worker)
        controller, rows, transport = ray.get(task.remote(pid), timeout=180)
        assert (controller, transport) == (config.system["controller"], "ray")
        assert rows == [[0, 1], [2, 3], [4, 5]]
        # what the worker wrote is in the driver's system
        meta = client.get_meta(["y"], 3, pid, "driver", timeout=60)
        assert client.get_data(meta)["y"].tolist() == [[0, 10], [20, 30], [40, 50]]

        @ray.remote(num_cpus=0)
        class Reader:
            def read(self, pid: str) -> Any:
                import transferqueue as tq

                tq.init()
                try:
                    keys = tq.kv_list(pid)[pid]
                    return tq.get_client().partition_info(pid).size, keys
                finally:
                    tq.close()

        reader = Reader.remote()  # type: ignore[attr-defined]
        try:
            assert ray.get(reader.read.remote(pid), timeout=180) == (3, {})
        finally:
            ray.kill(reader)
    finally:
        tq.get_client().clear_partition(pid)
        tq.close()


def _bare_init_without_a_system(namespace: str) -> tuple[str, str]:
    from transferqueue.config import load_config
    from transferqueue.runtime.transports import worker_transport
    from transferqueue.system import attach_from_worker

    assert worker_transport() == "ray"
    try:
        attach_from_worker(load_config({"transport": "ray", "ray": {"namespace": namespace}}))
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "no error", ""


@pytest.mark.timeout(180)
def test_a_bare_init_in_a_ray_worker_without_a_system_says_what_to_do(ray_cluster) -> None:
    import ray

    namespace = f"tq-none-{uuid.uuid4().hex[:8]}"
    task = ray.remote(num_cpus=0)(_bare_init_without_a_system)
    name, message = ray.get(task.remote(namespace), timeout=120)
    assert name == "NotInitializedError"
    assert namespace in message and "tq.init({'transport': 'ray'" in message


def test_a_bare_init_in_the_driver_stays_in_process(ray_cluster) -> None:
    from transferqueue.runtime.transports import worker_transport

    assert worker_transport() is None  # Ray is initialised here, but this is the driver
    config = tq.init()
    try:
        assert config.transport == "inproc"
    finally:
        tq.close()
