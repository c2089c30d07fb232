"""ChunkCache with a disk tier (``disk=``): write-behind from ``store``, reads through ``lookup`` /
``retrieve`` / ``lease`` / ``load_paged`` into slots, a restart (a new pool and cache on the same
directory), two namespaces on one directory, the read order with a remote tier (slots, disk, remote),
pinning of pending writes, and threads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachetest import CHUNK, cache_pool, prefix_kv
from disktest import chunk_files, close_tiers, require_disk, tier
from kvtest import require, same_bits, to_native
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import ConfigError
from redis_server import RedisServer, tier_for

PROMPT = [5 * i + 1 for i in range(3 * CHUNK + 7)]  # 3 full chunks and a partial one
CHUNKS = 4


def test_a_restart_finds_the_prompt_bit_exact(tmp_path: Path, backend: str) -> None:
    require_disk()
    kv = prefix_kv(PROMPT, "bfloat16")
    first = ChunkCache(cache_pool(backend, "bfloat16"), namespace="m", disk=str(tmp_path))
    assert first.store(PROMPT, to_native(kv, backend)) == len(PROMPT)
    assert first.flush(5.0)
    assert (first.stats().disk_writes, first.stats().pinned) == (CHUNKS, 0)
    first.close()
    first.pool.close()
    assert len(chunk_files(tmp_path)) == CHUNKS

    restarted = ChunkCache(cache_pool(backend, "bfloat16"), namespace="m", disk=tmp_path)  # a new process's
    assert restarted.lookup(PROMPT) == len(PROMPT)  # found on disk: nothing copied yet
    assert len(restarted) == 0
    out, n = restarted.retrieve(PROMPT)
    assert n == len(PROMPT)
    assert same_bits(out, to_native(kv, backend))
    stats = restarted.stats()
    assert (stats.chunks, stats.disk_hits, stats.disk_corrupt, stats.disk_errors) == (CHUNKS, CHUNKS, 0, 0)
    assert restarted.flush(5.0)
    assert restarted.stats().disk_writes == 0  # chunks read from disk are not written back
    restarted.clear()
    with restarted.lease(PROMPT[: 2 * CHUNK + 3]) as lease:
        assert lease.num_tokens == 2 * CHUNK
        got = np.concatenate([c.as_numpy() for c in lease.chunks], axis=2)
        assert same_bits(got, kv[:, :, : 2 * CHUNK])
    restarted.close()


def test_load_paged_reads_through_the_disk(tmp_path: Path) -> None:
    torch = require("torch")
    require_disk()
    kv = prefix_kv(PROMPT, "float16")
    writer = ChunkCache(cache_pool("torch"), namespace="m", disk=tier(tmp_path))
    writer.store(PROMPT, to_native(kv, "torch"))
    assert writer.flush(5.0)
    reader = ChunkCache(cache_pool("torch"), namespace="m", disk=tier(tmp_path))
    layers, _, _, heads, dim = kv.shape
    block = 8
    caches = [torch.zeros(2, 16, block, heads, dim, dtype=torch.float16) for _ in range(layers)]
    blocks = list(range(10, 10 - 7, -1))
    n = reader.load_paged(PROMPT, caches, blocks, layout="vllm")
    assert n == len(PROMPT)
    for layer in range(layers):
        for t in range(n):
            got = caches[layer][:, blocks[t // block], t % block]
            assert same_bits(got, to_native(np.ascontiguousarray(kv[layer, :, t]), "torch"))


def test_partial_prefix_shorter_out_and_a_small_pool(tmp_path: Path) -> None:
    kv = prefix_kv(PROMPT)
    writer = ChunkCache(cache_pool(), disk=tier(tmp_path))
    writer.store(PROMPT, kv)
    assert writer.flush(5.0)
    reader = ChunkCache(cache_pool(), disk=tier(tmp_path))
    out = np.zeros((*kv.shape[:2], CHUNK + 5, *kv.shape[3:]), kv.dtype)
    assert reader.retrieve(PROMPT, out=out)[1] == CHUNK  # chunk 1 would not fit out: not read
    assert len(reader) == 1
    small = ChunkCache(cache_pool(slots=2), disk=tier(tmp_path))
    got, n = small.retrieve(PROMPT)
    assert n == 2 * CHUNK  # two slots, two chunks: the chain being extended is never evicted
    assert same_bits(got, kv[:, :, :n])


def test_two_namespaces_share_one_directory(tmp_path: Path) -> None:
    """The same tokens with different KV in two namespaces: each cache finds its own bytes, through one
    tier object, through a tier each, and after a restart."""
    kv = {name: prefix_kv(PROMPT, "float16") + i for i, name in enumerate(("llama/tp0", "llama/tp1"))}
    shared = tier(tmp_path)
    caches = {name: ChunkCache(cache_pool(), namespace=name, disk=shared) for name in kv}
    for name, cache in caches.items():
        assert cache.store(PROMPT, kv[name]) == len(PROMPT)
    assert shared.flush(5.0)
    assert len(chunk_files(tmp_path)) == 2 * CHUNKS
    assert len(os.listdir(tmp_path)) == 2  # a directory per namespace
    for layout in ("one tier", "a tier each", "restart"):
        for name in kv:
            disk = shared if layout == "one tier" else tier(tmp_path)
            reader = ChunkCache(cache_pool(), namespace=name, disk=disk)
            out, n = reader.retrieve(PROMPT)
            assert n == len(PROMPT)
            assert same_bits(out, kv[name]), (layout, name)
        if layout == "a tier each":
            close_tiers()
            shared = tier(tmp_path)
    assert ChunkCache(cache_pool(), namespace="llama/tp2", disk=shared).lookup(PROMPT) == 0


def test_read_order_slots_then_disk_then_remote(tmp_path: Path, redis_server: RedisServer) -> None:
    require_disk()
    kv = prefix_kv(PROMPT)
    with tier_for(redis_server.url) as remote:
        writer = ChunkCache(cache_pool(), namespace="m", disk=tier(tmp_path / "a"), remote=remote)
        assert writer.store(PROMPT, kv) == len(PROMPT)
        assert writer.flush(5.0)
        stats = writer.stats()
        assert (stats.disk_writes, stats.remote_writes) == (CHUNKS, CHUNKS)  # both tiers, one store

        # Another machine: its disk is empty. Remote hits land in slots and are written to its disk.
        other_disk = tier(tmp_path / "b")
        other = ChunkCache(cache_pool(), namespace="m", disk=other_disk, remote=remote)
        assert other.lookup(PROMPT) == len(PROMPT)  # disk first (nothing), then the server
        out, n = other.retrieve(PROMPT)
        assert (n, same_bits(out, kv)) == (len(PROMPT), True)
        assert other.flush(5.0)
        stats = other.stats()
        # remote counters are the tier's, shared with the writer: nothing was written back to the server
        assert (stats.remote_hits, stats.disk_hits, stats.disk_writes, stats.remote_writes) == (
            CHUNKS,
            0,
            CHUNKS,
            CHUNKS,
        )

        # It restarts: the chunks come from its disk now, the server is not asked.
        again = ChunkCache(cache_pool(), namespace="m", disk=tier(tmp_path / "b"), remote=remote)
        remote_hits = remote.stats().hits
        out, n = again.retrieve(PROMPT)
        assert (n, same_bits(out, kv)) == (len(PROMPT), True)
        assert again.stats().disk_hits == CHUNKS
        assert remote.stats().hits == remote_hits

        # Half on disk, the rest on the server: the disk's part first, then the server's.
        partial = tmp_path / "c"
        half = ChunkCache(cache_pool(), namespace="m", disk=tier(partial))
        half.store(PROMPT[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
        assert half.flush(5.0)
        both = ChunkCache(cache_pool(), namespace="m", disk=tier(partial), remote=remote)
        out, n = both.retrieve(PROMPT)
        assert (n, same_bits(out, kv)) == (len(PROMPT), True)
        assert (both.stats().disk_hits, remote.stats().hits - remote_hits) == (2, 2)


def test_pending_writes_pin_their_prefix_until_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = prefix_kv(PROMPT)
    gate = threading.Event()
    entered = threading.Event()
    real = os.pwritev

    def slow_writev(fd: int, buffers: Any, offset: int) -> int:
        entered.set()
        gate.wait(10)
        return int(real(fd, buffers, offset))

    cache = ChunkCache(cache_pool(slots=CHUNKS + 1), disk=tier(tmp_path))
    monkeypatch.setattr(os, "pwritev", slow_writev)
    assert cache.store(PROMPT, kv) == len(PROMPT)
    assert entered.wait(5)
    assert cache.stats().pinned == CHUNKS  # pending: not evictable, not cleared
    assert cache.clear() == 0
    other = [7777 + i for i in range(2 * CHUNK)]
    assert cache.store(other, prefix_kv(other)) == CHUNK  # one free slot; the pending chunks stay
    out, n = cache.retrieve(PROMPT)
    assert (n, same_bits(out, kv)) == (len(PROMPT), True)
    gate.set()
    assert cache.flush(5.0)
    assert cache.stats().pinned == 0
    assert cache.stats().disk_writes == CHUNKS + 1


def test_the_disk_argument_and_who_closes_the_tier(tmp_path: Path) -> None:
    require_disk()
    with pytest.raises(ConfigError, match="disk must be a directory path or a DiskTier"):
        ChunkCache(cache_pool(), disk=3)  # type: ignore[arg-type]
    owned = ChunkCache(cache_pool(), disk=tmp_path / "owned")
    assert owned.disk is not None
    assert owned.disk.path == os.path.realpath(tmp_path / "owned")
    owned.close()
    done: list[bool] = []
    owned.disk.submit(
        owned.disk.key("", bytes(16)), prefix_kv(PROMPT[:CHUNK]), "float16", (2, 2, 16, 2, 8), done.append
    )
    assert done == [False]  # closed with the cache that made it
    mine = tier(tmp_path / "mine")
    cache = ChunkCache(cache_pool(), disk=mine)
    cache.close()
    assert cache.store(PROMPT, prefix_kv(PROMPT)) == len(PROMPT)
    assert mine.flush(5.0)
    assert mine.stats().writes == CHUNKS  # a tier passed in stays its creator's

    def writers() -> int:
        return sum(t.name == "lmcache-disk-writer" and t.is_alive() for t in threading.enumerate())

    before = writers()
    with pytest.raises(ConfigError, match="must start with redis://"):
        ChunkCache(cache_pool(), disk=tmp_path / "third", remote="http://not-redis")
    assert writers() == before  # the disk tier it had made was closed, its thread ended


def test_threads_store_and_retrieve_through_the_disk(tmp_path: Path) -> None:
    prompts = [[1000 * p + i for i in range(2 * CHUNK + p)] for p in range(6)]
    kvs = [prefix_kv(p) for p in prompts]
    disk = tier(tmp_path, size_gib=12 * 2 * 1100 / 2**30)  # about 12 chunks: eviction as it goes
    cache = ChunkCache(cache_pool(slots=4), namespace="t", disk=disk)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(60):
            i = int(rng.integers(len(prompts)))
            if rng.random() < 0.5:
                cache.store(prompts[i], kvs[i])
            else:
                out, n = cache.retrieve(prompts[i])
                if n and not same_bits(out, kvs[i][:, :, :n]):
                    errors.append(f"prompt {i}: wrong bytes")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.flush(5.0)
    stats = cache.stats()
    assert (stats.pinned, stats.disk_corrupt, stats.disk_errors) == (0, 0, 0)
    assert disk.stats().bytes <= disk.size_gib * 2**30
