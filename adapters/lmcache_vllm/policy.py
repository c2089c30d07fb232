"""This project's eviction policies as vLLM ``CachePolicy`` classes, for vLLM's CPU offloading manager.

Select one in ``kv_connector_extra_config``::

    {"eviction_policy": "LmcacheAdaptive", "cache_policy_module_path": "lmcache_vllm.policy"}

or call :func:`register` once and use the short names (``"lmcache-adaptive"`` ...).

How our :class:`~lmcache.policies.base.EvictionPolicy` protocol is mapped onto vLLM's:

* vLLM's manager keeps no prefix tree: its keys are flat (a block hash and a group index), so every
  chunk is inserted with ``parent=None`` and **the leaf restriction of our cache does not apply**: any
  idle chunk may be chosen. What is kept of it: touches are told tail first (as vLLM's own LRU does),
  so a prefix's head is its most recently used chunk and recency-based policies tend to drop tails
  first; nothing enforces it.
* A chunk is a candidate exactly while vLLM counts it evictable (``ref_cnt == 0``): ``insert`` of a
  pending chunk (``ref_cnt == -1``) leaves it held, ``mark_evictable`` releases it and
  ``mark_non_evictable`` holds it again, so our policy never offers a chunk vLLM is reading or writing.
* ``evict(n, protected)`` is atomic: it first counts the candidates outside ``protected`` and returns
  None, changing nothing, when there are fewer than ``n``; otherwise it asks the policy for victims,
  holding each protected one it is offered for the duration of the call (released afterwards, not
  touched, so it goes back where it was), until it has ``n``.
* ``clear`` builds a fresh policy (ghost lists and adaptive state are reset, as vLLM asks).

This module imports vllm; nothing else in the project imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus
from vllm.v1.kv_offload.cpu.policies.factory import CachePolicyFactory

from lmcache.errors import CacheInvariantError, ConfigError
from lmcache.policies import POLICIES, EvictionPolicy


class LmcachePolicy(CachePolicy):
    """A vLLM ``CachePolicy`` driven by one of this project's eviction policies (:attr:`policy_name`).

    Invariants: ``chunks`` holds every cached chunk; ``_evictable`` is the subset vLLM marked
    evictable, and exactly those are candidates (not held) in ``_policy``.
    """

    #: The name in :data:`lmcache.policies.POLICIES` this class runs (set by each subclass).
    policy_name: str = ""

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        factory = POLICIES.get(self.policy_name)
        if factory is None:
            raise ConfigError(
                f"{type(self).__name__} names no policy ({self.policy_name!r}); use one of the Lmcache* "
                f"classes of lmcache_vllm.policy ({', '.join(sorted(CLASS_NAMES.values()))})"
            )
        self._factory: Callable[[int], EvictionPolicy] = factory
        self._policy: EvictionPolicy = factory(max(cache_capacity, 1))
        #: Every cached chunk's status, by key (vLLM's manager reads and updates ``ref_cnt`` in place).
        self.chunks: dict[OffloadKey, ChunkStatus] = {}
        self._evictable: set[OffloadKey] = set()

    @property
    def policy(self) -> EvictionPolicy:
        """The project's policy object this adapter drives."""
        return self._policy

    def get(self, key: OffloadKey) -> ChunkStatus | None:
        return self.chunks.get(key)

    def insert(self, key: OffloadKey, chunk: ChunkStatus, req_context: ReqContext) -> None:
        if key in self.chunks:
            raise CacheInvariantError(
                f"vLLM inserted the cached chunk {bytes(key).hex()} again; remove it first"
            )
        self.chunks[key] = chunk
        self._policy.insert(key, None)  # held until released; flat keys: no parent
        if chunk.ref_cnt == 0:
            self._release(key)

    def remove(self, key: OffloadKey) -> None:
        del self.chunks[key]
        self._evictable.discard(key)
        self._policy.discard(key)

    def touch(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        chunks = self.chunks
        for key in reversed(list(keys)):  # tail first: the head of a prefix ends the most recent
            if key in chunks:
                self._policy.touch(key)

    def evict(self, n: int, protected: set[OffloadKey]) -> list[tuple[OffloadKey, ChunkStatus]] | None:
        if n <= 0:
            return []
        evictable = self._evictable
        shielded = sum(1 for key in protected if key in evictable)
        if len(evictable) - shielded < n:
            return None  # atomic: nothing asked of the policy
        policy = self._policy
        held: list[OffloadKey] = []
        evicted: list[tuple[OffloadKey, ChunkStatus]] = []
        try:
            while len(evicted) < n:
                key = policy.victim()
                if key is None or key not in evictable:
                    raise CacheInvariantError(
                        f"policy {self.policy_name!r} offered {key!r} as a victim while "
                        f"{len(evictable) - shielded - len(evicted)} idle unprotected chunks remain"
                    )
                if key in protected:
                    policy.hold(key)
                    held.append(key)
                    continue
                policy.evict(key)
                evictable.remove(key)
                evicted.append((key, self.chunks.pop(key)))
        finally:
            for key in reversed(held):  # not touched since: each goes back where it was
                policy.release(key)
        return evicted

    def clear(self) -> None:
        self.chunks.clear()
        self._evictable.clear()
        self._policy = self._factory(max(self.cache_capacity, 1))

    def mark_evictable(self, key: OffloadKey) -> None:
        self._release(key)

    def mark_non_evictable(self, key: OffloadKey) -> None:
        self._evictable.remove(key)
        self._policy.hold(key)

    def _release(self, key: OffloadKey) -> None:
        self._evictable.add(key)
        self._policy.release(key)


class LmcacheLRU(LmcachePolicy):
    """This project's ``"lru"`` policy (least recently used)."""

    policy_name = "lru"


class LmcacheLFU(LmcachePolicy):
    """This project's ``"lfu"`` policy (least frequently used)."""

    policy_name = "lfu"


class LmcacheLFUDA(LmcachePolicy):
    """This project's ``"lfuda"`` policy (LFU with dynamic aging)."""

    policy_name = "lfuda"


class LmcacheARC(LmcachePolicy):
    """This project's ``"arc"`` policy (adaptive replacement cache)."""

    policy_name = "arc"


class LmcacheS3FIFO(LmcachePolicy):
    """This project's ``"s3fifo"`` policy (small, main and ghost FIFO queues)."""

    policy_name = "s3fifo"


class LmcacheWTinyLFU(LmcachePolicy):
    """This project's ``"wtinylfu"`` policy (a window LRU and a frequency-admitted main cache)."""

    policy_name = "wtinylfu"


class LmcacheAdaptive(LmcachePolicy):
    """This project's ``"adaptive"`` policy (its default)."""

    policy_name = "adaptive"


#: Our policy name -> the class name vLLM loads with ``cache_policy_module_path="lmcache_vllm.policy"``.
CLASS_NAMES: dict[str, str] = {
    "lru": "LmcacheLRU",
    "lfu": "LmcacheLFU",
    "lfuda": "LmcacheLFUDA",
    "arc": "LmcacheARC",
    "s3fifo": "LmcacheS3FIFO",
    "wtinylfu": "LmcacheWTinyLFU",
    "adaptive": "LmcacheAdaptive",
}


def register() -> list[str]:
    """Register every policy with vLLM's ``CachePolicyFactory`` as ``"lmcache-<name>"`` (skipping names
    registered already) and return the short names, for ``{"eviction_policy": "lmcache-adaptive"}``
    without a ``cache_policy_module_path``."""
    names = []
    registry = CachePolicyFactory._registry
    for name, class_name in CLASS_NAMES.items():
        short = f"lmcache-{name}"
        if short not in registry:
            CachePolicyFactory.register_cache_policy(short, __name__, class_name)
        names.append(short)
    return names


__all__ = [
    "CLASS_NAMES",
    "LmcacheARC",
    "LmcacheAdaptive",
    "LmcacheLFU",
    "LmcacheLFUDA",
    "LmcacheLRU",
    "LmcachePolicy",
    "LmcacheS3FIFO",
    "LmcacheWTinyLFU",
    "register",
]
