"""sglang-jax's host KV pool on LMCache's JAX pool: :class:`LMCacheHostKVPool`.

sglang-jax (``sgl_jax.srt.mem_cache.host_kv_pool``) stages KV in host memory behind the
``HostKVPool`` ABC. This package implements that ABC for the PD-disaggregation role (the role of
sglang-jax's ``QueueHostKVPool``: ``reserve -> copy_from_device -> release``) on a
:class:`~lmcache.storage_backend.mem_pool.LocalCPUPool` with the JAX backend, whose arena is
``pinned_host`` where JAX offers it and plain host memory otherwise. It imports sglang-jax, so it is
only importable where ``sgl_jax`` is.

:class:`LMCacheLRUHostKVPool` takes the HiCache role (sglang-jax's ``LRUHostKVPool``: the retaining,
page-addressed L2 pool behind ``UnifiedRadixCache`` and ``HiCacheController``) on the same kind of pool,
one LMCache slot per host page.
"""

from lmcache_sglang_jax.hicache_pool import (
    HostPageDoubleFreeError,
    HostPageStateError,
    LMCacheLRUHostKVPool,
    TransferOrderError,
)
from lmcache_sglang_jax.host_pool import LMCacheHostKVPool

__all__ = [
    "HostPageDoubleFreeError",
    "HostPageStateError",
    "LMCacheHostKVPool",
    "LMCacheLRUHostKVPool",
    "TransferOrderError",
]
