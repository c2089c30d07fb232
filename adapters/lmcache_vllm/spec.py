"""A vLLM ``OffloadingSpec`` whose CPU tier is this project's :class:`~lmcache.chunk_cache.ChunkCache`.

Load it through vLLM's ``OffloadingConnector``::

    KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                     kv_connector_extra_config={"spec_name": "LmcacheOffloadingSpec",
                                                "spec_module_path": "lmcache_vllm.spec",
                                                "cpu_bytes_to_use": 8 << 30})

Extra keys it reads: ``cpu_bytes_to_use`` (required: the host pool's size in bytes), ``eviction_policy``
(a name of :data:`lmcache.policies.POLICIES`, default ``"default"``), ``namespace`` (seeds every key,
default: the model name, dtype and engine id) and ``host_region_path`` (the shared host region's file,
default ``/dev/shm/lmcache_vllm_<hash of engine_id>``).

The manager (scheduler side) keeps one pool chunk per vLLM offload chunk (``blocks_per_chunk`` blocks
of ``worker_kv_bytes_per_block`` bytes for every worker), so the pool's chunk is a 1-token ``uint8``
chunk of that many bytes. Keys: vLLM's block hash already names the block's whole prefix, so each
offload key ``k`` is a one-chunk prompt of our cache, keyed ``blake2b(root + k)`` (``root`` the
namespace's root key): it chains from the root, and every cached chunk is a leaf of the prefix index,
which then evicts any idle chunk under the policy, never a pinned one. Loads are leases (pinned until
``complete_load``), stores are :class:`~lmcache.chunk_cache.PendingStore` reservations (invisible
until ``complete_store`` commits them); the load/store specs carry the slots' indices (and, in the
scheduler's process, their handles).

The worker side (:class:`~lmcache_vllm.worker.LmcacheOffloadingWorker`) copies device KV blocks into
and out of those slots. vLLM runs the manager and the workers from different spec objects (and, with
more than one worker, in different processes), so the pool's arena is a file in ``/dev/shm`` that both
sides map (:mod:`lmcache_vllm.host_region`), as vLLM's own CPU tier shares its region.

This module imports vllm; nothing else in the project imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from hashlib import blake2b
from typing import Any

from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

from lmcache.cache_keys import KEY_BYTES, root_key
from lmcache.cache_records import Lease
from lmcache.chunk_cache import ChunkCache, PendingStore
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import CacheInvariantError, ConfigError
from lmcache.hostmem import GIB
from lmcache.layout import SlotLayout
from lmcache.policies import make_policy
from lmcache.policies.recorder import EvictionRecorder
from lmcache.storage_backend.mem_pool import LocalCPUPool
from lmcache.storage_backend.mem_pool.base_pool import KVObj
from lmcache_vllm.host_region import HostRegion, region_path
from lmcache_vllm.worker import LmcacheOffloadingWorker


class LmcacheLoadStoreSpec(CPULoadStoreSpec):
    """The host side of a transfer: the cache's slots, in key order.

    ``chunk_ids`` (``block_ids``) are the slots' indices in the pool; :attr:`objs` are handles to them
    (writable for a store, read-only for a load), valid until the transfer completes.
    """

    def __init__(self, objs: Sequence[KVObj]) -> None:
        super().__init__([obj.chunk_idx for obj in objs])
        #: The slots' handles, one per key.
        self.objs: list[KVObj] = list(objs)

    def __reduce__(self) -> tuple[type[CPULoadStoreSpec], tuple[list[int]]]:
        """Pickle as a plain ``CPULoadStoreSpec`` of the slot indices: vLLM sends the spec from the
        scheduler to its workers (pickled with ``MultiprocExecutor``), where the handles mean nothing;
        the workers address slots by index in the shared arena."""
        return CPULoadStoreSpec, (self.block_ids.tolist(),)


class LmcacheOffloadingManager(OffloadingManager):
    """vLLM's scheduler-side offloading manager over a :class:`~lmcache.chunk_cache.ChunkCache`.

    Each offload key is one chunk of ``cache.pool.chunk_size`` tokens (one vLLM offload chunk). The
    manager owns its cache and, with ``own_pool``, the cache's pool (closed by :meth:`shutdown`). The
    cache's policy must be an :class:`EvictionRecorder` (so evictions are reported); with
    ``enable_events`` the manager keeps vLLM's KV events (stores and removals) for :meth:`take_events`.
    ``on_shutdown`` runs once at the end of :meth:`shutdown` (the spec releases the shared arena there).

    Raises:
        ConfigError: the cache's policy is not an :class:`EvictionRecorder`.
    """

    def __init__(
        self,
        cache: ChunkCache,
        *,
        own_pool: bool = False,
        enable_events: bool = False,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        recorder = cache.policy
        if not isinstance(recorder, EvictionRecorder):
            raise ConfigError(
                "LmcacheOffloadingManager needs a cache built with policy=EvictionRecorder(policy), got a "
                f"{type(recorder).__name__}: it reports evicted chunks to vLLM"
            )
        self.cache = cache
        self._recorder = recorder
        self._own_pool = own_pool
        self._on_shutdown = on_shutdown
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._resident: dict[bytes, OffloadKey] = {}  # committed chunks' cache keys -> offload keys
        self._root = root_key(cache.namespace)
        self._tokens = cache.pool.chunk_size
        self._pending: dict[OffloadKey, PendingStore] = {}
        self._leases: dict[OffloadKey, list[Lease]] = {}

    def chunk_key(self, key: OffloadKey) -> bytes:
        """The cache's 16-byte key of the offload key ``key`` (a one-chunk prompt chained from the root)."""
        return blake2b(self._root + bytes(key), digest_size=KEY_BYTES).digest()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._pending:
            return LookupResult.HIT_PENDING
        if self.cache.lookup_keys([self.chunk_key(key)], self._tokens):
            return LookupResult.HIT
        return LookupResult.MISS

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> CPULoadStoreSpec:
        leases: list[tuple[OffloadKey, Lease]] = []
        try:
            for key in keys:
                lease = self.cache.lease_keys([self.chunk_key(key)], self._tokens)
                leases.append((key, lease))
                if not lease.chunks:
                    state = "still being stored" if key in self._pending else "not cached"
                    raise CacheInvariantError(
                        f"prepare_load of {bytes(key).hex()}: the chunk is {state}; load only keys "
                        f"that lookup() reported as HIT"
                    )
        except BaseException:
            for _, lease in leases:
                lease.release()
            raise
        for key, lease in leases:
            self._leases.setdefault(key, []).append(lease)
        return LmcacheLoadStoreSpec([lease.chunks[0] for _, lease in leases])

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        missing = [bytes(key).hex() for key in keys if not self._leases.get(key)]
        if missing:
            raise CacheInvariantError(f"complete_load of keys with no load in flight: {', '.join(missing)}")
        for key in keys:
            held = self._leases[key]
            held.pop().release()
            if not held:
                del self._leases[key]

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        offered = list(dict.fromkeys(keys))
        cache, tokens = self.cache, self._tokens
        shield: list[Lease] = []  # keeps the offer's cached chunks from being evicted to make room
        made: list[tuple[OffloadKey, PendingStore]] = []
        try:
            for key in offered:
                if key in self._pending:
                    continue
                chunk_key = self.chunk_key(key)
                if chunk_key in cache:
                    lease = cache.lease_keys([chunk_key], tokens)
                    if lease.chunks:
                        shield.append(lease)
                        continue
                    lease.release()  # evicted meanwhile: store it again
                pending = cache.begin_store([chunk_key], tokens)
                if pending.cached:  # cached between the check and the reservation
                    pending.abort()
                    continue
                if not pending.slots:  # no room: the whole offer is refused, nothing kept
                    pending.abort()
                    for _, made_store in made:
                        made_store.abort()
                    self._evicted()  # chunks dropped while trying are gone all the same
                    return None
                made.append((key, pending))
        except BaseException:
            for _, made_store in made:
                made_store.abort()
            raise
        finally:
            for lease in shield:
                lease.release()
        for key, pending in made:
            self._pending[key] = pending
        evicted = self._evicted()
        return PrepareStoreOutput(
            keys_to_store=[key for key, _ in made],
            store_spec=LmcacheLoadStoreSpec([pending.slots[0] for _, pending in made]),
            evicted_keys=evicted,
        )

    def _evicted(self) -> list[OffloadKey]:
        """The offload keys of the chunks the cache evicted since the last call (announced as events)."""
        evicted = []
        for chunk_key in self._recorder.drain():
            key = self._resident.pop(chunk_key, None) if isinstance(chunk_key, bytes) else None
            if key is not None:
                evicted.append(key)
        if evicted and self._events is not None:
            self._events.append(OffloadingEvent(keys=evicted, medium=Medium.CPU, removed=True))
        return evicted

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        stored = []
        for key in keys:
            pending = self._pending.pop(key, None)
            if pending is None:  # already cached, or refused: vLLM completes the whole offer
                continue
            if success:
                pending.commit()
                self._resident[self.chunk_key(key)] = key
                stored.append(key)
            else:
                pending.abort()
        if stored and self._events is not None:
            self._events.append(OffloadingEvent(keys=stored, medium=Medium.CPU, removed=False))

    def take_events(self) -> Iterable[OffloadingEvent]:
        if not self._events:
            return ()
        events, self._events = self._events, []
        return events

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def has_pending_work(self) -> bool:
        return bool(self._pending or self._leases)

    def reset_cache(self) -> None:
        self.cache.clear()
        self._resident = {key: value for key, value in self._resident.items() if key in self.cache}
        self._recorder.drain()

    def shutdown(self) -> None:
        for pending in self._pending.values():
            pending.abort()
        self._pending.clear()
        for held in self._leases.values():
            for lease in held:
                lease.release()
        self._leases.clear()
        self.cache.close()
        if self._own_pool:
            self.cache.pool.close()
        if self._on_shutdown is not None:
            on_shutdown, self._on_shutdown = self._on_shutdown, None
            on_shutdown()


