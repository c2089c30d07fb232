"""``LmcacheHiCacheStorage``: an SGLang HiCache storage backend (the L3 tier below SGLang's host memory
pool) over this project's :class:`~lmcache.chunk_cache.ChunkCache`.

SGLang names every page by a string hash (``HiCacheController`` hashes each page chained on the
previous one, so one hash names a whole prefix). Each page is kept as one single-chunk entry of the
cache: the key is a 16-byte ``blake2b`` of the page hash, seeded with a namespace made of the model
and the shard identity (TP / PP / context-parallel / DCP ranks, as SGLang's own file backend suffixes
its keys). A page is stored as its raw bytes (``mem_pool_host.get_data_page(index, flat=True)``),
so any host-pool layout round-trips bit-exactly through ``set_from_flat_data_page``.

Load it with::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "lmcache_mempool",
        "module_path": "lmcache_sglang.storage", "class_name": "LmcacheHiCacheStorage",
        "lmcache_cache_gib": 8, "lmcache_policy": "lru"}'

Every page is its own leaf, so the cache's eviction policy evicts single pages when the pool is full;
a page that gets no slot is reported as not stored (``False``) and SGLang keeps it on the host only.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError
from lmcache.storage_backend.mem_pool import LocalCPUPool

#: ``extra_config`` keys this backend reads (besides SGLang's own ``backend_name``, ``module_path``,
#: ``class_name``).
OPTIONS = ("lmcache_cache_gib", "lmcache_policy")
DEFAULT_CACHE_GIB = 1.0


def _namespace(config: HiCacheStorageConfig) -> str:
    """The shard identity a page's bytes depend on: MLA pages are the same on every TP rank."""
    parts = [f"model={config.model_name}", f"pp={config.pp_rank}/{config.pp_size}"]
    if not config.is_mla_model:
        parts.append(f"tp={config.tp_rank}/{config.tp_size}")
    if config.attn_cp_size > 1:
        parts.append(f"cp={config.attn_cp_rank}/{config.attn_cp_size}")
    if config.dcp_size > 1:
        parts.append(f"dcp={config.dcp_rank}/{config.dcp_size}")
    return "sglang|" + "|".join(parts)


