"""One host cache for every process on a machine: a chunk cache in shared memory, served over a Unix
socket (DESIGN section 13).

* :class:`CacheServer` (and ``python -m lmcache serve``): owns the arena (a memfd), the allocator, the
  prefix index, eviction and leases: a :class:`~lmcache.chunk_cache.ChunkCache` over a pool whose arena
  is the shared mapping.
* :func:`connect` gives a :class:`SharedChunkCache`: the ``ChunkCache`` API in any process and
  framework (numpy, torch, JAX). It maps the arena and moves bytes itself; only small messages cross the
  socket.

See the guide "Sharing one cache between processes" for the failure and security models.
"""

from __future__ import annotations

from lmcache.shared.client import SharedCacheStats, SharedChunkCache, SharedPendingStore, connect
from lmcache.shared.server import CacheServer

__all__ = ["CacheServer", "SharedCacheStats", "SharedChunkCache", "SharedPendingStore", "connect"]
