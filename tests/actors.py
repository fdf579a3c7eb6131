"""Actors used by the runtime conformance tests (importable by actor processes)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from transferqueue.errors import PartitionSealedError
from transferqueue.runtime.transports._protocol import current_deadline


class CustomError(Exception):
    pass


class Echo:
    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting
        self.calls = 0
        self.finished: list[str] = []
        self._events: dict[str, asyncio.Event] = {}

    async def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    async def greet(self, name: str, *, punctuation: str = "!") -> str:
        return f"{self.greeting} {name}{punctuation}"

    async def nothing(self) -> None:
        return None

    async def delayed(self, value: Any, gate: int) -> Any:
        # yields to the loop `gate` times so replies complete out of order
        for _ in range(gate):
            await asyncio.sleep(0)
        return value

    async def count(self) -> int:
        return self.calls

    async def pid(self) -> int:
        return os.getpid()

    async def raise_error(self, kind: str) -> None:
        if kind == "value":
            raise ValueError("bad value")
        if kind == "type":
            raise TypeError("bad type")
        if kind == "key":
            raise KeyError("missing-key")
        if kind == "timeout":
            raise TimeoutError("too slow")
        if kind == "sealed":
            raise PartitionSealedError("partition 'p' is sealed")
        raise CustomError("something custom")

    async def never_returns(self) -> None:
        await asyncio.Event().wait()

    def _event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())

    async def hold(self, gate: str) -> str:
        """Waits until ``release(gate)``, then records ``gate`` as finished (a late write)."""
        self._event(f"entered:{gate}").set()
        try:
            await self._event(f"open:{gate}").wait()
        except asyncio.CancelledError:
            self._event(f"cancelled:{gate}").set()
            raise
        self.finished.append(gate)
        return gate

    async def cancelled(self, gate: str) -> None:
        """Returns once a ``hold(gate)`` call has been cancelled (a barrier for tests)."""
        await self._event(f"cancelled:{gate}").wait()

    async def deadline(self) -> float | None:
        return current_deadline()

    async def entered(self, gate: str) -> None:
        """Returns once a ``hold(gate)`` call is running (a barrier for tests)."""
        await self._event(f"entered:{gate}").wait()

    async def release(self, gate: str) -> None:
        self._event(f"open:{gate}").set()

    async def finished_gates(self) -> list[str]:
        return list(self.finished)

    async def unencodable_result(self) -> Any:
        return {1, 2, 3}

    def _private(self) -> None:  # not callable remotely
        return None


class FailingStart:
    def __init__(self) -> None:
        raise RuntimeError("cannot start")

    async def ping(self) -> str:
        return "pong"
