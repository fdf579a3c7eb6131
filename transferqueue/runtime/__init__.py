"""The actor runtime: actors and their refs, the loop thread, the wire codec, memory
helpers and the transports. It knows nothing of partitions, storage or clients; the public
face of it is ``transferqueue.actors``."""
