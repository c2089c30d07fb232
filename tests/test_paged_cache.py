"""ChunkCache.store_paged / load_paged: a request's blocks to chunks and back, through the cache.

Pools hold chunks of 16 tokens (kvtest.SMALL_SHAPE: 2 layers, 2 KV heads of 8); paged caches have blocks
of 16, 4, 6 and 32 tokens, so chunk and block boundaries line up, nest, cross and contain each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtest import SMALL_SHAPE, require, small_pool
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError, OverlapError
from lmcache.paged import block_table, describe
from pagedtest import FRAMEWORK_LAYOUTS, Paged, assert_same

L, KV, CHUNK, H, D = SMALL_SHAPE


@pytest.fixture(params=FRAMEWORK_LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
def framework_layout(request: pytest.FixtureRequest) -> tuple[str, str]:
    require(request.param[0])
    return request.param  # type: ignore[no-any-return]


def paged_cache(
    framework: str, layout: str, num_blocks: int, block_size: int, seed: int = 0, kv: int = KV
) -> Paged:
    return Paged(framework, layout, (L, kv, num_blocks, block_size, H, D), "float16", seed=seed)


def load(cache: ChunkCache, paged: Paged, tokens: Any, ids: Any) -> int:
    """load_paged, updating ``paged`` (JAX returns new arrays) and its reference; return n."""
    if paged.framework == "torch":
        n = cache.load_paged(tokens, paged.caches, ids, layout=paged.layout)
    else:
        paged.caches, n = cache.load_paged(tokens, paged.caches, ids, layout=paged.layout)
    assert isinstance(n, int)
    return n


def expect_load(paged: Paged, ids: Any, kv_bits: np.ndarray, n: int) -> None:
    """Apply the naive per-token scatter of the first ``n`` tokens to the reference."""
    table = block_table(ids, n, describe(paged.caches, paged.layout))
    paged.ref_scatter(table, 0, kv_bits[:, :, :n])


@pytest.mark.parametrize("block_size", [16, 4, 6, 32])
@pytest.mark.parametrize("num_tokens", [48, 45, 7])
def test_store_then_load_bytes_exact(
    framework_layout: tuple[str, str], block_size: int, num_tokens: int
) -> None:
    framework, layout = framework_layout
    pool = small_pool("numpy", "float16", slots=8)
    cache = ChunkCache(pool)
    tokens = list(range(100, 100 + num_tokens))
    source = paged_cache(framework, layout, 20, block_size, seed=1)
    rng = np.random.default_rng(block_size)
    src_ids = rng.permutation(20).tolist()
    table = block_table(src_ids, num_tokens, describe(source.caches, layout))
    assert cache.store_paged(tokens, source.caches, src_ids, layout=layout) == num_tokens
    assert_same(source)  # a store reads only
    kv_bits = source.ref_gather(table, 0, num_tokens)
    out, n = cache.retrieve(tokens, framework="numpy")
    assert n == num_tokens
    assert np.array_equal(out.view(np.uint16), kv_bits)

    target = paged_cache(framework, layout, 20, block_size, seed=2)
    dst_ids = rng.permutation(20).tolist()
    assert load(cache, target, tokens, dst_ids) == num_tokens
    expect_load(target, dst_ids, kv_bits, num_tokens)
    assert_same(target)  # loaded positions exact; the rest of the last block and other blocks untouched


def test_load_prefix_only_writes_n_tokens_and_needs_only_its_blocks(
    framework_layout: tuple[str, str],
) -> None:
    framework, layout = framework_layout
    cache = ChunkCache(small_pool("numpy", "float16", slots=8))
    tokens = list(range(40))
    source = paged_cache(framework, layout, 12, 4, seed=3)
    assert cache.store_paged(tokens[:20], source.caches, list(range(12)), layout=layout) == 20
    kv_bits = source.ref_gather(np.arange(12), 0, 20)
    target = paged_cache(framework, layout, 12, 4, seed=4)
    # 40 tokens asked, 16 cached as full chunks plus a 4-token chunk that only matches a 20-token prompt:
    # the longest prefix for 40 tokens is the first chunk (16 tokens), so 4 block ids are enough.
    ids = [11, 3, 7, 0]
    assert load(cache, target, tokens, ids) == 16
    expect_load(target, ids, kv_bits, 16)
    assert_same(target)
    assert load(cache, target, tokens[:20], [5, 1, 2, 9, 10]) == 20
    expect_load(target, [5, 1, 2, 9, 10], kv_bits, 20)
    assert_same(target)


def test_miss_loads_nothing(framework_layout: tuple[str, str]) -> None:
    framework, layout = framework_layout
    cache = ChunkCache(small_pool("numpy", "float16", slots=4))
    target = paged_cache(framework, layout, 4, 4)
    before = target.caches
    assert load(cache, target, list(range(10)), []) == 0  # no block is needed for 0 tokens
    assert target.caches is before
    assert_same(target)


def test_store_paged_has_store_semantics() -> None:
    require("torch")
    cache = ChunkCache(small_pool("numpy", "float16", slots=3))
    paged = paged_cache("torch", "vllm", 16, 4)
    ids = list(range(16))
    tokens = list(range(64))
    assert cache.store_paged(tokens[:32], paged.caches, ids, layout="vllm") == 32
    assert cache.stats().stored == 2
    assert cache.store_paged(tokens[:32], paged.caches, ids, layout="vllm") == 32  # cached: no copy
    assert cache.stats().stored == 2
    # 4 chunks into 3 slots: the store never evicts the chain it extends, so it stops after the third.
    assert cache.store_paged(tokens, paged.caches, ids, layout="vllm") == 48
    assert cache.stats().stored == 3
    with cache.lease(tokens):  # everything pinned: a new prompt finds no slot and stores nothing
        assert cache.store_paged([7] * 16, paged.caches, ids, layout="vllm") == 0
    assert cache.store_paged([7] * 16, paged.caches, ids, layout="vllm") == 16  # evicts an LRU leaf
    assert cache.stats().evicted == 1


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([0, 1], ChunkShapeError, "need 3 block ids, got 2"),
        ([0, 1, 16], ChunkShapeError, "block id 16 is out of range"),
        ([0, 1, 0], ChunkShapeError, "block id 0 appears twice"),
        ([0.0, 1.0, 2.0], ChunkTypeError, "must be integer ids"),
        ([0, True, 2], ChunkTypeError, "not bools"),
    ],
)
def test_bad_block_tables_raise_before_anything_changes(ids: Any, error: type[Exception], match: str) -> None:
    require("torch")
    cache = ChunkCache(small_pool("numpy", "float16", slots=4))
    paged = paged_cache("torch", "vllm", 16, 4)
    tokens = list(range(12))
    with pytest.raises(error, match=match):
        cache.store_paged(tokens, paged.caches, ids, layout="vllm")
    assert cache.stats().stored == 0
    assert cache.store_paged(tokens, paged.caches, list(range(3)), layout="vllm") == 12
    stats = cache.stats()
    with pytest.raises(error, match=match):
        load(cache, paged, tokens, ids)
    assert cache.stats() == stats  # nothing pinned, counted or written
    assert_same(paged)


def test_mismatched_caches_raise() -> None:
    torch = require("torch")
    cache = ChunkCache(small_pool("numpy", "float16", slots=4))
    tokens = list(range(8))
    wrong_heads = [torch.zeros(2, 4, 4, 3, 8, dtype=torch.float16)] * 2
    with pytest.raises(ChunkShapeError, match="num_kv_heads = 3 but the pool's chunks have 2"):
        cache.store_paged(tokens, wrong_heads, [0, 1], layout="vllm")
    wrong_dtype = [torch.zeros(2, 4, 4, 2, 8, dtype=torch.bfloat16)] * 2
    with pytest.raises(ChunkShapeError, match="dtype bfloat16 but the pool holds float16"):
        cache.load_paged(tokens, wrong_dtype, [0, 1], layout="vllm")
    with pytest.raises(ConfigError, match="unknown paged layout"):
        cache.store_paged(tokens, wrong_dtype, [0, 1], layout="flash")
    assert cache.stats().stored == 0


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_cross_framework_torch_stored_jax_loaded(backend: str) -> None:
    require("torch")
    require("jax")
    require(backend)
    cache = ChunkCache(small_pool(backend, "float16", slots=8))
    tokens = list(range(1000, 1050))
    source = paged_cache("torch", "vllm", 16, 4, seed=5)
    src_ids = np.random.default_rng(0).permutation(16)
    assert cache.store_paged(tokens, source.caches, src_ids, layout="vllm") == 50
    kv_bits = source.ref_gather(src_ids, 0, 50)
    for layout in ("interleaved", "stacked"):
        target = paged_cache("jax", layout, 10, 6, seed=6)
        dst_ids = np.random.default_rng(1).permutation(10)
        assert load(cache, target, tokens, dst_ids) == 50
        expect_load(target, dst_ids, kv_bits, 50)
        assert_same(target)
    back = paged_cache("torch", "stacked", 8, 8, seed=7)  # and back into torch, other blocks
    assert load(cache, back, tokens, [7, 6, 5, 4, 3, 2, 1]) == 50
    expect_load(back, [7, 6, 5, 4, 3, 2, 1], kv_bits, 50)
    assert_same(back)


@pytest.mark.parametrize(
    ("framework", "layout"), [("torch", "vllm"), ("torch", "stacked"), ("jax", "stacked")]
)
def test_mla(framework: str, layout: str) -> None:
    require(framework)
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.storage_backend.mem_pool import LocalCPUPool

    pool = LocalCPUPool(LMCacheMemPoolMetadata((L, 1, CHUNK, H, D), "float16", 0.001), backend="numpy")
    cache = ChunkCache(pool)
    tokens = list(range(30))
    source = paged_cache(framework, layout, 10, 4, seed=8, kv=1)
    assert cache.store_paged(tokens, source.caches, list(range(10)), layout=layout) == 30
    kv_bits = source.ref_gather(np.arange(10), 0, 30)
    target = paged_cache(framework, layout, 10, 4, seed=9, kv=1)
    ids = list(range(9, -1, -1))
    assert load(cache, target, tokens, ids) == 30
    expect_load(target, ids, kv_bits, 30)
    assert_same(target)


def test_interleaved_has_no_mla_form() -> None:
    jnp = require("jax").numpy
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.storage_backend.mem_pool import LocalCPUPool

    pool = LocalCPUPool(LMCacheMemPoolMetadata((L, 1, CHUNK, H, D), "float16", 0.001), backend="numpy")
    with pytest.raises(ChunkShapeError, match="K/V = 2 but the pool's chunks have 1"):
        ChunkCache(pool).store_paged(
            [1, 2], [jnp.zeros((2, 4, 2 * H, D), jnp.float16)] * L, [0], layout="interleaved"
        )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_tables_through_the_cache(data: st.DataObject) -> None:
    require("torch")
    block_size = data.draw(st.sampled_from([3, 4, 16, 20]), label="block_size")
    num_tokens = data.draw(st.integers(1, 60), label="tokens")
    num_blocks = -(-60 // block_size) + 2
    src_ids = data.draw(st.permutations(range(num_blocks)), label="store ids")
    dst_ids = data.draw(st.permutations(range(num_blocks)), label="load ids")
    cache = ChunkCache(small_pool("numpy", "float16", slots=4))
    source = paged_cache("torch", "vllm", num_blocks, block_size, seed=num_tokens)
    tokens = list(range(num_tokens))
    assert cache.store_paged(tokens, source.caches, src_ids, layout="vllm") == num_tokens
    kv_bits = source.ref_gather(np.asarray(src_ids), 0, num_tokens)
    target = paged_cache("torch", "stacked", num_blocks, block_size, seed=num_tokens + 1)
    assert load(cache, target, tokens, dst_ids) == num_tokens
    expect_load(target, dst_ids, kv_bits, num_tokens)
    assert_same(target)


def test_paged_through_a_remote_tier(redis_server: Any) -> None:
    """store_paged writes through to the server; load_paged in another cache reads through, fetching
    only the chunks that the block table can take."""
    require("torch")
    from lmcache.remote import RedisTier
    from redis_server import require_redis

    require_redis()
    tokens = list(range(500, 545))  # 2 full chunks and a partial one
    source = paged_cache("torch", "vllm", 16, 4, seed=11)
    with RedisTier(redis_server.url, socket_timeout=0.5, connect_timeout=0.5) as tier:
        writer = ChunkCache(small_pool("numpy", "float16", slots=8), namespace="p", remote=tier)
        assert writer.store_paged(tokens, source.caches, list(range(16)), layout="vllm") == 45
        assert writer.flush(5.0)
        assert writer.stats().remote_writes == 3
        kv_bits = source.ref_gather(np.arange(16), 0, 45)

        reader = ChunkCache(small_pool("numpy", "float16", slots=8), namespace="p", remote=tier)
        target = paged_cache("torch", "stacked", 16, 4, seed=12)
        short = [9, 8, 7, 6, 5]  # 5 blocks of 4 hold 20 tokens: only the first chunk is fetched
        assert load(reader, target, tokens, short) == 16
        assert reader.stats().remote_hits == 1
        expect_load(target, short, kv_bits, 16)
        assert_same(target)
        ids = [15, 3, 14, 2, 13, 1, 12, 0, 11, 10, 9, 8]
        assert load(reader, target, tokens, ids) == 45
        assert reader.stats().remote_hits == 3
        expect_load(target, ids, kv_bits, 45)
        assert_same(target)


def test_donated_or_aliased_jax_caches_are_refused_before_anything_changes() -> None:
    """A cache donated to an earlier load_paged, or one array named for two layers, is a project error
    raised before the query is counted (found by review: a raw RuntimeError / JaxRuntimeError)."""
    jnp = require("jax").numpy
    from cachetest import cache_pool

    cache = ChunkCache(cache_pool("numpy", slots=8))
    tokens = list(range(20))
    stacked = jnp.zeros((2, 2, 8, 16, 2, 8), jnp.float16)
    cache.store_paged(tokens, stacked, [0, 1], layout="stacked")
    _, n = cache.load_paged(tokens, stacked, [2, 3], layout="stacked")  # donates `stacked`
    assert n == 20
    assert stacked.is_deleted()
    before = cache.stats()
    with pytest.raises(ChunkTypeError, match="deleted"):
        cache.load_paged(tokens, stacked, [2, 3], layout="stacked")
    with pytest.raises(ChunkTypeError, match="deleted"):
        cache.store_paged(list(range(50, 70)), stacked, [4, 5], layout="stacked")
    layer = jnp.ones((8, 16, 4, 8), jnp.float16)
    with pytest.raises(OverlapError, match="one array named for two layers"):
        cache.load_paged(tokens, [layer, layer], [2, 3], layout="interleaved")
    assert not layer.is_deleted()
    assert cache.stats() == before


def test_torch_cache_on_a_misaligned_storage_base() -> None:
    """A contiguous cache whose storage starts 2 bytes off alignment (from_numpy of an odd buffer) is
    valid input: the row type must divide its byte offset, not only its address."""
    torch = require("torch")
    from cachetest import cache_pool

    L, K, B, S, H, D = 2, 2, 4, 16, 2, 8
    count = L * K * B * S * H * D
    raw = np.zeros(count * 2 + 64, np.uint8)
    start = (2 - raw.ctypes.data) % 16
    storage = torch.from_numpy(raw[start : start + count * 2 + 32]).view(torch.float16)
    kv = storage[7 : 7 + count].view(L, K, B, S, H, D)  # data_ptr aligned, storage offset odd
    assert kv.storage_offset() == 7
    kv.copy_(torch.arange(count, dtype=torch.int16).view(torch.float16).view(kv.shape))
    cache = ChunkCache(cache_pool("torch", slots=8))
    assert cache.store_paged(list(range(32)), kv, [0, 1], layout="stacked") == 32
    out, n = cache.retrieve(list(range(32)), framework="torch")
    assert n == 32
    expected = kv[:, :, [0, 1]].reshape(L, K, 32, H, D)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
