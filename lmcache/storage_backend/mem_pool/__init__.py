"""Memory pools for KV-cache chunks: the API of LMCache's ``lmcache.storage_backend.mem_pool``.

``BasePool`` and ``KVObj`` live in :mod:`.base_pool`; the pools in :mod:`.local_pool`.
"""

from lmcache.storage_backend.mem_pool.base_pool import BasePool, KVBatch, KVObj
from lmcache.storage_backend.mem_pool.local_pool import (
    LocalCPUBufferPool,
    LocalCPUPool,
    LocalGPUPool,
    LocalPool,
)

__all__ = ["BasePool", "KVBatch", "KVObj", "LocalCPUBufferPool", "LocalCPUPool", "LocalGPUPool", "LocalPool"]
