"""Which storage unit holds a row, and how many bytes the system may hold (pure; no I/O).

The controller hands out placement when it allocates rows: a put's rows go to the units in
blocks of ``stripe_rows`` consecutive batch positions, round robin from a per-partition
cursor that moves on with every put. So a big put still uses every unit (and each unit's
share is a few runs of the batch, sent as views), while small puts -- one trajectory at a
time, from a rollout fleet -- go to the units in turn instead of all landing on one. Units
known to be dead get no new rows.

Locality (the ray transport, where units and writers know their node): a put that names
the writer's node gets only the live units on that node, round robin as above, when there
are any; otherwise every live unit. Rows therefore stay where they were produced, and a
reader fetches them from whichever units hold them (the row -> unit map of a BatchMeta).

``storage.capacity_bytes`` is one promise for the whole system, kept here: a put reserves
its payload bytes at ``begin_put`` (refused, or made to wait, when they do not fit), its
commit replaces the reservation with the net bytes the units reported, and clears give
back what the units freed.
"""

from __future__ import annotations

import zlib

import numpy as np

from transferqueue.errors import ActorDiedError, StorageFullError

__all__ = ["Capacity", "Placement"]


class Placement:
    def __init__(self, num_units: int = 1, stripe_rows: int = 128) -> None:
        if num_units < 1 or stripe_rows < 1:
            raise ValueError(
                f"need num_units >= 1 and stripe_rows >= 1, got {num_units}, {stripe_rows}"
            )
        self.num_units = num_units
        self.stripe = stripe_rows
        self.dead: set[int] = set()
        #: the node of each unit (None: not known; no locality)
        self.nodes: list[str | None] = [None] * num_units

    def set_nodes(self, nodes: list[str | None] | None) -> None:
        """The node each unit runs on, as the transport names nodes."""
        if nodes is not None:
            if len(nodes) != self.num_units:
                raise ValueError(f"need one node per unit ({self.num_units}), got {len(nodes)}")
            self.nodes = list(nodes)

    def first_unit(self, pid: str) -> int:
        """Where a partition's first block goes: spread partitions over the units."""
        return zlib.crc32(pid.encode("utf-8")) % self.num_units

    def alive(self) -> list[int]:
        return [u for u in range(self.num_units) if u not in self.dead]

    def assign(self, cursor: int, count: int, node: str | None = None) -> tuple[np.ndarray, int]:
        """Units for ``count`` rows in batch order, and the cursor after them; the writer's
        ``node`` keeps them on that node's live units when it has any."""
        alive = self.alive()
        if not alive:
            raise ActorDiedError("every storage unit of this system died: no row can be stored")
        if node is not None:
            local = [u for u in alive if self.nodes[u] == node]
            alive = local or alive
        blocks = -(-count // self.stripe)
        order = np.array(alive, dtype=np.int16)
        first = cursor % len(alive)
        per_block = order[(first + np.arange(blocks)) % len(alive)]
        units = np.repeat(per_block, self.stripe)[:count]
        return units, first + blocks


class Capacity:
    """System-wide byte accounting (estimates: replies may overtake each other)."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used = 0  # committed bytes
        self.reserved = 0  # bytes of puts in flight

    def fits(self, nbytes: int) -> bool:
        cap = self.capacity_bytes
        return cap is None or self.used + self.reserved + nbytes <= cap

    def can_ever_fit(self, nbytes: int) -> bool:
        return self.capacity_bytes is None or nbytes <= self.capacity_bytes

    def check(self, nbytes: int) -> None:
        if self.fits(nbytes):
            return
        cap = self.capacity_bytes
        held = self.used + self.reserved
        raise StorageFullError(
            f"storage full: the put needs {nbytes} bytes, {held} of {cap} bytes are in use or "
            f"being written; clear consumed samples or partitions, raise "
            f"storage.capacity_bytes, or set storage.block_when_full to wait for space"
        )

    def reserve(self, nbytes: int) -> None:
        self.reserved += nbytes

    def settle(self, reserved: int, net: int) -> None:
        """A put ended: its reservation goes; ``net`` bytes (committed) stay."""
        self.reserved = max(0, self.reserved - reserved)
        self.used = max(0, self.used + net)

    def freed(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
