"""The prefix index driven directly, under every eviction policy, against a model of its invariants.

Which chunk a policy evicts is the policy's business; what every policy must leave true is checked
after every step: the cached set is prefix-closed, a leased chunk is never evicted, the cache never holds
more chunks than its pool, a store stops only when nothing is evictable, pins never go negative, and the
counters are exact. (The exact eviction order of ``"lru"`` is checked by ``test_chunk_cache_model``.)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachetest import CHUNK, cache_pool
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import CacheInvariantError, ConfigError
from lmcache.policies import POLICIES, EvictionPolicy, make_policy
from lmcache.policies.adaptive import AdaptivePolicy
from lmcache.prefix_index import PrefixIndex

SLOTS = 5
prompts = st.lists(st.integers(0, 3), min_size=1, max_size=5).map(
    lambda letters: [
        letter * 1000 + position * 10 + j for position, letter in enumerate(letters) for j in range(CHUNK)
    ]
)


class IndexModel(RuleBasedStateMachine):
    """One index over a small pool; the model knows each chunk's parent and what is leased."""

    policy: Any = "lru"  # a policy name, or a factory taking the capacity

    def __init__(self) -> None:
        super().__init__()
        self.pool = cache_pool("numpy", slots=SLOTS)
        built: EvictionPolicy = (
            make_policy(self.policy, SLOTS) if isinstance(self.policy, str) else self.policy(SLOTS)
        )
        self.index = PrefixIndex(self.pool, self.pool.layout, built)
        self.hasher = ChunkCache(cache_pool("numpy", slots=1))  # keys only
        self.parent: dict[bytes, bytes | None] = {}
        self.leases: list[tuple[list[Any], list[bytes]]] = []
        self.stored = self.cleared = 0

    def _keys(self, tokens: list[int]) -> list[bytes]:
        keys = self.hasher.keys(tokens)
        for position, key in enumerate(keys):
            self.parent[key] = keys[position - 1] if position else None
        return keys

    def _leased(self) -> set[bytes]:
        return {key for _, keys in self.leases for key in keys}

    @rule(tokens=prompts)
    def store(self, tokens: list[int]) -> None:
        keys = self._keys(tokens)
        before = set(self.index.keys())
        with self.index.reservation() as reservation:
            walked = reservation.extend(keys, [CHUNK] * len(keys))
            for obj in reservation.slots:
                obj.as_numpy()[...] = 1
            prefix, new = reservation.commit()
        self.stored += len(new)
        assert [entry.key for entry in prefix] == keys[: len(prefix)]
        if walked < len(keys):  # stopped: every cached chunk was pinned (the prefix or a lease)
            assert len(self.index) == SLOTS
        assert set(self.index.keys()) >= (before & self._leased())

    @rule(tokens=prompts)
    def retrieve(self, tokens: list[int]) -> None:
        keys = self._keys(tokens)
        chain = self.index.pin_prefix(self.index.cached_prefix(keys), len(tokens), lease=False)
        assert [entry.key for entry in chain] == keys[: len(chain)]
        self.index.unpin(chain)

    @rule(tokens=prompts)
    def lease(self, tokens: list[int]) -> None:
        keys = self._keys(tokens)
        chain = self.index.pin_prefix(self.index.cached_prefix(keys), len(tokens), lease=True)
        self.leases.append((chain, [entry.key for entry in chain]))

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        chain, _ = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        self.index.release_lease(chain)
        if chain and not any(chain[0] in held for held, _ in self.leases):
            with pytest.raises(CacheInvariantError):  # a second release of the same pins is refused
                self.index.release_lease(chain)

    @rule(tokens=prompts)
    def keys_that_do_not_chain_are_refused(self, tokens: list[int]) -> None:
        """A prompt's second key given as a first chunk is cached under another parent: refused."""
        keys = self._keys(tokens)
        before = (self.index.stats(), set(self.index.keys()))
        if len(keys) > 1 and keys[1] in self.index:
            with pytest.raises(ConfigError, match="chain"):
                self.index.pin_prefix(keys[1:], len(tokens) - CHUNK, lease=False)
            with pytest.raises(ConfigError, match="chain"), self.index.reservation() as reservation:
                reservation.extend(keys[1:2], [CHUNK])
        assert (self.index.stats(), set(self.index.keys())) == before

    @rule()
    def clear(self) -> None:
        leased = self._leased()
        expected = len(set(self.index.keys()) - leased)
        assert self.index.clear() == expected
        self.cleared += expected

    @invariant()
    def prefix_closed_and_bounded(self) -> None:
        cached = set(self.index.keys())
        assert len(cached) <= SLOTS
        for key in cached:
            parent = self.parent[key]
            assert parent is None or parent in cached
        assert self._leased() <= cached
        assert self.pool.stats().used == len(cached)

    @invariant()
    def counters_are_exact(self) -> None:
        stats = self.index.stats()
        leased = len(self._leased())
        assert (stats.chunks, stats.leased, stats.pinned) == (len(self.index), leased, leased)
        assert (stats.stored, stats.cleared) == (self.stored, self.cleared)
        assert stats.evicted == self.stored - self.cleared - stats.chunks

    def teardown(self) -> None:
        for chain, _ in self.leases:
            self.index.release_lease(chain)
        assert self.index.stats().pinned == 0
        self.pool.close()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_keeps_the_index_invariants(policy: str) -> None:
    machine = type(f"IndexModel_{policy}", (IndexModel,), {"policy": policy})
    machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    machine.TestCase().runTest()


