"""A policy that runs another and records the keys it evicts: for adapters whose engine must be told
which chunks left the cache (vLLM's ``evicted_keys``, LMCache's listeners)."""

from __future__ import annotations

from collections.abc import Callable

from lmcache.policies.base import EvictionPolicy, Key


class EvictionRecorder:
    """An :class:`~lmcache.policies.base.EvictionPolicy` that forwards every call to ``policy`` and
    records each key it evicts, after the eviction.

    Keys go to ``sink`` when one is given (called under the cache's lock, once per evicted chunk: a
    ``deque.append`` for a reader on another thread), else into a list that :meth:`drain` empties.
    """

    def __init__(self, policy: EvictionPolicy, sink: Callable[[Key], object] | None = None) -> None:
        self._policy = policy
        self.name = policy.name
        self._evicted: list[Key] = []
        self._sink = sink

    @property
    def policy(self) -> EvictionPolicy:
        """The policy that chooses."""
        return self._policy

    def drain(self) -> list[Key]:
        """The keys evicted since the last call, oldest first (none when a ``sink`` takes them)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def insert(self, key: Key, parent: Key | None) -> None:
        self._policy.insert(key, parent)

    def touch(self, key: Key) -> None:
        self._policy.touch(key)

    def hold(self, key: Key) -> None:
        self._policy.hold(key)

    def release(self, key: Key) -> None:
        self._policy.release(key)

    def victim(self) -> Key | None:
        return self._policy.victim()

    def evict(self, key: Key) -> None:
        self._policy.evict(key)
        if self._sink is not None:
            self._sink(key)
        else:
            self._evicted.append(key)

    def discard(self, key: Key) -> None:
        self._policy.discard(key)


__all__ = ["EvictionRecorder"]
