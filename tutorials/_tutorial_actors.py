"""The actor of tutorial 09, in a module of its own.

On zmq and ray the actor runs in another process, which imports its class by module path:
a class defined in the tutorial script itself (``__main__``) could not be found there.
"""

from __future__ import annotations

import asyncio

import torch

from transferqueue.actors import Actor


class ParameterServer(Actor):
    """A tiny parameter server: holds one tensor of weights, applies pushed gradients."""

    def __init__(self, size: int, lr: float = 0.5) -> None:
        self.lr = lr
        self.weights = torch.zeros(size)
        self.version = 0
        self._changed: asyncio.Condition | None = None

    async def on_start(self) -> None:
        # runs on the actor's own event loop, before the first call: loop-bound state goes here
        self._changed = asyncio.Condition()

    async def pull(self) -> dict[str, object]:
        """The current weights and their version (a dict of a tensor and a number)."""
        # a copy: on inproc the caller would otherwise share (and see changes to) our memory
        return {"version": self.version, "weights": self.weights.clone()}

    async def push(self, grad: torch.Tensor) -> int:
        """Apply one gradient step; returns the new version."""
        if grad.shape != self.weights.shape:
            raise ValueError(
                f"gradient of shape {list(grad.shape)}, expected {list(self.weights.shape)}"
            )
        self.weights -= self.lr * grad
        self.version += 1
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        return self.version

    async def wait_for_version(self, version: int) -> int:
        """Returns once the weights reach ``version`` (bounded by the caller's timeout)."""
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self.version >= version)
        return self.version