class LmcacheHiCacheStorage(HiCacheStorage):  # type: ignore[misc]
    """SGLang's ``HiCacheStorage`` over an in-process :class:`~lmcache.chunk_cache.ChunkCache`.

    Args:
        storage_config: SGLang's ``HiCacheStorageConfig`` (``extra_config`` may set
            ``lmcache_cache_gib``, the host memory budget in GiB, default 1, and ``lmcache_policy``,
            an eviction policy name of :data:`lmcache.policies.POLICIES`).
        kwargs: what ``StorageBackendFactory`` passes dynamic backends besides the config (unused).

    The pool is sized when SGLang registers its host pool (``register_mem_pool_host``), because only
    then is a page's byte size known; the classic ``set`` / ``batch_set`` calls size it from the first
    page instead when no host pool was registered.

    Raises:
        ConfigError: an ``extra_config`` value is unusable (the message names the key).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        extra = dict(storage_config.extra_config or {})
        gib = extra.get("lmcache_cache_gib", DEFAULT_CACHE_GIB)
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or gib <= 0:
            raise ConfigError(f"extra_config lmcache_cache_gib must be a number of GiB > 0, got {gib!r}")
        policy = extra.get("lmcache_policy")
        if policy is not None and not isinstance(policy, str):
            raise ConfigError(f"extra_config lmcache_policy must be a policy name, got {policy!r}")
        self.storage_config = storage_config
        self.namespace = _namespace(storage_config)
        self._gib = float(gib)
        self._policy = policy
        self._lock = threading.Lock()
        self._cache: ChunkCache | None = None
        self._page_bytes = 0
        self.mem_pool_host: Any = None

    # -- setup -----------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Take SGLang's host pool (``HostKVCache``): the v1 calls copy pages out of and into it."""
        page_bytes = mem_pool_host.get_dummy_flat_data_page().numel() * mem_pool_host.dtype.itemsize
        self._ensure_cache(page_bytes)
        self.mem_pool_host = mem_pool_host

    def _ensure_cache(self, page_bytes: int) -> ChunkCache:
        with self._lock:
            if self._cache is None:
                meta = LMCacheMemPoolMetadata((1, 1, 1, 1, page_bytes), "uint8", self._gib)
                pool = LocalCPUPool(meta, backend="torch")
                self._cache = ChunkCache(pool, namespace=self.namespace, policy=self._policy)
                self._page_bytes = page_bytes
            elif page_bytes != self._page_bytes:
                raise ChunkShapeError(
                    f"a page of {page_bytes} bytes does not fit this backend's pages of "
                    f"{self._page_bytes} bytes (one backend serves one host pool)"
                )
            return self._cache

    @property
    def cache(self) -> ChunkCache | None:
        """The chunk cache holding the pages (None until the page size is known)."""
        return self._cache

    def _key(self, key: Any) -> list[bytes]:
        digest = hashlib.blake2b(key.encode(), digest_size=16, person=b"lmcache-sglang")
        digest.update(self.namespace.encode())
        return [digest.digest()]

    @staticmethod
    def _check_keys(keys: Any) -> list[str]:
        if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
            raise ConfigError(f"keys must be a list of page hashes (str), got {type(keys).__name__}")
        bad = [k for k in keys if not isinstance(k, str) or not k]
        if bad:
            raise ConfigError(f"every key must be a non-empty str page hash, got {bad[0]!r}")
        return list(keys)

    def _page_starts(self, keys: list[str], host_indices: Any) -> list[int]:
        host = self.mem_pool_host
        if host is None:
            raise ConfigError(
                "no host pool registered: SGLang calls register_mem_pool_host(mem_pool_host) before "
                "the v1 calls; call it first"
            )
        if not isinstance(host_indices, torch.Tensor) or host_indices.dim() != 1:
            raise ChunkTypeError("host_indices must be a 1-D torch tensor of host-pool token indices")
        size = host.page_size
        if host_indices.numel() != len(keys) * size:
            raise ChunkShapeError(
                f"{len(keys)} keys need {len(keys) * size} host indices (page_size {size}), got "
                f"{host_indices.numel()}"
            )
        starts = [int(i) for i in host_indices[::size].tolist()] if keys else []
        if any(s % size or s < 0 for s in starts):
            raise ChunkShapeError(f"every page must start at a multiple of page_size {size}: {starts}")
        return starts

    # -- the page copies -------------------------------------------------------------------------------
    def _store(self, key: str, page: torch.Tensor) -> bool:
        flat = page.contiguous().reshape(-1).view(torch.uint8)
        cache = self._ensure_cache(flat.numel())
        with cache.begin_store(self._key(key), 1) as pending:
            if pending.cached:
                return True
            if not pending.slots:
                return False  # the pool is full of pinned pages
            pending.slots[0].as_torch().reshape(-1).copy_(flat)
            pending.commit()
        return True

    def _load(self, key: str, out: torch.Tensor) -> bool:
        cache = self._cache
        if cache is None:
            return False
        flat = out.reshape(-1).view(torch.uint8)
        if flat.numel() != self._page_bytes:
            raise ChunkShapeError(
                f"target of {flat.numel()} bytes does not fit this backend's pages of {self._page_bytes}"
            )
        with cache.lease_keys(self._key(key), 1) as lease:
            if not lease.num_tokens:
                return False
            flat.copy_(lease.chunks[0].as_torch().reshape(-1))
        return True

    # -- SGLang's zero-copy (v1) calls -----------------------------------------------------------------
    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Store the pages at ``host_indices`` (``page_size`` indices per key) under ``keys``; per key,
        whether it is stored now.

        Raises:
            ConfigError: keys are not a list of str, or no host pool was registered.
            ChunkTypeError, ChunkShapeError: ``host_indices`` do not cover one page per key.
        """
        keys = self._check_keys(keys)
        starts = self._page_starts(keys, host_indices)
        host = self.mem_pool_host
        return [
            self._store(key, host.get_data_page(start, flat=True))
            for key, start in zip(keys, starts, strict=True)
        ]

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Copy the pages of ``keys`` into the host pool at ``host_indices``; per key, whether it was
        found (a missing page leaves its host page untouched).

        Raises:
            ConfigError, ChunkTypeError, ChunkShapeError: as :meth:`batch_set_v1`.
        """
        keys = self._check_keys(keys)
        starts = self._page_starts(keys, host_indices)
        host = self.mem_pool_host
        results = []
        for key, start in zip(keys, starts, strict=True):
            page = host.get_dummy_flat_data_page()
            found = self._load(key, page)
            if found:
                host.set_from_flat_data_page(start, page)
            results.append(found)
        return results

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading ``keys`` are stored (SGLang loads only that prefix)."""
        keys = self._check_keys(keys)
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)

    # -- the classic calls (copies through caller tensors) ---------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether the page ``key`` is stored."""
        self._check_keys([key])
        cache = self._cache
        return cache is not None and cache.lookup_keys(self._key(key), 1) > 0

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        """Copy page ``key`` into ``target_location`` (a flat page tensor) and return it; None on a miss.

        Raises:
            ChunkTypeError: ``target_location`` is not a torch tensor.
            ChunkShapeError: it does not hold one page's bytes.
        """
        self._check_keys([key])
        if not isinstance(target_location, torch.Tensor):
            raise ChunkTypeError("get needs target_location: a torch tensor of one page (flat)")
        return target_location if self._load(key, target_location) else None

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        """:meth:`get` of each key into its target."""
        keys = self._check_keys(keys)
        if not isinstance(target_locations, (list, tuple)) or len(target_locations) != len(keys):
            raise ChunkShapeError("batch_get needs one target tensor per key")
        return [self.get(key, out) for key, out in zip(keys, target_locations, strict=True)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        """Store the page tensor ``value`` under ``key``; False when the pool has no slot for it.

        Raises:
            ChunkTypeError: ``value`` is not a torch tensor.
            ChunkShapeError: its byte size differs from the pages already stored.
        """
        self._check_keys([key])
        if not isinstance(value, torch.Tensor):
            raise ChunkTypeError("set needs value: a torch tensor of one page")
        return self._store(key, value)

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        """:meth:`set` of each key; True when every page is stored."""
        keys = self._check_keys(keys)
        if not isinstance(values, (list, tuple)) or len(values) != len(keys):
            raise ChunkShapeError("batch_set needs one page tensor per key")
        if any(not isinstance(v, torch.Tensor) for v in values):
            raise ChunkTypeError("batch_set needs torch tensors as values")
        return all([self.set(key, value) for key, value in zip(keys, values, strict=True)])

    def clear(self) -> None:
        """Drop every stored page."""
        if self._cache is not None:
            self._cache.clear()

    def close(self) -> None:
        """Release the cache and its pool."""
        if self._cache is not None:
            self._cache.close()


__all__ = ["OPTIONS", "LmcacheHiCacheStorage"]