def test_adaptive_with_sampled_shadows_keeps_the_index_invariants() -> None:
    # Shadows of 2 keys for a 5-slot cache: each chain use replays only its sampled keys.
    sampled = staticmethod(partial(AdaptivePolicy, sample=2))
    machine = type("IndexModel_adaptive_sampled", (IndexModel,), {"policy": sampled})
    machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    machine.TestCase().runTest()


def test_adaptive_samples_a_uniform_share_of_keys_above_its_sample_size() -> None:
    keys = [i.to_bytes(16, "little") for i in range(40_000)]  # sequential: the worst case for a bad mix
    assert AdaptivePolicy(1000, sample=1000)._sampled(keys) is keys  # at or below: every key, no copy
    share = len(AdaptivePolicy(64_000, sample=16_000)._sampled(keys)) / len(keys)
    assert 0.23 < share < 0.27
    ints = list(range(40_000))  # simulators key on ints, whose hash is the int itself
    assert 0.23 < len(AdaptivePolicy(64_000, sample=16_000)._sampled(ints)) / len(ints) < 0.27
    with pytest.raises(ConfigError, match="positive number of keys"):
        AdaptivePolicy(10, sample=0)


def test_a_policy_object_serves_one_index() -> None:
    pool = cache_pool("numpy", slots=2)
    policy = make_policy("arc", 2)
    first = PrefixIndex(pool, pool.layout, policy)
    with pytest.raises(ConfigError, match="already serves another cache"):
        PrefixIndex(pool, pool.layout, policy)
    assert len(first) == 0


def test_unknown_policies_and_non_policies_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        make_policy("mru", 4)
    with pytest.raises(ConfigError, match="has no"):
        make_policy(object(), 4)  # type: ignore[arg-type]


def test_eviction_recorder_forwards_and_records_in_order() -> None:
    from collections import deque

    from lmcache.policies.recorder import EvictionRecorder

    pool = cache_pool("numpy", slots=2)
    recorder = EvictionRecorder(make_policy("lru", 2))
    cache = ChunkCache(pool, policy=recorder)
    assert cache.policy is recorder
    assert recorder.name == recorder.policy.name == "lru"
    for first in (0, 1000, 2000):  # one chunk per prompt: the third store evicts the first
        cache.store(list(range(first, first + CHUNK)), np.zeros((2, 2, CHUNK, 2, 8), np.float16))
    evicted = recorder.drain()
    assert evicted == cache.keys(list(range(CHUNK)))  # the least recently used, once
    assert recorder.drain() == []
    sink: deque[bytes] = deque()
    sinking = EvictionRecorder(make_policy("lru", 2), sink.append)
    other = ChunkCache(cache_pool("numpy", slots=2), policy=sinking)
    for first in (0, 1000, 2000):
        other.store(list(range(first, first + CHUNK)), np.zeros((2, 2, CHUNK, 2, 8), np.float16))
    assert list(sink) == other.keys(list(range(CHUNK)))
    assert sinking.drain() == []
