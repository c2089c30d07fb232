"""The chunk cache against a plain model (a dict of cached prefixes and a recency list), step by step.

After every step: the bytes returned are the bytes stored, the cached set is prefix-closed and exactly the
model's (so every eviction picked the model's victim: LRU among unpinned leaves), leased chunks hold their
bytes, and the stats are exact. Everything is observed through public calls (``cache.index`` for the
cached set).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import run_state_machine, to_host, to_native
from lmcache.chunk_cache import ChunkCache

SLOTS = 6
Prefix = tuple[int, ...]

prompts = st.builds(
    lambda letters, tail_letter, tail: [
        *(letter * 1000 + j for letter in letters for j in range(CHUNK)),
        *(tail_letter * 1000 + 500 + j for j in range(tail)),
    ],
    st.lists(st.integers(0, 2), min_size=0, max_size=4),
    st.integers(0, 2),
    st.integers(0, CHUNK - 1),
).filter(bool)


class CacheModel(RuleBasedStateMachine):
    """Drives one cache; the model is ``cached`` (prefix -> parent prefix) plus ``recency``."""

    backend = "numpy"

    def __init__(self) -> None:
        super().__init__()
        self.pool = cache_pool(self.backend, slots=SLOTS)
        self.cache = ChunkCache(self.pool, namespace="model", policy="lru")
        self.cached: dict[Prefix, Prefix | None] = {}  # chunk (its whole prefix) -> parent chunk
        self.recency: list[Prefix] = []  # least recently used first
        self.impl_key: dict[Prefix, bytes] = {}
        self.leases: list[tuple[Any, list[Prefix], list[int]]] = []
        self.user_held: list[Any] = []
        self.stored_prompts: list[list[int]] = []
        self.stored = self.evicted = self.cleared = self.hit = self.query = 0

    # -- the model ---------------------------------------------------------------------------------------
    def _chunks(self, tokens: list[int]) -> list[Prefix]:
        return [tuple(tokens[: start + CHUNK]) for start in range(0, len(tokens), CHUNK)]

    def _cached_prefix(self, tokens: list[int]) -> list[Prefix]:
        chain = []
        for chunk in self._chunks(tokens):
            if chunk not in self.cached:
                break
            chain.append(chunk)
        return chain

    def _leased(self) -> set[Prefix]:
        return {chunk for _, chain, _ in self.leases for chunk in chain}

    def _refresh(self, chain: list[Prefix]) -> None:
        for chunk in reversed(chain):
            self.recency.remove(chunk)
            self.recency.append(chunk)

    def _drop(self, chunk: Prefix) -> None:
        del self.cached[chunk]
        self.recency.remove(chunk)

    def _victim(self, pinned: set[Prefix]) -> Prefix | None:
        parents = set(self.cached.values())
        for chunk in self.recency:
            if chunk not in pinned and chunk not in parents:
                return chunk
        return None

    def _query(self, tokens: list[int]) -> list[Prefix]:
        chain = self._cached_prefix(tokens)
        self.hit += len(chain[-1]) if chain else 0
        self.query += len(tokens)
        return chain

    def _kv(self, tokens: list[int]) -> Any:
        return to_native(prefix_kv(tokens), self.backend)

    # -- rules -------------------------------------------------------------------------------------------
    @rule(tokens=prompts)
    def store(self, tokens: list[int]) -> None:
        keys = self.cache.keys(tokens)
        chain: list[Prefix] = []
        for chunk, key in zip(self._chunks(tokens), keys, strict=True):
            if chunk not in self.cached:
                if SLOTS - len(self.cached) - len(self.user_held) == 0:
                    victim = self._victim(self._leased() | set(chain))
                    if victim is None:
                        break
                    self._drop(victim)
                    self.evicted += 1
                self.cached[chunk] = chain[-1] if chain else None
                self.recency.append(chunk)
                self.impl_key[chunk] = key
                self.stored += 1
            chain.append(chunk)
        self._refresh(chain)
        expected = len(chain[-1]) if chain else 0
        assert self.cache.store(tokens, self._kv(tokens)) == expected
        self.stored_prompts.append(tokens)

    @rule(tokens=prompts, into_out=st.booleans())
    def retrieve(self, tokens: list[int], into_out: bool) -> None:
        chain = self._query(tokens)
        self._refresh(chain)
        n = len(chain[-1]) if chain else 0
        out = None
        if into_out:
            out = np.full((2, 2, len(tokens) + 3, 2, 8), -1, dtype=np.float16)
        got, count = self.cache.retrieve(tokens, out=out)
        assert count == n
        if n == 0:
            assert got is None
            if out is not None:
                assert (out == -1).all()
            return
        host = to_host(got)
        assert host[:, :, :n].tobytes() == prefix_kv(tokens[:n]).tobytes()
        if out is not None:
            assert (out[:, :, n:] == -1).all()

    @rule(tokens=prompts)
    def lookup(self, tokens: list[int]) -> None:
        chain = self._query(tokens)
        assert self.cache.lookup(tokens) == (len(chain[-1]) if chain else 0)

    @rule(tokens=prompts)
    def lease(self, tokens: list[int]) -> None:
        chain = self._query(tokens)
        lease = self.cache.lease(tokens)
        assert lease.num_tokens == (len(chain[-1]) if chain else 0)
        assert len(lease.chunks) == len(chain)
        self.leases.append((lease, chain, tokens))

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), twice=st.booleans())
    def release(self, data: st.DataObject, twice: bool) -> None:
        index = data.draw(st.integers(0, len(self.leases) - 1))
        lease, chain, _ = self.leases.pop(index)
        lease.release()
        if twice:
            lease.release()  # idempotent
        self._refresh(chain)

    @rule()
    def clear(self) -> None:
        leased = self._leased()
        dropped = [chunk for chunk in self.cached if chunk not in leased]
        for chunk in dropped:
            self._drop(chunk)
        self.cleared += len(dropped)
        assert self.cache.clear() == len(dropped)

    @precondition(lambda self: bool(self.impl_key))
    @rule(data=st.data())
    def discard_keys(self, data: st.DataObject) -> None:
        chunks = data.draw(st.lists(st.sampled_from(sorted(self.impl_key)), max_size=6))
        leased = self._leased()
        dropped = []
        for chunk in chunks:  # in order: a parent named after its last child goes too
            if chunk in self.cached and chunk not in leased and chunk not in set(self.cached.values()):
                self._drop(chunk)
                dropped.append(chunk)
        self.cleared += len(dropped)
        got = self.cache.discard_keys([self.impl_key[chunk] for chunk in chunks])
        assert got == [self.impl_key[chunk] for chunk in dropped]

    @rule()
    def user_allocates(self) -> None:
        obj = self.pool.allocate(np.zeros((2, 2, CHUNK, 2, 8), np.float16))
        if obj is None:
            assert len(self.cached) + len(self.user_held) == SLOTS
            return
        self.user_held.append(obj)

    @precondition(lambda self: bool(self.user_held))
    @rule()
    def user_frees(self) -> None:
        self.pool.free(self.user_held.pop())

    # -- invariants --------------------------------------------------------------------------------------
    @invariant()
    def stats_are_exact(self) -> None:
        stats = self.cache.stats()
        leased = len(self._leased())
        assert stats.chunks == len(self.cached)
        assert (stats.leased, stats.pinned) == (leased, leased)
        assert (stats.stored, stats.evicted, stats.cleared) == (self.stored, self.evicted, self.cleared)
        assert (stats.hit_tokens, stats.query_tokens) == (self.hit, self.query)
        assert self.pool.stats().used == len(self.cached) + len(self.user_held)

    @invariant()
    def cached_set_is_prefix_closed_and_reachable(self) -> None:
        assert all(parent is None or parent in self.cached for parent in self.cached.values())
        reachable: set[bytes] = set()
        for tokens in self.stored_prompts:
            n = self.cache.lookup(tokens)
            chain = self._query(tokens)
            assert n == (len(chain[-1]) if chain else 0)
            reachable.update(self.cache.keys(tokens)[: len(chain)])
        assert len(reachable) == self.cache.stats().chunks == len(self.cached)

    @invariant()
    def cached_chunks_are_the_models(self) -> None:
        """The exact set after every step: one wrong victim (eviction out of the model's LRU order)
        shows here, through the index's public view."""
        assert set(self.cache.cached_keys()) == {self.impl_key[chunk] for chunk in self.cached}
        assert all(self.impl_key[chunk] in self.cache for chunk in self.cached)

    @invariant()
    def leased_chunks_hold_their_bytes(self) -> None:
        for lease, chain, tokens in self.leases:
            assert all(obj.is_live for obj in lease.chunks)
            if chain:
                got = np.concatenate([obj.as_numpy() for obj in lease.chunks], axis=2)
                assert got.tobytes() == prefix_kv(tokens[: len(chain[-1])]).tobytes()

    def teardown(self) -> None:
        for lease, _, _ in self.leases:
            lease.release()
        self.pool.close()


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_cache_matches_model(backend_name: str) -> None:
    run_state_machine(CacheModel, backend_name, max_examples=120 if backend_name == "numpy" else 25)