class LmcacheOffloadingSpec(OffloadingSpec):
    """vLLM's ``OffloadingSpec`` backed by a :class:`~lmcache.chunk_cache.ChunkCache` over a host pool
    whose arena both sides of vLLM map (:class:`~lmcache_vllm.host_region.HostRegion`).

    vLLM builds one spec per connector role: the scheduler's calls :meth:`get_manager`, each worker's
    :meth:`get_worker`. Both compute the same geometry from the same config (the pool's slots, their
    stride, the region's file), so the manager's slot indices name the bytes the workers copy.

    Raises:
        ConfigError: ``cpu_bytes_to_use`` is missing or not a positive int, or too small for one chunk;
            the canonical host layout was asked for (not supported).
    """

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        extra = self.extra_config
        size = extra.get("cpu_bytes_to_use")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(
                f"kv_connector_extra_config['cpu_bytes_to_use'] must be a positive int of bytes, got {size!r}"
            )
        if config.canonical_layout:
            raise ConfigError(
                "LmcacheOffloadingSpec keeps each worker's pages as they are (vLLM's direct layout); drop "
                "the canonical layout option from kv_connector_extra_config"
            )
        #: Bytes of each chunk one worker owns: ``blocks_per_chunk`` of its blocks.
        self.worker_bytes_per_chunk: int = config.worker_kv_bytes_per_block * self.blocks_per_chunk
        #: Bytes of one offload chunk (one pool chunk): ``blocks_per_chunk`` blocks of every worker.
        self.kv_bytes_per_chunk: int = self.worker_bytes_per_chunk * max(config.parallel.world_size, 1)
        if self.kv_bytes_per_chunk <= 0:
            raise ConfigError(
                f"worker_kv_bytes_per_block ({config.worker_kv_bytes_per_block}) and blocks_per_chunk "
                f"({self.blocks_per_chunk}) must be positive to size the host pool's chunks"
            )
        if size < self.kv_bytes_per_chunk:
            raise ConfigError(
                f"cpu_bytes_to_use ({size}) holds not one chunk of {self.kv_bytes_per_chunk} bytes; raise it"
            )
        self.cpu_bytes_to_use: int = size
        self.eviction_policy: str = str(extra.get("eviction_policy", "default"))
        default_namespace = f"{config.model.name}/{config.model.dtype}/{config.engine_id}"
        self.namespace: str = str(extra.get("namespace", default_namespace))
        #: The pool's metadata: one ``uint8`` token of ``kv_bytes_per_chunk`` bytes per chunk.
        self.pool_metadata = LMCacheMemPoolMetadata(
            (1, 1, 1, 1, self.kv_bytes_per_chunk), "uint8", size / GIB
        )
        layout = SlotLayout.from_metadata(self.pool_metadata)
        #: Bytes between two slots of the arena (the pool's ``size_per_chunk``).
        self.slot_bytes: int = layout.slot_bytes
        #: Slots in the arena (the pool's ``max_chunk_num``).
        self.num_slots: int = self.pool_metadata.budget_bytes // layout.slot_bytes
        if self.num_slots < 1:
            raise ConfigError(
                f"cpu_bytes_to_use ({size}) holds not one {self.slot_bytes}-byte slot (a chunk of "
                f"{self.kv_bytes_per_chunk} bytes, aligned); raise it"
            )
        #: The shared host region's file (named after ``engine_id``; see :mod:`lmcache_vllm.host_region`).
        self.region_path: str = str(extra.get("host_region_path", region_path(config.engine_id)))
        self._manager: LmcacheOffloadingManager | None = None
        self._worker: LmcacheOffloadingWorker | None = None

    def _open_region(self) -> HostRegion:
        return HostRegion(self.region_path, self.num_slots * self.slot_bytes)

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            region = self._open_region()
            try:
                pool = LocalCPUPool(self.pool_metadata, backend="numpy", memory=region.array)
            except BaseException:
                region.close()
                raise
            try:
                if pool.max_chunk_num != self.num_slots or pool.size_per_chunk != self.slot_bytes:
                    raise CacheInvariantError(
                        f"the pool has {pool.max_chunk_num} slots of {pool.size_per_chunk} bytes, the "
                        f"workers address {self.num_slots} of {self.slot_bytes}"
                    )
                policy = EvictionRecorder(make_policy(self.eviction_policy, pool.max_chunk_num))
                cache = ChunkCache(pool, namespace=self.namespace, policy=policy)
            except BaseException:
                pool.close()
                region.close()
                raise
            self._manager = LmcacheOffloadingManager(
                cache,
                own_pool=True,
                enable_events=self.kv_events_config.enable_kv_cache_events,
                on_shutdown=region.close,
            )
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            region = self._open_region()
            try:
                self._worker = LmcacheOffloadingWorker(
                    kv_caches,
                    region.array,
                    num_slots=self.num_slots,
                    slot_bytes=self.slot_bytes,
                    worker_offset=self.config.parallel.rank * self.worker_bytes_per_chunk,
                    worker_bytes=self.worker_bytes_per_chunk,
                    blocks_per_chunk=self.blocks_per_chunk,
                    on_shutdown=region.close,
                )
            except BaseException:
                region.close()
                raise
        return self._worker


def spec_config(cpu_bytes_to_use: int, **extra: Any) -> dict[str, Any]:
    """The ``kv_connector_extra_config`` that loads :class:`LmcacheOffloadingSpec` (plus ``extra`` keys)."""
    return {
        "spec_name": "LmcacheOffloadingSpec",
        "spec_module_path": __name__,
        "cpu_bytes_to_use": cpu_bytes_to_use,
        **extra,
    }


__all__ = [
    "EvictionRecorder",
    "LmcacheLoadStoreSpec",
    "LmcacheOffloadingManager",
    "LmcacheOffloadingSpec",
    "spec_config",
]
