"""Eviction policies of the chunk cache, by name.

``ChunkCache(pool, policy=...)`` and the shared server's ``--policy`` take a name from :data:`POLICIES`
(or a policy object). Every policy evicts only leaves and never a pinned chunk (the prefix index
enforces both, see :mod:`lmcache.policies.base`) and costs O(1) amortized per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

from lmcache.errors import ConfigError
from lmcache.policies.adaptive import AdaptivePolicy
from lmcache.policies.arc import ARCPolicy
from lmcache.policies.base import EvictionPolicy
from lmcache.policies.lfu import LFUDAPolicy, LFUPolicy
from lmcache.policies.lru import LRUPolicy
from lmcache.policies.s3fifo import S3FIFOPolicy
from lmcache.policies.wtinylfu import WTinyLFUPolicy

#: Policy name -> its class (built as ``cls(capacity)``).
POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "lfuda": LFUDAPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "wtinylfu": WTinyLFUPolicy,
    "adaptive": AdaptivePolicy,
}

#: What ``ChunkCache`` uses when no policy is given: the one that measured best on request traces
#: (docs/policies.md).
DEFAULT_POLICY = "adaptive"


def make_policy(policy: str | EvictionPolicy | None, capacity: int) -> EvictionPolicy:
    """Return the policy named ``policy`` (``"default"`` or None: :data:`DEFAULT_POLICY`) for a cache of
    ``capacity`` chunks, or ``policy`` itself when it is a policy object.

    Raises:
        ConfigError: an unknown name, or an object that is not a policy.
    """
    if policy is None or policy == "default":
        policy = DEFAULT_POLICY
    if isinstance(policy, str):
        factory = POLICIES.get(policy)
        if factory is None:
            raise ConfigError(
                f"unknown eviction policy {policy!r}; use one of {', '.join(sorted(POLICIES))} or 'default'"
            )
        return factory(capacity)
    missing = [
        name
        for name in ("insert", "touch", "hold", "release", "victim", "evict", "discard")
        if not callable(getattr(policy, name, None))
    ]
    if missing:
        raise ConfigError(
            f"policy must be a name or an EvictionPolicy; a {type(policy).__name__} has no "
            f"{', '.join(missing)}"
        )
    return policy


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "ARCPolicy",
    "AdaptivePolicy",
    "EvictionPolicy",
    "LFUDAPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "WTinyLFUPolicy",
    "make_policy",
]
