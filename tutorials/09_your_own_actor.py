"""Tutorial 09 -- your own actor: one class, run on inproc, zmq and ray with the same code.

transferqueue is built on a small actor runtime, and :mod:`transferqueue.actors` makes it
yours: any class whose public ``async def`` methods are its API becomes an actor. Here a
tiny parameter server (``tutorials/_tutorial_actors.py``) holds a tensor of weights; workers
push gradients to it and pull the weights back. Only the ``transport`` argument changes:

=========  ============================================  ===================================
transport  where the actor runs                          use it for
=========  ============================================  ===================================
inproc     the runtime's background loop, this process   tests, notebooks, one process
zmq        a process of its own, reached over ZMQ        several processes/hosts, no Ray
ray        a Ray actor on the cluster                    jobs that already use Ray
=========  ============================================  ===================================

Calls carry only codec payloads (tensors, numbers, strings, bytes, None, lists and dicts of
those; never pickle), errors travel back with their type, and every call has a deadline.
See docs/actors.md.

Run: python tutorials/09_your_own_actor.py [--transport inproc|zmq|ray|all]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import torch
from _tutorial_actors import ParameterServer  # an importable module: zmq and ray need it

from transferqueue.actors import connect, spawn

SIZE = 4


async def expect(error: type[Exception], call: Awaitable[Any]) -> Exception:
    """Await ``call``, which must raise ``error``."""
    try:
        await call
    except error as exc:
        return exc
    raise AssertionError(f"expected {error.__name__}")


async def use_the_actor(transport: str, config: dict[str, Any]) -> None:
    """The same code on every transport."""
    async with spawn(ParameterServer, SIZE, lr=0.5, transport=transport, config=config) as ps:
        print(f"  spawned {ps!r}")

        # many calls in flight at once, from concurrent workers
        versions = await asyncio.gather(*(ps.call("push", torch.ones(SIZE)) for _ in range(4)))
        state = await ps.call("pull")
        assert sorted(versions) == [1, 2, 3, 4] and state["version"] == 4
        assert torch.equal(state["weights"], torch.full((SIZE,), -2.0))
        print(f"  4 concurrent pushes -> version {state['version']}: {state['weights'].tolist()}")

        # an error raised in the actor comes back with its type (ValueError here)
        bad = await expect(ValueError, ps.call("push", torch.ones(SIZE + 1)))
        print(f"  a bad push raised ValueError: {bad}")

        # what the codec cannot carry (a set, an arbitrary object) is refused, never pickled
        await expect(TypeError, ps.call("push", {1, 2}))
        print("  a set is not a payload: TypeError, raised before anything was sent")

        # every call has a deadline; past it the caller gets TimeoutError and the actor
        # cancels the call
        await expect(TimeoutError, ps.call("wait_for_version", 100, timeout=0.3))
        print("  waiting for version 100 timed out after 0.3 s")

        # an address is plain text: another process can connect to the same actor
        ref = connect(ps.url, config=config)
        assert (await ref.call("pull"))["version"] == 4
        print(f"  connected to {ps.url} and pulled version 4")
        await ref.aclose()
    # leaving the block stopped the actor (its on_stop ran, its process ended)


def start_ray() -> dict[str, Any]:
    """A small local Ray cluster of our own; returns the config that uses its namespace."""
    import ray

    here = str(Path(__file__).resolve().parent)  # Ray's workers import _tutorial_actors
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p
    )
    namespace = f"tutorial-09-{os.getpid()}"
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        namespace=namespace,
    )
    return {"ray": {"namespace": namespace}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["inproc", "zmq", "ray", "all"], default="all")
    args = parser.parse_args()
    transports = ["inproc", "zmq", "ray"] if args.transport == "all" else [args.transport]

    for transport in transports:
        print(f"{transport}:")
        config: dict[str, Any] = {"runtime": {"call_timeout": 60.0}}
        if transport == "ray":
            config.update(start_ray())
        try:
            asyncio.run(use_the_actor(transport, config))
        finally:
            if transport == "ray":
                import ray

                ray.shutdown()
    print(f"your own actor ({args.transport}): OK")


if __name__ == "__main__":
    main()
