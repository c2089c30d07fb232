"""``"adaptive"``: follows whichever of LRU, LFU, LFUDA and ARC its shadow caches show hitting most."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from lmcache.policies.arc import ARCPolicy
from lmcache.policies.base import EvictionPolicy, Key
from lmcache.policies.lfu import LFUDAPolicy, LFUPolicy
from lmcache.policies.lru import LRUPolicy


class ShadowCache:
    """A key-only replica of the cache's index (same capacity, same leaf and pin rules) evicting by one
    expert policy: what that expert alone would have cached, and what it would have hit.

    It holds no data, only keys, the expert's metadata and the index's bookkeeping (children counts,
    parents, parked chunks), and it drives the expert through the same protocol calls as the cache does,
    so its hits are the expert's own hits on the same request stream, not an estimate. The keys it evicts
    are appended to ``evicted`` for the owner to drain."""

    def __init__(self, expert: EvictionPolicy, capacity: int) -> None:
        self.expert = expert
        self.evicted: list[Key] = []
        self._capacity = max(1, capacity)
        self._children: dict[Key, int] = {}  # cached key -> its number of cached children
        self._parent: dict[Key, Key | None] = {}
        self._parked: set[Key] = set()

    def _make_room(self) -> bool:
        """Evict one leaf (parking victims that still have children); False when nothing is evictable."""
        expert, children, parked = self.expert, self._children, self._parked
        while True:
            key = expert.victim()
            if key is None:
                return False
            if children[key]:
                expert.hold(key)
                parked.add(key)
                continue
            expert.evict(key)
            self.evicted.append(key)
            del children[key]
            parent = self._parent.pop(key)
            if parent is not None:
                left = children[parent] - 1
                children[parent] = left
                if left == 0 and parent in parked:
                    parked.remove(parent)
                    expert.release(parent)
            return True

    def access(self, chain: list[Key]) -> int:
        """Replay one use of ``chain`` (head first); return how many of its leading chunks were cached."""
        expert, children, parked = self.expert, self._children, self._parked
        hits = 0
        for key in chain:
            if key not in children:
                break
            hits += 1
        stored: list[Key] = []
        parent: Key | None = None
        for key in chain:
            if key in children:
                if key in parked:
                    parked.remove(key)
                else:
                    expert.hold(key)
            else:
                if len(children) >= self._capacity and not self._make_room():
                    break
                children[key] = 0
                self._parent[key] = parent
                if parent is not None:
                    children[parent] += 1
                expert.insert(key, parent)
            stored.append(key)
            parent = key
        for key in reversed(stored):
            expert.touch(key)
            expert.release(key)
        return hits


class AdaptivePolicy:
    """Follow whichever expert policy would have hit most recently (the recommended default).

    Each expert (by default LRU, LFU with history, LFU with dynamic aging and ARC) runs twice: once over
    the cache's real contents, keeping the order it would evict them in, and once in a
    :class:`ShadowCache` of the same capacity, which replays the same request stream as if that expert
    alone ran the cache. After each use of a chain (its tail-first touches, complete when its root chunk is
    touched) every shadow replays it and scores its hits; scores decay with a time constant of
    ``window * capacity`` chunk uses, so they measure the recent hit rate at this capacity on this
    workload. The leader changes when another expert's score beats the leader's by ``margin`` (relative),
    which keeps it from flapping between experts that are about as good.

    ``victim()`` first evicts the real chunks the leader's shadow no longer holds (oldest shadow eviction
    first): after a change of leader they are what the new leader would already have evicted, so the
    cache converges to the leader's own contents instead of paying for the old leader's choices for a whole
    cache lifetime. When there are none (always, while one leader has led from the start: the cache and
    its shadow then hold the same chunks), the leader's real instance chooses.

    Why this shape: no single classic policy is best at every capacity (LFU with history wins small
    caches, LRU large ones, ARC and LFUDA in between), and which one wins depends on the workload. The
    shadows measure exactly what each expert would hit here and now, and LRU leads until another expert
    has proven better.

    Costs: each call is forwarded to every real expert, and each chain use is replayed once per shadow:
    O(experts) per call, O(1) amortized like the experts. Memory: per expert, its metadata for the real
    contents and a shadow of ``capacity`` keys with its own ghosts and history.

    Invariants: ``_stale[i]`` holds the evictable cached chunks that shadow ``i`` does not hold (in the
    order it dropped them) and ``_stale_held[i]`` the held ones; ``_cached`` is the set of cached chunks
    and ``_held`` the held ones.
    """

    name = "adaptive"

    def __init__(
        self,
        capacity: int,
        experts: tuple[Callable[[int], EvictionPolicy], ...] = (LRUPolicy, LFUPolicy, LFUDAPolicy, ARCPolicy),
        *,
        window: float = 4.0,
        margin: float = 0.01,
    ) -> None:
        capacity = max(1, capacity)
        self._experts = [factory(capacity) for factory in experts]
        self._shadows = [ShadowCache(factory(capacity), capacity) for factory in experts]
        self._stale: list[OrderedDict[Key, None]] = [OrderedDict() for _ in experts]
        self._stale_held: list[set[Key]] = [set() for _ in experts]
        self._scores = [0.0] * len(experts)
        self._leader = 0
        self._decay_time = window * capacity
        self._margin = margin
        self._max_chain = capacity
        self._cached: set[Key] = set()
        self._held: set[Key] = set()
        self._roots: set[Key] = set()
        self._touched: list[Key] = []  # tail-first touches of the chain being used

    @property
    def leader(self) -> EvictionPolicy:
        """The expert whose choices the cache follows now."""
        return self._experts[self._leader]

    def insert(self, key: Key, parent: Key | None) -> None:
        for expert in self._experts:
            expert.insert(key, parent)
        self._cached.add(key)
        self._held.add(key)
        if parent is None:
            self._roots.add(key)

    def touch(self, key: Key) -> None:
        for expert in self._experts:
            expert.touch(key)
        touched = self._touched
        touched.append(key)
        if key in self._roots:
            touched.reverse()
            self._learn(touched)
            self._touched = []
        elif len(touched) > self._max_chain:  # touches that never reach a root: not a chain use
            touched.clear()

    def _learn(self, chain: list[Key]) -> None:
        """Replay a chain use in every shadow, update the stale sets and the scores, maybe change leader."""
        decay = math.exp(-len(chain) / self._decay_time)
        scores, cached, held = self._scores, self._cached, self._held
        for index, shadow in enumerate(self._shadows):
            scores[index] = scores[index] * decay + shadow.access(chain)
            stale, stale_held = self._stale[index], self._stale_held[index]
            for key in shadow.evicted:
                if key in cached:
                    if key in held:
                        stale_held.add(key)
                    else:
                        stale[key] = None
            shadow.evicted.clear()
            for key in chain:  # the shadow holds them now
                stale.pop(key, None)
                stale_held.discard(key)
        best = max(range(len(scores)), key=scores.__getitem__)
        if scores[best] > scores[self._leader] * (1.0 + self._margin):
            self._leader = best

    def hold(self, key: Key) -> None:
        for expert in self._experts:
            expert.hold(key)
        self._held.add(key)
        for stale, stale_held in zip(self._stale, self._stale_held, strict=True):
            if key in stale:
                del stale[key]
                stale_held.add(key)

    def release(self, key: Key) -> None:
        for expert in self._experts:
            expert.release(key)
        self._held.discard(key)
        for stale, stale_held in zip(self._stale, self._stale_held, strict=True):
            if key in stale_held:
                stale_held.remove(key)
                stale[key] = None
                stale.move_to_end(key, last=False)

    def victim(self) -> Key | None:
        stale = self._stale[self._leader]
        if stale:
            return next(iter(stale))
        return self._experts[self._leader].victim()

    def _forget(self, key: Key) -> None:
        self._cached.discard(key)
        self._held.discard(key)
        self._roots.discard(key)
        for stale, stale_held in zip(self._stale, self._stale_held, strict=True):
            stale.pop(key, None)
            stale_held.discard(key)

    def evict(self, key: Key) -> None:
        for expert in self._experts:
            expert.evict(key)
        self._forget(key)

    def discard(self, key: Key) -> None:
        for expert in self._experts:
            expert.discard(key)
        self._forget(key)
