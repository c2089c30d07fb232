"""LMCache adapter: this project's chunk cache as an L2 adapter of LMCache's server mode (tested with
LMCache 0.5.6).

* :mod:`lmcache_mempool_l2.adapter`: ``MempoolL2Adapter``, loaded by LMCache's plugin L2 adapter with
  ``--l2-adapter '{"type": "plugin", "module_path": "lmcache_mempool_l2.adapter", "class_name":
  "MempoolL2Adapter", "adapter_params": {"max_object_bytes": ...}}'``.

Both LMCache and this project install a top-level package named ``lmcache``; the submodule joins the two
into one package (see :mod:`lmcache_mempool_l2.packages`) and imports LMCache. This ``__init__`` imports
neither.
"""

from __future__ import annotations

#: The LMCache version this adapter is tested with.
TESTED_LMCACHE_VERSION = "0.5.6"

__all__ = ["TESTED_LMCACHE_VERSION"]
