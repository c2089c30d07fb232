"""vLLM adapters: this project's cache as a vLLM offloading spec and its eviction policies as vLLM
cache policies (tested with vLLM 0.33.0).

* :mod:`lmcache_vllm.policy`: ``LmcacheLRU``, ``LmcacheAdaptive``, ... for
  ``{"eviction_policy": "LmcacheAdaptive", "cache_policy_module_path": "lmcache_vllm.policy"}``.
* :mod:`lmcache_vllm.spec`: ``LmcacheOffloadingSpec`` for
  ``{"spec_name": "LmcacheOffloadingSpec", "spec_module_path": "lmcache_vllm.spec", "cpu_bytes_to_use": N}``:
  its manager (scheduler side) keeps the chunks in a ``ChunkCache``, its worker
  (:mod:`lmcache_vllm.worker`) copies KV blocks into and out of the cache's slots, both sides mapping one
  host region (:mod:`lmcache_vllm.host_region`).

``policy``, ``spec`` and ``worker`` import vllm; ``host_region`` and this package's ``__init__`` do not.
"""

from __future__ import annotations

#: The vLLM version these adapters are tested with.
TESTED_VLLM_VERSION = "0.33.0"

__all__ = ["TESTED_VLLM_VERSION"]
