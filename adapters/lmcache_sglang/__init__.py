"""SGLang adapter: this project's chunk cache as an SGLang HiCache storage backend (tested with SGLang
0.5.23).

* :mod:`lmcache_sglang.storage`: ``LmcacheHiCacheStorage`` for ``--hicache-storage-backend dynamic``
  with ``--hicache-storage-backend-extra-config '{"backend_name": "lmcache_mempool", "module_path":
  "lmcache_sglang.storage", "class_name": "LmcacheHiCacheStorage"}'``.

The submodule imports sglang; this package's ``__init__`` does not.
"""

from __future__ import annotations

#: The SGLang version this adapter is tested with.
TESTED_SGLANG_VERSION = "0.5.23"

__all__ = ["TESTED_SGLANG_VERSION"]
