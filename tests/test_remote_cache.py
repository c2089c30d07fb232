"""ChunkCache with a remote tier (``remote=``) against a real redis-server on 127.0.0.1.

Write-through from ``store``, read-through in ``lookup`` / ``retrieve`` / ``lease``, pinning of pending
writes, faults (down, killed, restarted, corrupted values) that never raise, and two processes that share
chunks through the server.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import require, same_bits, to_native, wait_until
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import ConfigError
from lmcache.remote import HEADER
from redis_server import HOST, RedisServer, free_port, require_redis, run_peer, tier_for

PROMPT = [5 * i + 1 for i in range(3 * CHUNK + 7)]  # 3 full chunks and a partial one
CHUNKS = 4


def test_write_through_then_read_through_into_an_empty_cache(redis_server: RedisServer, backend: str) -> None:
    kv = prefix_kv(PROMPT, "bfloat16")
    with tier_for(redis_server.url) as tier:
        writer = ChunkCache(cache_pool(backend, "bfloat16"), namespace="m", remote=tier)
        reader = ChunkCache(cache_pool(backend, "bfloat16"), namespace="m", remote=tier)
        assert writer.store(PROMPT, to_native(kv, backend)) == len(PROMPT)
        assert writer.flush(5.0)
        assert writer.stats().remote_writes == CHUNKS
        assert writer.stats().pinned == 0  # sent: unpinned
        keys = [tier.key("m", key) for key in writer.keys(PROMPT)]
        assert redis_server.client().exists(*keys) == CHUNKS

        assert reader.lookup(PROMPT) == len(PROMPT)  # probed: one round trip, nothing copied
        assert len(reader) == 0
        out, n = reader.retrieve(PROMPT)
        assert n == len(PROMPT)
        assert same_bits(out, kv)
        stats = reader.stats()
        assert (stats.chunks, stats.remote_hits, stats.remote_corrupt, stats.remote_errors) == (
            CHUNKS,
            CHUNKS,
            0,
            0,
        )
        assert stats.stored == CHUNKS
        out, n = reader.retrieve(PROMPT)  # now local: the server is not asked again
        assert n == len(PROMPT)
        assert reader.stats().remote_hits == CHUNKS
        # chunks fetched from the server are not written back to it
        assert reader.flush(5.0)
        assert reader.stats().remote_writes == CHUNKS


def test_lease_reads_through_and_leases_the_fetched_chunks(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as tier:
        ChunkCache(cache_pool(), remote=tier).store(PROMPT, kv)
        assert tier.flush(5.0)
        reader = ChunkCache(cache_pool(), remote=tier)
        with reader.lease(PROMPT[: 2 * CHUNK + 3]) as lease:
            assert lease.num_tokens == 2 * CHUNK
            assert same_bits(
                np.concatenate([c.as_numpy() for c in lease.chunks], axis=2), kv[:, :, : 2 * CHUNK]
            )
            assert reader.stats().leased == 2
        assert reader.stats().leased == 0


def test_partial_remote_prefix_and_shorter_out(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as tier:
        writer = ChunkCache(cache_pool(), remote=tier)
        writer.store(PROMPT[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
        assert writer.flush(5.0)
        reader = ChunkCache(cache_pool(), remote=tier)
        reader.store(PROMPT[:CHUNK], kv[:, :, :CHUNK])  # local chunk 0; remote has 0 and 1
        assert reader.lookup(PROMPT) == 2 * CHUNK
        out = np.zeros((*kv.shape[:2], CHUNK + 5, *kv.shape[3:]), kv.dtype)
        assert reader.retrieve(PROMPT, out=out)[1] == CHUNK  # chunk 1 would not fit: not fetched
        assert len(reader) == 1
        result, n = reader.retrieve(PROMPT)
        assert n == 2 * CHUNK
        assert same_bits(result, kv[:, :, : 2 * CHUNK])


def test_read_through_fills_a_small_pool_and_stops(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as tier:
        ChunkCache(cache_pool(), remote=tier).store(PROMPT, kv)
        assert tier.flush(5.0)
        reader = ChunkCache(cache_pool(slots=2), remote=tier)
        out, n = reader.retrieve(PROMPT)
        assert n == 2 * CHUNK  # the chain being extended is never evicted: two slots, two chunks
        assert same_bits(out, kv[:, :, :n])


def test_pending_writes_pin_their_prefix_until_sent_or_dropped(redis_server: RedisServer) -> None:
    """While writes are pending (a paused server holds them for the 3 s socket timeout) their chunks and
    prefixes are pinned: never cleared or evicted. Once the send fails they are dropped and unpinned
    at once, not kept through the backoff."""
    kv = prefix_kv(PROMPT)
    tier = tier_for(redis_server.url, socket_timeout=3.0, backoff_initial=30.0, backoff_max=30.0)
    cache = ChunkCache(cache_pool(slots=CHUNKS + 1), remote=tier)
    redis_server.pause()
    try:
        cache.store([9999], prefix_kv([9999]))
        assert cache.store(PROMPT, kv) == len(PROMPT)
        stats = cache.stats()
        assert (stats.pinned, stats.leased, stats.remote_dropped) == (CHUNKS + 1, 0, 0)
        assert cache.clear() == 0  # pending chunks are not dropped
        other = [7777 + i for i in range(2 * CHUNK)]
        assert cache.store(other, prefix_kv(other)) == 0  # no free slot; nothing evictable
        out, n = cache.retrieve(PROMPT)
        assert n == len(PROMPT)
        assert same_bits(out, kv)
        assert wait_until(lambda: cache.stats().pinned == 0)  # the send failed: all dropped, unpinned
        assert cache.stats().remote_dropped == 1 + CHUNKS
        assert cache.store(other, prefix_kv(other)) == len(other)  # evicts; the tier backs off: dropped
        assert cache.stats().pinned == 0
    finally:
        redis_server.resume()
        tier.close(timeout=0.1)
    assert cache.stats().pinned == 0


def test_server_down_never_raises_and_the_cache_runs_locally() -> None:
    url = f"redis://{HOST}:{free_port()}/0"
    require_redis()
    kv = prefix_kv(PROMPT)
    cache = ChunkCache(cache_pool(), remote=url)
    start = time.monotonic()
    assert cache.lookup(PROMPT) == 0
    assert cache.store(PROMPT, kv) == len(PROMPT)
    assert cache.lookup(PROMPT) == len(PROMPT)
    out, n = cache.retrieve(PROMPT)
    assert n == len(PROMPT)
    assert same_bits(out, kv)
    with cache.lease(PROMPT) as lease:
        assert lease.num_tokens == len(PROMPT)
    assert cache.flush(5.0)
    cache.close()
    assert time.monotonic() - start < 5
    stats = cache.stats()
    assert stats.remote_errors >= 1
    assert stats.remote_writes == 0
    assert stats.remote_dropped == CHUNKS


def test_kill_and_restart_mid_run(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    other = [3 * i + 2 for i in range(2 * CHUNK)]
    with tier_for(redis_server.url) as tier:
        writer = ChunkCache(cache_pool(slots=16), remote=tier)
        reader = ChunkCache(cache_pool(slots=16), remote=tier)
        writer.store(PROMPT, kv)
        assert writer.flush(5.0)
        redis_server.kill()
        assert writer.store(other, prefix_kv(other)) == len(other)  # locally fine
        assert writer.flush(5.0)
        assert reader.lookup(PROMPT) == 0  # nothing wrong is returned: a miss
        assert reader.retrieve(PROMPT) == (None, 0)
        with reader.lease(PROMPT) as lease:
            assert lease.num_tokens == 0
        assert writer.stats().remote_errors >= 1
        redis_server.start()  # empty (persistence off)

        def lands() -> bool:
            fresh = [int(time.monotonic_ns() % 10**9), 1, 2]
            writer.store(fresh, prefix_kv(fresh))
            writer.flush(5.0)
            return reader.lookup(fresh) == len(fresh)

        start = time.monotonic()
        assert wait_until(lands)
        assert time.monotonic() - start < 5
        writer.clear()
        assert writer.store(PROMPT, kv) == len(PROMPT)
        assert writer.flush(5.0)
        out, n = reader.retrieve(PROMPT)
        assert n == len(PROMPT)
        assert same_bits(out, kv)


def test_corrupted_remote_chunk_is_a_counted_miss(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as tier:
        writer = ChunkCache(cache_pool(), remote=tier)
        writer.store(PROMPT, kv)
        assert writer.flush(5.0)
        second = tier.key("", writer.keys(PROMPT)[1])
        raw = redis_server.client()
        raw.setrange(second, HEADER.size + 10, b"\x55")
        reader = ChunkCache(cache_pool(), remote=tier)
        out, n = reader.retrieve(PROMPT)
        assert n == CHUNK  # chunk 0 only: chunk 1 is rejected, and the prefix stops there
        assert same_bits(out, kv[:, :, :CHUNK])
        assert reader.stats().remote_corrupt == 1
        assert len(reader) == 1


def test_remote_argument_is_checked() -> None:
    with pytest.raises(ConfigError, match="remote must be"):
        ChunkCache(cache_pool(), remote=42)  # type: ignore[arg-type]
    require_redis()
    with pytest.raises(ConfigError, match="redis://"):
        ChunkCache(cache_pool(), remote="http://127.0.0.1:1/0")
    plain = ChunkCache(cache_pool())
    assert plain.flush() is True
    plain.close()
    assert plain.stats().remote_writes == 0


@pytest.mark.parametrize(("writer", "reader"), [("torch", "jax"), ("numpy", "torch")])
def test_two_processes_share_a_prompt_through_caches(
    redis_server: RedisServer, writer: str, reader: str
) -> None:
    require(writer)
    require(reader)
    run_peer("cache", "write", writer, redis_server.url, "bfloat16")
    reply = run_peer("cache", "read", reader, redis_server.url, "bfloat16")
    assert reply.strip() == "ok 39"  # every token of the peer's 39-token prompt, bit-exact


def test_read_through_in_many_batches(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as tier, tier_for(redis_server.url, batch_bytes=1) as small:
        ChunkCache(cache_pool(), remote=tier).store(PROMPT, kv)
        assert tier.flush(5.0)
        reader = ChunkCache(cache_pool(), remote=small)  # one chunk per round trip
        out, n = reader.retrieve(PROMPT)
        assert n == len(PROMPT)
        assert same_bits(out, kv)
        assert small.stats().hits == CHUNKS


# -- two caches, one server: a model ------------------------------------------------------------------
prompts = st.builds(
    lambda letters, tail: [
        *(letter * 1000 + j for letter in letters for j in range(CHUNK)),
        *(9000 + j for j in range(tail)),
    ],
    st.lists(st.integers(0, 2), min_size=0, max_size=4),
    st.integers(0, CHUNK - 1),
).filter(bool)


class SharedServerModel(RuleBasedStateMachine):
    """Two caches (small pools) share one server. Every chunk stored by either is written through, so
    after a flush either cache finds, locally or remotely, exactly the prefixes ever stored, with the
    bytes that were stored, whatever each has evicted or cleared locally."""

    server: RedisServer

    def __init__(self) -> None:
        super().__init__()
        self.server.client().flushall()
        self.tier = tier_for(self.server.url)
        self.caches = [
            ChunkCache(cache_pool(slots=6), namespace="shared", remote=self.tier) for _ in range(2)
        ]
        self.stored: set[tuple[int, ...]] = set()  # every chunk prefix ever stored

    def expected(self, tokens: list[int]) -> int:
        hit = 0
        for end in range(CHUNK, len(tokens) + CHUNK, CHUNK):
            end = min(end, len(tokens))
            if tuple(tokens[:end]) not in self.stored:
                break
            hit = end
        return hit

    @rule(which=st.integers(0, 1), tokens=prompts)
    def store(self, which: int, tokens: list[int]) -> None:
        assert self.caches[which].store(tokens, prefix_kv(tokens)) == len(tokens)
        assert self.caches[which].flush(5.0)
        self.stored.update(
            tuple(tokens[: min(end, len(tokens))]) for end in range(CHUNK, len(tokens) + CHUNK, CHUNK)
        )

    @rule(which=st.integers(0, 1), tokens=prompts)
    def lookup(self, which: int, tokens: list[int]) -> None:
        assert self.caches[which].lookup(tokens) == self.expected(tokens)

    @rule(which=st.integers(0, 1), tokens=prompts)
    def retrieve(self, which: int, tokens: list[int]) -> None:
        out, n = self.caches[which].retrieve(tokens)
        assert n == self.expected(tokens)
        if n:
            assert same_bits(out, prefix_kv(tokens[:n]))

    @rule(which=st.integers(0, 1), tokens=prompts)
    def lease(self, which: int, tokens: list[int]) -> None:
        with self.caches[which].lease(tokens) as lease:
            assert lease.num_tokens == self.expected(tokens)
            if lease.chunks:
                data = np.concatenate([chunk.as_numpy() for chunk in lease.chunks], axis=2)
                assert same_bits(data, prefix_kv(tokens[: lease.num_tokens]))

    @rule(which=st.integers(0, 1))
    def clear(self, which: int) -> None:
        self.caches[which].clear()

    @invariant()
    def nothing_rejected_or_failed(self) -> None:
        stats = self.tier.stats()
        assert (stats.errors, stats.dropped, stats.corrupt, stats.pending) == (0, 0, 0, 0)
        assert all(cache.stats().pinned == 0 for cache in self.caches)

    def teardown(self) -> None:
        self.tier.close()


def test_two_caches_share_one_server(redis_server: RedisServer) -> None:
    SharedServerModel.server = redis_server
    run_state_machine_as_test(
        SharedServerModel, settings=settings(max_examples=25, stateful_step_count=15, deadline=None)
    )


def test_slow_server_answers_from_local_memory(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url, socket_timeout=0.3) as tier:
        cache = ChunkCache(cache_pool(), remote=tier)
        cache.store(PROMPT[:CHUNK], kv[:, :, :CHUNK])
        assert cache.flush(5.0)
        redis_server.pause()  # connections stay open; nothing is answered
        try:
            start = time.monotonic()
            assert cache.lookup(PROMPT) == CHUNK
            out, n = cache.retrieve(PROMPT)
            assert n == CHUNK
            assert same_bits(out, kv[:, :, :CHUNK])
            assert cache.store(PROMPT, kv) == len(PROMPT)
            tier.close(timeout=0.2)
            assert time.monotonic() - start < 3  # each remote wait is bounded by socket_timeout
        finally:
            redis_server.resume()
        assert cache.stats().remote_errors >= 1


def test_close_closes_only_a_tier_the_cache_made(redis_server: RedisServer) -> None:
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as tier:
        shared = ChunkCache(cache_pool(), remote=tier)
        shared.close()  # the tier is the caller's: still open
        assert shared.store(PROMPT, kv) == len(PROMPT)
        assert shared.flush(5.0)
        assert tier.stats().writes == CHUNKS
    owner = ChunkCache(cache_pool(), remote=redis_server.url)
    assert owner.remote is not None
    owner.close()
    other = [4 * i for i in range(CHUNK)]
    assert owner.store(other, prefix_kv(other)) == CHUNK  # local still works; the write is dropped
    assert owner.stats().remote_dropped == 1
    assert owner.stats().pinned == 0


def test_threads_share_a_server_without_wrong_bytes(redis_server: RedisServer) -> None:
    prompts = [[1000 * t + i for i in range(2 * CHUNK + t)] for t in range(4)]
    errors: list[BaseException] = []
    with tier_for(redis_server.url) as tier:
        writer = ChunkCache(cache_pool(slots=16), remote=tier)
        reader = ChunkCache(cache_pool(slots=6), remote=tier)  # small: read-through evicts as it goes

        def work(tokens: list[int]) -> None:
            try:
                kv = prefix_kv(tokens)
                for _ in range(5):
                    writer.store(tokens, kv)
                    writer.flush(5.0)
                    out, n = reader.retrieve(tokens)
                    if n and not same_bits(out, kv[:, :, :n]):
                        raise AssertionError(f"wrong bytes for {n} tokens")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by the assert
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        for tokens in prompts:
            out, n = reader.retrieve(tokens)
            assert n == len(tokens)
            assert same_bits(out, prefix_kv(tokens))
        assert (tier.stats().corrupt, tier.stats().errors) == (0, 0)


def test_flush_returns_only_once_written_chunks_are_unpinned(redis_server: RedisServer) -> None:
    """When flush() returns True, no chunk it waited for is still pinned (found by review: the writer
    woke flush() before running on_done, so 57 of 300 rounds saw pinned chunks after flush)."""
    tier = tier_for(redis_server.url, key_prefix=f"flush{time.monotonic_ns()}:")
    try:
        for round_ in range(60):
            cache = ChunkCache(cache_pool(slots=8), remote=tier, namespace=str(round_))
            tokens = list(range(round_, round_ + 2 * CHUNK))
            cache.store(tokens, prefix_kv(tokens))
            assert cache.flush(5)
            assert cache.stats().pinned == 0
    finally:
        tier.close()
