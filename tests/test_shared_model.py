"""A shared cache's client against an in-process ChunkCache given the same calls, step by step.

The model is a plain ``ChunkCache`` over a pool of the same size: the server runs the same cache code,
so after every step the cached set (``server.cache.cached_keys()``), the stats and the pool's use must be the
model's exactly, every answer the same, every byte the one derived from the tokens. Steps include
leases held across steps, stores begun and aborted or partly committed, and reconnecting clients
(whose leases the server must release).
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import run_state_machine, to_host, to_native, wait_until
from lmcache.chunk_cache import ChunkCache
from lmcache.shared import CacheServer, connect
from sharedtest import metadata

SLOTS = 6
STATS = ("chunks", "leased", "pinned", "stored", "evicted", "cleared", "hit_tokens", "query_tokens")

prompts = st.builds(
    lambda letters, tail_letter, tail: [
        *(letter * 1000 + j for letter in letters for j in range(CHUNK)),
        *(tail_letter * 1000 + 500 + j for j in range(tail)),
    ],
    st.lists(st.integers(0, 2), min_size=0, max_size=4),
    st.integers(0, 2),
    st.integers(0, CHUNK - 1),
)


class SharedAgainstLocal(RuleBasedStateMachine):
    """One server, one client at a time, and the in-process model."""

    backend = "numpy"

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory(prefix="lmc-")
        # LRU on both sides: its choices follow from the uses alone, which the two see alike (the adaptive
        # default also learns from how uses are grouped into calls, which differ between the two paths)
        self.server = CacheServer(f"{self.directory.name}/s.sock", metadata(SLOTS), policy="lru").start()
        self.client = connect(self.server.socket_path, backend=self.backend, namespace="model")
        self.model = ChunkCache(cache_pool("numpy", slots=SLOTS), namespace="model", policy="lru")
        self.leases: list[tuple[Any, Any, list[int]]] = []  # (shared lease, model lease, tokens)

    def _kv(self, tokens: list[int]) -> Any:
        return to_native(prefix_kv(tokens), self.backend)

    @rule(tokens=prompts)
    def store(self, tokens: list[int]) -> None:
        assert self.client.store(tokens, self._kv(tokens)) == self.model.store(tokens, prefix_kv(tokens))

    @rule(tokens=prompts, into_out=st.booleans())
    def retrieve(self, tokens: list[int], into_out: bool) -> None:
        out = np.full((2, 2, len(tokens) + 2, 2, 8), -1, dtype=np.float16) if into_out else None
        got, n = self.client.retrieve(tokens, out=out)
        want, m = self.model.retrieve(tokens)
        assert n == m
        if n == 0:
            assert got is None
            assert out is None or (out == -1).all()
            return
        assert to_host(got)[:, :, :n].tobytes() == want.tobytes() == prefix_kv(tokens[:n]).tobytes()
        if out is not None:
            assert (out[:, :, n:] == -1).all()

    @rule(tokens=prompts)
    def lookup(self, tokens: list[int]) -> None:
        assert self.client.lookup(tokens) == self.model.lookup(tokens)

    @rule(tokens=prompts)
    def lease(self, tokens: list[int]) -> None:
        shared, local = self.client.lease(tokens), self.model.lease(tokens)
        assert (shared.num_tokens, len(shared.chunks)) == (local.num_tokens, len(local.chunks))
        self.leases.append((shared, local, tokens))

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        shared, local, _ = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        shared.release()
        local.release()

    @rule(tokens=prompts, keep=st.integers(0, 5), abort=st.booleans())
    def store_by_keys(self, tokens: list[int], keep: int, abort: bool) -> None:
        """A store driven by hand: slots filled, then aborted or partly committed (on both sides)."""
        kv = prefix_kv(tokens)
        pending = self.client.begin_store(self.client.keys(tokens), len(tokens))
        local = self.model.begin_store(self.model.keys(tokens), len(tokens))
        assert (pending.cached, len(pending.slots)) == (local.cached, len(local.slots))
        for index, (slot, twin) in enumerate(zip(pending.slots, local.slots, strict=True)):
            start = (pending.cached + index) * CHUNK
            slot.copy_from(kv[:, :, start : start + slot.num_tokens])
            twin.copy_from(kv[:, :, start : start + twin.num_tokens])
        if abort:
            pending.abort()
            local.abort()
        else:
            prefix = local.commit(keep)
            assert pending.commit(keep) == sum(entry.num_tokens for entry in prefix)

    @rule()
    def clear(self) -> None:
        assert self.client.clear() == self.model.clear()

    @rule()
    def reconnect(self) -> None:
        """A client that goes away: the server releases its leases (as the model's are released)."""
        self.client.close()
        for shared, local, _ in self.leases:
            assert shared.released or not shared.chunks  # an empty lease holds nothing
            local.release()
        self.leases = []
        assert wait_until(lambda: self.server.clients == 0)  # the server saw the connection end
        self.client = connect(self.server.socket_path, backend=self.backend, namespace="model")

    @invariant()
    def same_state_as_the_model(self) -> None:
        stats = self.client.stats()  # a round trip: every earlier message was served
        want = self.model.stats()
        assert {k: getattr(stats, k) for k in STATS} == {k: getattr(want, k) for k in STATS}
        assert set(self.server.cache.cached_keys()) == set(self.model.cached_keys())
        assert self.server.cache.pool.stats().used == self.model.pool.stats().used

    @invariant()
    def leased_chunks_hold_their_bytes(self) -> None:
        for shared, _, tokens in self.leases:
            if shared.num_tokens:
                got = np.concatenate([to_host(obj.data) for obj in shared.chunks], axis=2)
                assert got.tobytes() == prefix_kv(tokens[: shared.num_tokens]).tobytes()

    def teardown(self) -> None:
        self.client.close()
        self.server.stop()
        self.model.pool.close()
        self.directory.cleanup()


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_shared_cache_matches_in_process_model(backend_name: str) -> None:
    run_state_machine(SharedAgainstLocal, backend_name, max_examples=100 if backend_name == "numpy" else 20)
