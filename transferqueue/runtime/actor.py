"""The actor runtime's front door: Actor, ActorRef, Address, errors that travel.

An actor is any object whose public ``async def`` methods may be called remotely. A
transport (``transports/``) hosts it and moves its frames; the call protocol (envelope,
dispatch, deadlines, errors on the wire) is :mod:`transferqueue.runtime.transports._protocol`, and
:class:`ActorRef`, the picklable handle callers use, is defined with the transport interface
in :mod:`transferqueue.runtime.transports.base`. Both are re-exported here: the runtime imports
downwards only (transports never import this module).
"""

from __future__ import annotations

from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports._protocol import (
    current_deadline,
    error_from_wire,
    error_to_wire,
)
from transferqueue.runtime.transports.base import DEFAULT, ActorRef, Address

__all__ = [
    "DEFAULT",
    "Actor",
    "ActorRef",
    "Address",
    "Dispatcher",
    "current_deadline",
    "error_from_wire",
    "error_to_wire",
]


class Actor:
    """Optional base class: lifecycle hooks an actor may override."""

    async def on_start(self) -> None:
        """Called once on the actor's loop before the first request."""

    async def on_stop(self) -> None:
        """Called once when the actor is stopped by its owner."""
