"""Remote FFN (server-api.md §5): the `/v1/walk-ffn` wire codec, the route that serves it, the
shard loaders, and `RemoteFfn`, the FFN backend that runs each layer on the shard owning it."""

from .wire import WireError

__all__ = ["WireError"]
