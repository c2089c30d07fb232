"""The contract between the chunk cache's prefix index and an eviction policy.

A policy decides which evictable chunk to drop next; the index (:class:`~lmcache.prefix_index.PrefixIndex`)
owns every entry and pin and tells the policy facts, by key only. Two rules keep policies simple:

* **Held chunks are not candidates.** The index holds a chunk while it is pinned (a lease, a running
  ``store`` or ``retrieve``), and also while it is a parked victim: a chunk the policy chose that still
  has cached children. Evicting only leaves keeps the cached set prefix-closed (every cached chunk's
  parent is cached), so the index restricts every policy to leaves the same way, lazily: it asks
  :meth:`EvictionPolicy.victim`, and if that chunk has children it parks it (:meth:`~EvictionPolicy.hold`)
  and asks again; when the parked chunk's last child leaves, the index releases it, not touched since,
  so it returns to where it was: the cold end. A chunk is parked at most once per time it became a
  candidate, so this costs O(1) amortized per chunk, and a chunk keeps its place until the moment it
  would be evicted.
* **Uses are told separately from candidacy.** :meth:`~EvictionPolicy.touch` reports a use (a hit), held
  or not; :meth:`~EvictionPolicy.release` makes a chunk a candidate again, placed by its uses since it was
  held (touched since: as just used; not touched since: where it was).

Every method must cost O(1) amortized (no scan of the cache), and a policy's memory (ghost lists,
histories, sketches) must stay bounded by a small multiple of its capacity.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

#: What policies key on: the cache's 16-byte chunk keys (any hashable works, for simulators).
Key = Hashable
_MASK64 = (1 << 64) - 1


def key_hash(key: Key) -> int:
    """A 64-bit hash of a key that is the same in every process for ``bytes`` and ``int`` keys.

    Python's ``hash`` of ``bytes`` is salted per process (PYTHONHASHSEED); the cache's keys are already
    uniform digests, so their first 8 bytes are hash enough. Other keys fall back to ``hash``."""
    if isinstance(key, bytes):
        return int.from_bytes(key[:8], "little")
    return hash(key) & _MASK64


class EvictionPolicy(Protocol):
    """Chooses the next chunk to evict among candidates; sees keys (16-byte digests), never entries.

    Built as ``Policy(capacity)``, ``capacity`` being the most chunks the cache can hold.
    """

    #: The policy's registered name (``"lru"``, ``"arc"`` ...), shown in the cache's repr and stats.
    name: str

    def insert(self, key: Key, parent: Key | None) -> None:
        """A new chunk entered the cache (its first use), below ``parent`` (None for a first chunk).

        It is held until :meth:`release`.
        """
        ...

    def touch(self, key: Key) -> None:
        """A cached chunk was used (a hit); it may be held or a candidate."""
        ...

    def hold(self, key: Key) -> None:
        """The candidate ``key`` cannot be evicted until :meth:`release` (pinned, or a parked victim)."""
        ...

    def release(self, key: Key) -> None:
        """The held chunk ``key`` is a candidate again, placed by its uses since :meth:`hold`."""
        ...

    def victim(self) -> Key | None:
        """Return the candidate to evict next (it stays a candidate until :meth:`evict` or :meth:`hold`),
        or None when there is none."""
        ...

    def evict(self, key: Key) -> None:
        """The candidate ``key`` was evicted to make room (ghost lists may remember it)."""
        ...

    def discard(self, key: Key) -> None:
        """The chunk ``key`` (held or a candidate) left the cache otherwise: the cache was cleared."""
        ...


__all__ = ["EvictionPolicy", "Key", "key_hash"]
