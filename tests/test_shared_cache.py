"""The shared cache's client against an in-process server: the ChunkCache API, bytes and views.

Each test starts a :class:`~lmcache.shared.CacheServer` in this process (its own threads) and connects
clients of each backend; what a client sees is checked against the KV derived from the token ids, and
against an in-process ChunkCache given the same calls (same errors, same answers).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import pointer, require, same_bits, to_host, to_native, wait_until
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import (
    ChunkShapeError,
    ConfigError,
    NotPicklableError,
    OverlapError,
    ServerUnavailableError,
    StaleHandleError,
    TokensTypeError,
)
from lmcache.registry import detect_framework
from lmcache.shared import CacheServer, SharedChunkCache, connect
from pagedtest import FRAMEWORK_LAYOUTS, Paged
from sharedtest import metadata

SLOTS = 8
TOKENS = list(range(3 * CHUNK + 5))  # 3 full chunks and a partial one


@pytest.fixture
def server(socket_path: str) -> Iterator[CacheServer]:
    with CacheServer(socket_path, metadata(SLOTS)) as running:
        yield running


@pytest.fixture
def client(server: CacheServer, backend: str) -> Iterator[SharedChunkCache]:
    with connect(server.socket_path, backend=backend) as cache:
        yield cache


def test_connect_without_a_server_says_how_to_start_one(socket_path: str) -> None:
    with pytest.raises(ServerUnavailableError, match="python -m lmcache serve --socket"):
        connect(socket_path)


def test_keys_are_an_in_process_caches(server: CacheServer) -> None:
    local = ChunkCache(cache_pool("numpy"), namespace="llama/tp0")
    with connect(server.socket_path, namespace="llama/tp0") as shared, connect(server.socket_path) as other:
        assert shared.keys(TOKENS) == local.keys(TOKENS)
        assert shared.keys(np.asarray(TOKENS)) == local.keys(TOKENS)
        assert other.keys(TOKENS) != local.keys(TOKENS)
        assert shared.chunk_tokens(len(TOKENS)) == [CHUNK, CHUNK, CHUNK, 5]


def test_store_lookup_retrieve_bit_exact(client: SharedChunkCache, backend: str) -> None:
    kv = prefix_kv(TOKENS)
    assert client.store(TOKENS, to_native(kv, backend)) == len(TOKENS)
    assert client.lookup(TOKENS) == len(TOKENS)
    assert client.lookup([*TOKENS[:20], 99]) == CHUNK
    out, n = client.retrieve(TOKENS)
    assert n == len(TOKENS)
    assert detect_framework(out) == backend
    assert same_bits(out, kv)
    for framework in ("numpy", "torch", "jax"):
        if framework != "numpy":
            require(framework)
        got, n = client.retrieve([*TOKENS[: 2 * CHUNK], 99], framework=framework)
        assert n == 2 * CHUNK
        assert same_bits(got, kv[:, :, :n])


def test_retrieve_into_out_and_misses(client: SharedChunkCache) -> None:
    kv = prefix_kv(TOKENS)
    client.store(TOKENS, kv)
    out = np.full((2, 2, len(TOKENS) + 3, 2, 8), -1, dtype=np.float16)
    result, n = client.retrieve(TOKENS, out=out)
    assert result is out
    assert n == len(TOKENS)
    assert out[:, :, :n].tobytes() == kv.tobytes()
    assert (out[:, :, n:] == -1).all()
    untouched = np.full_like(out, 7)
    result, n = client.retrieve([5, 4, 3], out=untouched)
    assert (result, n) == (None, 0)
    assert (untouched == 7).all()
    assert client.retrieve([5, 4, 3]) == (None, 0)


def test_torch_out(client: SharedChunkCache) -> None:
    torch = require("torch")
    kv = prefix_kv(TOKENS)
    client.store(TOKENS, kv)
    out = torch.zeros((2, 2, len(TOKENS), 2, 8), dtype=torch.float16)
    result, n = client.retrieve(TOKENS, out=out)
    assert result is out
    assert n == len(TOKENS)
    assert same_bits(out, kv)


def test_lease_views_are_the_mapping(client: SharedChunkCache, backend: str) -> None:
    kv = prefix_kv(TOKENS)
    client.store(TOKENS, kv)
    base, stride = pointer(client.arena), client.layout.slot_bytes
    with client.lease(TOKENS) as lease:
        assert lease.num_tokens == len(TOKENS)
        assert [obj.num_tokens for obj in lease.chunks] == [CHUNK, CHUNK, CHUNK, 5]
        assert client.stats().leased == 4
        for obj, start in zip(lease.chunks, range(0, len(TOKENS), CHUNK), strict=True):
            address = base + obj.chunk_idx * stride
            assert pointer(obj.data) == address
            assert same_bits(obj.data, kv[:, :, start : start + obj.num_tokens])
            for framework in ("numpy", "torch", "jax"):
                if framework == "numpy" or framework == backend:
                    assert pointer(getattr(obj, f"as_{framework}")()) == address
        kept = lease.chunks[0]
    assert client.stats().leased == 0
    with pytest.raises(StaleHandleError, match="has ended"):
        kept.as_numpy()
    assert not kept.is_live


def test_arena_is_the_whole_mapping(client: SharedChunkCache, server: CacheServer, backend: str) -> None:
    arena = client.arena
    assert tuple(arena.shape) == (SLOTS, client.layout.slot_elems)
    assert detect_framework(arena) == backend
    kv = prefix_kv(TOKENS[:CHUNK])
    client.store(TOKENS[:CHUNK], kv)
    with client.lease(TOKENS[:CHUNK]) as lease:
        row = to_host(arena)[lease.chunks[0].chunk_idx, : kv.size]
        assert row.tobytes() == kv.tobytes()


def test_bad_arguments_raise_as_in_process(client: SharedChunkCache) -> None:
    kv = prefix_kv(TOKENS)
    with pytest.raises(TokensTypeError):
        client.store([1.5, 2.0], kv[:, :, :2])
    with pytest.raises(ChunkShapeError, match="tokens"):
        client.store(TOKENS, kv[:, :, :10])
    assert client.lookup(TOKENS) == 0  # nothing was stored
    client.store(TOKENS, kv)
    short = np.zeros((2, 2, 20, 2, 8), dtype=np.float16)
    before = client.stats()
    with pytest.raises(ChunkShapeError, match=f"out holds 20 tokens .* but {len(TOKENS)} cached"):
        client.retrieve(TOKENS, out=short)
    assert not short.any()
    after = client.stats()
    assert (after.hit_tokens, after.query_tokens, after.pinned) == (before.hit_tokens, before.query_tokens, 0)
    inside = client.arena if isinstance(client.arena, np.ndarray) else None
    if inside is not None:
        view = inside[0, : kv[:, :, :CHUNK].size].reshape(kv[:, :, :CHUNK].shape)
        with pytest.raises(OverlapError, match="overlaps"):
            client.retrieve(TOKENS, out=view)
    with pytest.raises(ConfigError, match="framework"):
        client.retrieve(TOKENS, framework="tensorflow")
    with pytest.raises(ConfigError, match="chunk keys"):
        client.lookup_keys([b"short"], 3)


def test_two_clients_share_chunks_and_namespaces_separate(server: CacheServer, backend: str) -> None:
    kv = prefix_kv(TOKENS)
    with connect(server.socket_path) as writer, connect(server.socket_path, backend=backend) as reader:
        writer.store(TOKENS, kv)
        assert reader.lookup(TOKENS) == len(TOKENS)
        out, n = reader.retrieve(TOKENS)
        assert n == len(TOKENS)
        assert same_bits(out, kv)
        with connect(server.socket_path, namespace="other") as other:
            assert other.lookup(TOKENS) == 0
    assert server.cache.stats().chunks == 4


def test_begin_store_commit_and_abort(client: SharedChunkCache, server: CacheServer) -> None:
    kv = prefix_kv(TOKENS)
    keys = client.keys(TOKENS)
    with client.begin_store(keys, len(TOKENS)) as pending:
        assert (pending.cached, len(pending.slots)) == (0, 4)
        pending.slots[0].copy_from(kv[:, :, :CHUNK])
    assert client.lookup(TOKENS) == 0  # aborted: nothing visible
    assert server.cache.pool.stats().used == 0
    pending = client.begin_store(keys, len(TOKENS))
    for index, slot in enumerate(pending.slots):
        slot.copy_from(kv[:, :, index * CHUNK : index * CHUNK + slot.num_tokens])
    slots = pending.slots
    assert pending.commit(2) == 2 * CHUNK  # the first two published, the rest given back
    assert server.cache.pool.stats().used == 2
    with pytest.raises(StaleHandleError):
        slots[0].as_numpy()
    again = client.begin_store(keys, len(TOKENS))
    assert again.cached == 2
    assert again.commit(0) == 2 * CHUNK
    out, n = client.retrieve(TOKENS)
    assert n == 2 * CHUNK
    assert same_bits(out, kv[:, :, :n])
    assert client.begin_store(keys[:2], 2 * CHUNK).commit() == 2 * CHUNK  # all cached: nothing to fill


def test_eviction_and_pins_are_the_servers(client: SharedChunkCache, server: CacheServer) -> None:
    first = [10_000 + i for i in range(4 * CHUNK)]
    second = [20_000 + i for i in range(6 * CHUNK)]
    client.store(first, prefix_kv(first))
    with client.lease(first) as lease:
        assert client.store(second, prefix_kv(second)) == 4 * CHUNK  # 4 slots left: the lease holds 4
        assert lease.num_tokens == 4 * CHUNK
        assert same_bits(np.concatenate([o.as_numpy() for o in lease.chunks], axis=2), prefix_kv(first))
    # The release made the first prompt the most recent: the two chunks the second still needs come
    # from the first prompt's tail (least recently used leaves; the second's own prefix is pinned).
    assert client.store(second, prefix_kv(second)) == 6 * CHUNK
    assert client.lookup(first) == 2 * CHUNK
    assert server.cache.stats().evicted == 2


def test_clear_keeps_leased_chunks(client: SharedChunkCache) -> None:
    client.store(TOKENS, prefix_kv(TOKENS))
    other = [77_000 + i for i in range(CHUNK)]
    client.store(other, prefix_kv(other))
    with client.lease(other):
        assert client.clear() == 4
        assert client.lookup(other) == CHUNK
    assert len(client) == 1


def test_close_releases_everything_and_later_calls_miss(server: CacheServer) -> None:
    client = connect(server.socket_path)
    client.store(TOKENS, prefix_kv(TOKENS))
    lease = client.lease(TOKENS)
    pending = client.begin_store(client.keys([5] * 40), 40)
    assert server.cache.stats().leased == 4
    slots = pending.slots
    client.close()
    assert lease.released
    assert not any(slot.is_live for slot in slots)
    assert wait_until(lambda: server.cache.stats().pinned == 0)  # the server saw the connection end
    assert server.cache.stats().leased == 0
    assert server.cache.pool.stats().used == 4
    assert client.lookup(TOKENS) == 0
    assert client.store(TOKENS, prefix_kv(TOKENS)) == 0
    assert client.retrieve(TOKENS) == (None, 0)
    assert client.lease(TOKENS).num_tokens == 0
    assert not client.stats().connected
    client.close()


def test_client_refuses_pickling(client: SharedChunkCache) -> None:
    client.store(TOKENS, prefix_kv(TOKENS))
    with pytest.raises(NotPicklableError):
        pickle.dumps(client)
    with pytest.raises(NotPicklableError), client.lease(TOKENS) as lease:
        pickle.dumps(lease)
    with pytest.raises(NotPicklableError):
        pickle.dumps(client.begin_store(client.keys([1, 2]), 2))


@pytest.fixture(params=FRAMEWORK_LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
def framework_layout(request: pytest.FixtureRequest) -> tuple[str, str]:
    require(request.param[0])
    return request.param  # type: ignore[no-any-return]


def _load(cache: Any, paged: Paged, tokens: list[int], ids: list[int]) -> int:
    if paged.framework == "torch":
        n = cache.load_paged(tokens, paged.caches, ids, layout=paged.layout)
    else:
        paged.caches, n = cache.load_paged(tokens, paged.caches, ids, layout=paged.layout)
    return int(n)


def test_paged_store_and_load_match_in_process(
    server: CacheServer, framework_layout: tuple[str, str]
) -> None:
    framework, layout = framework_layout
    geometry = (2, 2, 12, 6, 2, 8)  # blocks of 6 tokens: chunk and block boundaries cross
    source = Paged(framework, layout, geometry, "float16", seed=1)
    ids = [9, 2, 7, 0, 11, 4, 5, 1, 3]
    local = ChunkCache(cache_pool("numpy", slots=SLOTS))
    with connect(server.socket_path) as shared:
        assert shared.store_paged(TOKENS, source.caches, ids, layout=layout) == len(TOKENS)
        assert local.store_paged(TOKENS, source.caches, ids, layout=layout) == len(TOKENS)
        out, _ = shared.retrieve(TOKENS)
        reference, _ = local.retrieve(TOKENS)
        assert out.tobytes() == reference.tobytes()
        target = Paged(framework, layout, geometry, "float16", seed=2)
        expected = Paged(framework, layout, geometry, "float16", seed=2)
        table = [3, 8, 10, 6, 1, 0, 2, 5, 11]
        assert _load(shared, target, TOKENS, table) == len(TOKENS)
        assert _load(local, expected, TOKENS, table) == len(TOKENS)
        for got, want in zip(target.current(), expected.current(), strict=True):
            assert np.array_equal(got, want)
        with pytest.raises(ChunkShapeError):
            _load(shared, target, TOKENS, table[:3])  # too few blocks for the cached prefix
        with pytest.raises(ChunkShapeError):
            shared.store_paged(TOKENS, source.caches, [1, 1, 2, 3, 4, 5, 6, 7, 8], layout=layout)
        miss = Paged(framework, layout, geometry, "float16", seed=3)
        before = miss.current()
        assert _load(shared, miss, [4242] * 20, table) == 0
        assert_same_bytes(miss.current(), before)


def assert_same_bytes(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_socket_and_repr(server: CacheServer) -> None:
    with connect(server.socket_path) as client:
        assert "connected" in repr(client)
        assert client.server_id == server.server_id
        assert server.clients == 1
    assert "closed" in repr(client)
    assert oct(os.stat(server.socket_path).st_mode & 0o777) == "0o600"


def test_a_server_with_a_disk_tier_finds_its_chunks_after_a_restart(tmp_path: Any) -> None:
    """``CacheServer(..., disk=DIR)`` (``lmcache serve --disk DIR``): a new server on the same directory
    serves what the old one wrote, bit-exactly."""
    from disktest import require_disk
    from lmcache.disk import DiskTier

    require_disk()
    tokens = list(range(3 * CHUNK + 5))
    kv = prefix_kv(tokens)
    for round_ in (1, 2):
        tier = DiskTier(tmp_path / "kv", size_gib=0.01)
        with CacheServer(f"{tmp_path}/s{round_}.sock", metadata(8), disk=tier) as server:
            client = connect(server.socket_path, backend="numpy")
            if round_ == 1:
                assert client.store(tokens, kv) == len(tokens)
                assert server.cache.flush(5.0)
            else:
                assert client.lookup(tokens) == len(tokens)  # from the disk: the new arena is empty
                out, n = client.retrieve(tokens)
                assert n == len(tokens)
                assert same_bits(out, kv)
            client.close()
        tier.close()
