"""The zmq data path of the ray transport: a Ray actor serves the zmq transport's ROUTER.

Ray places the actor, starts and stops it and tells who died; inside it the same request
server as a zmq actor process (:class:`~transferqueue.runtime.transports.zmq_actor._Server`) binds a
ROUTER socket on the node's IP, and refs talk to it with the zmq transport's channel. So a
request costs one zmq round trip instead of a Ray task (submit, schedule, reply through the
object store) -- see "Ray: placement, locality and the data path" in docs/architecture.md for
the figures behind this choice. The ray transport imports this module only for that data
path; besides ``zmq.py`` and ``zmq_actor.py`` it is the one module that imports zmq.
"""

from __future__ import annotations

import zmq

from transferqueue.config import Config
from transferqueue.runtime.memory import tune_malloc_for_large_buffers
from transferqueue.runtime.transports._dispatch import Dispatcher
from transferqueue.runtime.transports.base import Address, Channel
from transferqueue.runtime.transports.zmq import ZmqChannel
from transferqueue.runtime.transports.zmq_actor import _Server
from transferqueue.runtime.transports.zmq_pump import context
from transferqueue.runtime.transports.zmq_shm import ShmSettings, tag_host


class ZmqServing:
    """A ROUTER server for ``dispatcher`` in the running event loop (inside a Ray actor);
    large frames to and from refs on this node travel in shared memory as on zmq (``shm``)."""

    def __init__(self, dispatcher: Dispatcher, host: str, shm: ShmSettings | None = None) -> None:
        shm = shm or ShmSettings()
        sock = context().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        tag_host(sock, shm)
        sock.bind(f"tcp://{host}:*")
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._server = _Server(dispatcher, sock, shm)

    def close(self) -> None:
        self._server.close()


def connect(endpoint: str, config: Config) -> Channel:
    """A zmq channel to a Ray-hosted actor's server (death: the socket monitor sees it)."""
    if config.zmq.tune_malloc:
        tune_malloc_for_large_buffers()  # replies land in reused heap pages (as on zmq)
    return ZmqChannel(Address("zmq", endpoint), config)


__all__ = ["ZmqServing", "connect"]
