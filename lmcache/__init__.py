"""lmcache-mempool: a KV-cache memory pool for LLM serving, the same from torch, JAX and numpy.

The pools are in :mod:`lmcache.storage_backend.mem_pool` (LMCache's module path); the metadata in
:mod:`lmcache.config`. This package imports neither torch nor JAX: a backend's framework is imported
only when a pool of that backend is created.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
