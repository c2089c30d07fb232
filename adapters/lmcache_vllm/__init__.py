"""vLLM adapters: this project's cache as a vLLM offloading spec and its eviction policies as vLLM
cache policies (tested with vLLM 0.33.0).

* :mod:`lmcache_vllm.policy`: ``LmcacheLRU``, ``LmcacheAdaptive``, ... for
  ``{"eviction_policy": "LmcacheAdaptive", "cache_policy_module_path": "lmcache_vllm.policy"}``.
* :mod:`lmcache_vllm.spec`: ``LmcacheOffloadingSpec`` for
  ``{"spec_name": "LmcacheOffloadingSpec", "spec_module_path": "lmcache_vllm.spec", "cpu_bytes_to_use": N}``.

Both submodules import vllm; this package's ``__init__`` does not.
"""

from __future__ import annotations

#: The vLLM version these adapters are tested with.
TESTED_VLLM_VERSION = "0.33.0"

__all__ = ["TESTED_VLLM_VERSION"]
