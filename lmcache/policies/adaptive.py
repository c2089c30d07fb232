"""``"adaptive"``: follows whichever of LRU, LFU, LFUDA and ARC its shadow caches show hitting most."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from lmcache.errors import ConfigError
from lmcache.policies.arc import ARCPolicy
from lmcache.policies.base import EvictionPolicy, Key, key_hash
from lmcache.policies.lfu import LFUDAPolicy, LFUPolicy
from lmcache.policies.lru import LRUPolicy

#: Keys per shadow cache at most: larger caches replay a uniform sample of their keys (see AdaptivePolicy).
SHADOW_SAMPLE = 1 << 16
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential int keys (simulators) uniformly
_MASK64 = (1 << 64) - 1


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

    Shadows of large caches are sampled (spatial sampling, as in SHARDS: Waldspurger et al., FAST'15, and
    its miniature simulations, ATC'17): above ``sample`` chunks of capacity, each shadow holds
    ``capacity * rate`` keys and replays only the keys whose hash falls in the sampled ``rate = sample /
    capacity`` of the hash space, each chain reduced to its sampled keys (in order, so the prefix rules
    still hold among them). A uniform sample of keys sees the same reuse distances scaled by ``rate``, so
    its hit counts estimate the full shadow's in proportion, the same proportion for every expert, and the
    experts are compared as before. What it saves: per chunk use, the shadows' work and memory shrink by
    ``rate``, so a million-chunk cache pays for its shadows what a 64k-chunk one does (they are part of
    this policy's 1.7 KB of bookkeeping per chunk, docs/policies.md). What it costs: after a change of
    leader only the sampled chunks are known stale; the others leave in the new leader's own order. At
    or below ``sample`` chunks (every capacity the trace replays measure) nothing is sampled.

    Costs: each call is forwarded to every real expert, and each chain use is replayed once per shadow:
    O(experts) per call, O(1) amortized like the experts. Memory: per expert, its metadata for the real
    contents and a shadow of ``min(capacity, sample)`` keys with its own ghosts and history.

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
        sample: int = SHADOW_SAMPLE,
    ) -> None:
        capacity = max(1, capacity)
        if sample < 1:
            raise ConfigError(f"sample must be a positive number of keys per shadow cache, got {sample}")
        rate = min(1.0, sample / capacity)
        shadow_capacity = max(1, round(capacity * rate))
        self._experts = [factory(capacity) for factory in experts]
        self._shadows = [ShadowCache(factory(shadow_capacity), shadow_capacity) for factory in experts]
        self._sample_below = None if rate >= 1.0 else int(rate * (1 << 64))
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

    def _sampled(self, chain: list[Key]) -> list[Key]:
        """The keys of ``chain`` the shadows replay: all of them, or those in the sampled hash range."""
        below = self._sample_below
        if below is None:
            return chain
        return [key for key in chain if (key_hash(key) * _GOLDEN) & _MASK64 < below]

    def _learn(self, chain: list[Key]) -> None:
        """Replay a chain use in every shadow, update the stale sets and the scores, maybe change leader."""
        decay = math.exp(-len(chain) / self._decay_time)  # every use counts in time, sampled or not
        chain = self._sampled(chain)
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
