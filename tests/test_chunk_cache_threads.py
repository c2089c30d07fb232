"""The chunk cache under threads: no torn or foreign chunk is ever returned, and the stats stay exact."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import numpy as np
import pytest

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import to_host, to_native
from lmcache.cache_copies import ChunkCopies
from lmcache.chunk_cache import ChunkCache

THREADS = 4
SECONDS = 1.0


def _prompts() -> list[list[int]]:
    """Prompts sharing prefixes (a small tree), with partial tails, up to 5 chunks long."""
    rng = random.Random(7)
    prompts = []
    for _ in range(12):
        letters = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
        tail = rng.randrange(CHUNK)
        tokens = [letter * 1000 + j for letter in letters for j in range(CHUNK)]
        prompts.append(tokens + [9000 + j for j in range(tail)])
    return prompts


def test_threads_never_see_a_torn_or_foreign_chunk(backend: str) -> None:
    cache = ChunkCache(cache_pool(backend, slots=8))
    prompts = _prompts()
    natives = [to_native(prefix_kv(p), backend) for p in prompts]
    expected = [prefix_kv(p) for p in prompts]
    errors: list[str] = []
    totals = {"hit": 0, "query": 0, "ops": 0}
    totals_lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        hit = query = ops = 0
        try:
            while time.monotonic() < deadline:
                index = rng.randrange(len(prompts))
                tokens, want = prompts[index], expected[index]
                action = rng.random()
                if action < 0.35:
                    cache.store(tokens, natives[index])
                elif action < 0.65:
                    out, n = cache.retrieve(tokens, framework="numpy")
                    hit, query = hit + n, query + len(tokens)
                    if n and to_host(out).tobytes() != want[:, :, :n].tobytes():
                        errors.append(f"retrieve of prompt {index} returned wrong bytes ({n} tokens)")
                elif action < 0.85:
                    with cache.lease(tokens) as lease:
                        hit, query = hit + lease.num_tokens, query + len(tokens)
                        if lease.chunks:
                            got = np.concatenate([obj.as_numpy() for obj in lease.chunks], axis=2)
                            if got.tobytes() != want[:, :, : lease.num_tokens].tobytes():
                                errors.append(f"lease of prompt {index} holds wrong bytes")
                elif action < 0.98:
                    hit, query = hit + cache.lookup(tokens), query + len(tokens)
                else:
                    cache.clear()
                ops += 1
        except Exception as exc:  # noqa: BLE001 - collected and reported by the main thread
            errors.append(f"{type(exc).__name__}: {exc}")
        with totals_lock:
            totals["hit"] += hit
            totals["query"] += query
            totals["ops"] += ops

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:5]
    stats = cache.stats()
    assert totals["ops"] > 200
    assert stats.evicted > 0, "the pool is small: the stress must evict"
    assert (stats.pinned, stats.leased) == (0, 0)
    assert (stats.hit_tokens, stats.query_tokens) == (totals["hit"], totals["query"])
    assert stats.chunks == stats.stored - stats.evicted - stats.cleared == cache.pool.stats().used
    for tokens, want in zip(prompts, expected, strict=True):  # what is cached now is intact and reachable
        out, n = cache.retrieve(tokens)
        if n:
            assert to_host(out).tobytes() == want[:, :, :n].tobytes()


def test_a_chunk_is_invisible_until_its_bytes_are_all_in(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ChunkCache(cache_pool(slots=4))
    tokens = list(range(3 * CHUNK))
    seen: list[tuple[int, Any]] = []
    original = ChunkCopies.copy_in

    def observed_copy(copies: ChunkCopies, obj: Any, piece: Any) -> None:
        half = piece.shape[0] // 2
        obj.as_numpy()[:half] = piece[:half]  # half written: nobody may see this chunk yet
        seen.append((cache.lookup(tokens), cache.retrieve(tokens)[1]))
        original(copies, obj, piece)

    monkeypatch.setattr(ChunkCopies, "copy_in", observed_copy)
    assert cache.store(tokens, prefix_kv(tokens)) == 3 * CHUNK
    assert seen == [(0, 0), (CHUNK, CHUNK), (2 * CHUNK, 2 * CHUNK)]


def test_concurrent_stores_of_one_prompt_copy_each_chunk_once_into_one_slot() -> None:
    cache = ChunkCache(cache_pool(slots=8))
    tokens = list(range(4 * CHUNK))
    kv = prefix_kv(tokens)
    barrier = threading.Barrier(THREADS)
    results: list[int] = []

    def worker() -> None:
        barrier.wait()
        results.append(cache.store(tokens, kv))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [4 * CHUNK] * THREADS
    stats = cache.stats()
    assert (stats.chunks, stats.stored, stats.pinned) == (4, 4, 0)
    assert cache.pool.stats().used == 4, "a losing writer must give its slot back"
    out, n = cache.retrieve(tokens)
    assert n == 4 * CHUNK
    assert out.tobytes() == kv.tobytes()
