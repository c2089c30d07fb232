"""The chunk cache: round trips in every framework and dtype, keys, eviction, leases, bad inputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import SMALL_SHAPE, require, same_bits, to_host, to_native
from lmcache.cache_copies import ChunkCopies
from lmcache.chunk_cache import (
    KEY_BYTES,
    CacheStats,
    ChunkCache,
    TokensTypeError,
    TokensValueError,
)
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import KV_DTYPES
from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError, MemPoolError
from lmcache.storage_backend.mem_pool import LocalCPUPool

DTYPES = list(KV_DTYPES)
FRAMEWORKS = ("numpy", "torch", "jax")


def _cache(backend: str = "numpy", dtype: str = "float16", slots: int = 8, **kw: Any) -> ChunkCache:
    return ChunkCache(cache_pool(backend, dtype, slots), **kw)


def _prompt(length: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, 50_000, size=length)]


# -- round trips -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dst", FRAMEWORKS)
@pytest.mark.parametrize("src", FRAMEWORKS)
@pytest.mark.parametrize("pool_backend", FRAMEWORKS)
def test_store_and_retrieve_across_frameworks(pool_backend: str, src: str, dst: str, dtype: str) -> None:
    for name in {pool_backend, src, dst}:
        require(name)
    cache = _cache(pool_backend, dtype)
    tokens = _prompt(2 * CHUNK + 5)  # two full chunks and a partial one
    kv = prefix_kv(tokens, dtype)
    assert cache.store(tokens, to_native(kv, src)) == len(tokens)
    out, n = cache.retrieve(tokens, framework=dst)
    assert n == len(tokens)
    assert (type(out).__module__ or "").partition(".")[0] in {dst, "jaxlib"}
    assert same_bits(out, kv), "retrieve must return exactly the stored bytes"
    stats = cache.stats()
    assert (stats.chunks, stats.stored, stats.pinned, stats.leased) == (3, 3, 0, 0)


@pytest.mark.parametrize("out_framework", ["numpy", "torch"])
def test_retrieve_into_out_writes_only_the_hit(backend: str, out_framework: str) -> None:
    torch = require(out_framework) if out_framework == "torch" else None
    cache = _cache(backend)
    tokens = _prompt(3 * CHUNK)
    cache.store(tokens[: CHUNK + 3], prefix_kv(tokens[: CHUNK + 3]))  # 1 full chunk + 1 partial
    L, kv, _, H, D = SMALL_SHAPE
    sentinel = np.full((L, kv, 3 * CHUNK, H, D), 7, dtype=np.float16)
    out = to_native(sentinel, out_framework)
    result, n = cache.retrieve(tokens, out=out)  # the partial chunk does not match: CHUNK tokens
    assert n == CHUNK
    assert result is out
    host = to_host(out)
    assert host[:, :, :n].tobytes() == prefix_kv(tokens[:n]).tobytes()
    assert host[:, :, n:].tobytes() == sentinel[:, :, n:].tobytes()
    if torch is not None:
        assert isinstance(result, torch.Tensor)


def test_miss_returns_none_and_leaves_out_untouched(backend: str) -> None:
    cache = _cache(backend)
    cache.store(_prompt(CHUNK, seed=1), prefix_kv(_prompt(CHUNK, seed=1)))
    out = np.full((2, 2, CHUNK, 2, 8), 3, dtype=np.float16)
    assert cache.retrieve(_prompt(CHUNK, seed=2), out=out) == (None, 0)
    assert (out == 3).all()
    assert cache.retrieve(_prompt(CHUNK, seed=2)) == (None, 0)
    assert cache.retrieve([]) == (None, 0)


def test_retrieve_from_a_jax_pool_into_jax_is_a_usable_array() -> None:
    jnp = require("jax").numpy
    cache = _cache("jax", "bfloat16")
    tokens = _prompt(CHUNK + 1)
    kv = prefix_kv(tokens, "bfloat16")
    cache.store(tokens, jnp.asarray(kv))
    out, n = cache.retrieve(tokens)
    assert n == CHUNK + 1
    assert float(jnp.sum(out.astype(jnp.float32))) == float(kv.astype(np.float32).sum())


def test_mla_pool_stores_one_kv_plane() -> None:
    shape = (2, 1, 16, 1, 8)
    pool = LocalCPUPool(LMCacheMemPoolMetadata(shape, "float16", 8 * 256 / 2**30), backend="numpy")
    cache = ChunkCache(pool)
    tokens = _prompt(20)
    kv = prefix_kv(tokens, "float16", shape)
    assert cache.store(tokens, kv) == 20
    out, n = cache.retrieve(tokens)
    assert n == 20
    assert out.tobytes() == kv.tobytes()
    with pytest.raises(ChunkShapeError):
        cache.store(_prompt(20, seed=3), prefix_kv(_prompt(20, seed=3)))  # (L, 2, ...) into an MLA pool


# -- keys ------------------------------------------------------------------------------------------------
def _reference_keys(tokens: list[int], namespace: str, chunk: int) -> list[bytes]:
    """The documented key formula, written out independently of the cache."""
    key = hashlib.blake2b(
        b"lmcache-mempool/chunk-cache/v1\x00" + namespace.encode(), digest_size=KEY_BYTES
    ).digest()
    keys = []
    for start in range(0, len(tokens), chunk):
        data = b"".join(t.to_bytes(8, "little", signed=True) for t in tokens[start : start + chunk])
        key = hashlib.blake2b(data, key=key, digest_size=KEY_BYTES).digest()
        keys.append(key)
    return keys


def test_keys_follow_the_documented_formula() -> None:
    cache = _cache(namespace="llama-3-8b/bf16/tp0")
    tokens = [*range(CHUNK * 2), -5, 2**40]
    keys = cache.keys(tokens)
    assert len(keys) == 3
    assert all(len(k) == KEY_BYTES for k in keys)
    assert keys == _reference_keys(tokens, "llama-3-8b/bf16/tp0", CHUNK)
    assert cache.keys([]) == []


def test_keys_name_the_whole_prefix_and_the_namespace() -> None:
    cache, other = _cache(), _cache(namespace="other model")
    a = list(range(3 * CHUNK))
    b = [*a[:CHUNK], 999, *a[CHUNK + 1 :]]  # differs in chunk 1 only
    ka, kb = cache.keys(a), cache.keys(b)
    assert ka[0] == kb[0]
    assert ka[1] != kb[1]
    assert ka[2] != kb[2], "a chunk's key must depend on every earlier chunk"
    assert set(cache.keys(a)).isdisjoint(other.keys(a))
    assert cache.keys(a[: CHUNK + 3])[1] != ka[1], "a partial chunk has its own key"


def test_keys_are_the_same_for_every_array_type(backend: str) -> None:
    ids = _prompt(2 * CHUNK + 3)
    cache = _cache()
    expected = cache.keys(ids)
    inputs: list[Any] = [tuple(ids), np.array(ids, dtype=np.int64), np.array(ids, dtype=np.int32)]
    inputs.append(np.array(ids, dtype=np.uint32))
    inputs.append(np.array(ids, dtype=">i8"))  # big-endian storage, same ids
    if backend == "torch":
        torch = require("torch")
        inputs += [torch.tensor(ids), torch.tensor(ids, dtype=torch.int32)]
    if backend == "jax":
        jnp = require("jax").numpy
        inputs += [jnp.asarray(ids, dtype=jnp.int32)]
    for tokens in inputs:
        assert cache.keys(tokens) == expected, type(tokens)
    assert cache.keys(range(5)) == cache.keys([0, 1, 2, 3, 4])


def test_keys_do_not_depend_on_the_process_or_hash_seed() -> None:
    code = textwrap.dedent(
        """
        import sys
        from lmcache.chunk_cache import ChunkCache
        from lmcache.config import LMCacheMemPoolMetadata
        from lmcache.storage_backend.mem_pool import LocalCPUPool
        meta = LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "float16", 0.001)
        cache = ChunkCache(LocalCPUPool(meta, backend="numpy"), namespace="ns")
        print(",".join(k.hex() for k in cache.keys(list(range(40)))))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "adapters"), env.get("PYTHONPATH", "")])
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        )
        outputs.add(result.stdout.strip())
    expected = ",".join(k.hex() for k in _reference_keys(list(range(40)), "ns", 16))
    assert outputs == {expected}


# -- lookup, eviction, leases ----------------------------------------------------------------------------
def test_lookup_is_pure_and_counts_tokens() -> None:
    cache = _cache(slots=4)
    a, b = _prompt(2 * CHUNK, 1), _prompt(2 * CHUNK, 2)
    cache.store(a, prefix_kv(a))
    cache.store(b, prefix_kv(b))
    assert cache.lookup(a) == 2 * CHUNK  # must not refresh a
    assert cache.lookup([*a[:CHUNK], -1]) == CHUNK
    assert cache.lookup([]) == 0
    c = _prompt(CHUNK, 3)
    cache.store(c, prefix_kv(c))  # evicts a's leaf: a is least recently used despite the lookups
    assert cache.lookup(a) == CHUNK
    assert cache.lookup(b) == 2 * CHUNK
    stats = cache.stats()
    assert (stats.evicted, stats.chunks) == (1, 4)
    assert stats.query_tokens == 2 * CHUNK + (CHUNK + 1) + 0 + 2 * CHUNK + 2 * CHUNK
    assert stats.hit_tokens == 2 * CHUNK + CHUNK + 0 + CHUNK + 2 * CHUNK


def test_eviction_takes_the_least_recently_used_leaf() -> None:
    cache = _cache(slots=4)
    a, b = _prompt(2 * CHUNK, 1), _prompt(2 * CHUNK, 2)
    cache.store(a, prefix_kv(a))
    cache.store(b, prefix_kv(b))
    cache.retrieve(a)  # a is now the most recent: b goes first, leaf (chunk 1) before head
    c = _prompt(CHUNK, 3)
    cache.store(c, prefix_kv(c))
    assert (cache.lookup(a), cache.lookup(b)) == (2 * CHUNK, CHUNK)
    d = _prompt(CHUNK, 4)
    cache.store(d, prefix_kv(d))
    assert (cache.lookup(a), cache.lookup(b)) == (2 * CHUNK, 0)


def test_a_store_never_evicts_its_own_chain_and_never_raises_for_a_full_pool() -> None:
    cache = _cache(slots=4)
    long = _prompt(6 * CHUNK, 1)
    assert cache.store(long, prefix_kv(long)) == 4 * CHUNK  # the prefix that fits
    assert cache.lookup(long) == 4 * CHUNK
    assert cache.stats().evicted == 0
    assert cache.store(long, prefix_kv(long)) == 4 * CHUNK  # nothing copied again
    assert cache.stats().stored == 4


def test_a_parked_parent_pinned_by_a_store_stays_held_when_its_last_child_goes() -> None:
    """Regression (found by the shared cache's model test): an aborted store releases its cached prefix
    untouched, so a parent with children goes to the cold end and is parked when chosen; a later store
    pins it, and evicting its last child must not make the pinned parent a candidate again."""
    cache = _cache(slots=6)
    head = [2000 + i for i in range(CHUNK)]
    first = [*head, *range(CHUNK), 500]  # head, a child of it, a partial chunk
    cache.store(first, prefix_kv(first))
    aborted = [*head, 500]
    cache.begin_store(cache.keys(aborted), len(aborted)).abort()  # head released untouched: coldest
    fill = [i for _ in range(4) for i in range(CHUNK)]
    assert cache.store(fill, prefix_kv(fill)) == 4 * CHUNK  # head parked, first's tail evicted
    again = [*head, *range(1000, 1000 + 2 * CHUNK)]
    assert cache.store(again, prefix_kv(again)) == 3 * CHUNK  # pins head, evicts its last child
    assert cache.stats().pinned == 0
    for index in range(3):  # head must never be offered as a victim while pinned, nor lost by the policy
        other = _prompt(2 * CHUNK, 40 + index)
        cache.store(other, prefix_kv(other))
    assert cache.stats().pinned == 0


def test_leased_chunks_survive_stores_and_clear() -> None:
    cache = _cache(slots=4)
    a = _prompt(2 * CHUNK, 1)
    cache.store(a, prefix_kv(a))
    with cache.lease(a) as lease:
        assert lease.num_tokens == 2 * CHUNK
        assert len(lease.chunks) == 2
        for index in range(5):
            other = _prompt(3 * CHUNK, 10 + index)
            assert cache.store(other, prefix_kv(other)) == 2 * CHUNK  # two free slots only
        assert cache.clear() == 2
        assert cache.lookup(a) == 2 * CHUNK
        got = np.concatenate([obj.as_numpy() for obj in lease.chunks], axis=2)
        assert got.tobytes() == prefix_kv(a).tobytes()
        assert cache.stats().leased == 2
    assert lease.released
    assert cache.stats().leased == 0
    assert cache.clear() == 2
    assert cache.stats().chunks == 0


def test_discard_keys_drops_unpinned_leaves_only() -> None:
    cache = _cache(slots=8)
    a = _prompt(3 * CHUNK, 1)
    b = _prompt(CHUNK, 2)
    cache.store(a, prefix_kv(a))
    cache.store(b, prefix_kv(b))
    ka, kb = cache.keys(a), cache.keys(b)
    # a parent (a's first two chunks have children) stays; a leased leaf stays; unknown keys are ignored
    with cache.lease(b):
        assert cache.discard_keys([ka[0], ka[1], kb[0], b"\0" * KEY_BYTES]) == []
    assert cache.discard_keys([ka[2], kb[0], kb[0]]) == [ka[2], kb[0]]
    assert cache.lookup(a) == 2 * CHUNK
    assert cache.lookup(b) == 0
    assert cache.discard_keys([ka[0], ka[1]]) == [ka[1]]  # ka[0] still had its child when it was asked
    assert cache.discard_keys(ka[::-1]) == [ka[0]]
    cache.store(a, prefix_kv(a))
    assert cache.discard_keys(ka[::-1]) == ka[::-1]  # children first: each parent is a leaf by its turn
    stats = cache.stats()
    assert (stats.chunks, stats.cleared, stats.evicted) == (0, 7, 0)
    assert cache.store(a, prefix_kv(a)) == 3 * CHUNK  # the slots came back
    with pytest.raises(ConfigError, match="every key must be 16 bytes"):
        cache.discard_keys([b"short"])
    with pytest.raises(ConfigError, match="not one key"):
        cache.discard_keys(cache.keys(a)[0])  # type: ignore[arg-type]
    assert cache.stats().chunks == 3  # nothing dropped


def test_leases_count_and_release_is_idempotent() -> None:
    cache = _cache(slots=2)
    a = _prompt(CHUNK, 1)
    cache.store(a, prefix_kv(a))
    first, second = cache.lease(a), cache.lease(a)
    first.release()
    first.release()
    assert cache.stats().leased == 1
    b = _prompt(2 * CHUNK, 2)
    assert cache.store(b, prefix_kv(b)) == CHUNK  # a is still leased by `second`
    second.release()
    assert cache.stats().leased == 0
    assert cache.store(b, prefix_kv(b)) == 2 * CHUNK  # now a is evictable
    assert cache.lookup(a) == 0
    miss = cache.lease(a)
    assert (miss.num_tokens, miss.chunks) == (0, [])
    miss.release()


def test_store_stops_when_the_user_holds_the_slots() -> None:
    pool = cache_pool(slots=3)
    cache = ChunkCache(pool)
    held = [pool.allocate(np.zeros((2, 2, 16, 2, 8), np.float16)) for _ in range(2)]
    tokens = _prompt(3 * CHUNK)
    assert cache.store(tokens, prefix_kv(tokens)) == CHUNK
    assert pool.stats().used == 3
    for obj in held:
        pool.free(obj)  # type: ignore[arg-type]
    assert cache.store(tokens, prefix_kv(tokens)) == 3 * CHUNK


def test_a_cached_partial_chunk_is_a_separate_leaf() -> None:
    cache = _cache()
    tokens = _prompt(2 * CHUNK)
    short = tokens[: CHUNK + 4]
    cache.store(short, prefix_kv(short))
    assert cache.lookup(tokens) == CHUNK
    assert cache.store(tokens, prefix_kv(tokens)) == 2 * CHUNK
    assert cache.lookup(short) == CHUNK + 4
    assert cache.stats().chunks == 3
    out, n = cache.retrieve(short)
    assert n == CHUNK + 4
    assert out.tobytes() == prefix_kv(short).tobytes()


def test_a_failed_copy_leaves_nothing_half_written(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(slots=4)
    tokens = _prompt(3 * CHUNK)
    original = ChunkCopies.copy_in
    calls = []

    def failing_copy(copies: ChunkCopies, obj: Any, piece: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            obj.as_numpy()[...] = 1  # half a chunk written, then the copy fails
            raise OSError("device lost")
        original(copies, obj, piece)

    monkeypatch.setattr(ChunkCopies, "copy_in", failing_copy)
    with pytest.raises(OSError, match="device lost"):
        cache.store(tokens, prefix_kv(tokens))
    assert cache.lookup(tokens) == CHUNK
    stats = cache.stats()
    assert (stats.chunks, stats.pinned, stats.stored) == (1, 0, 1)
    assert cache.pool.stats().used == 1


def test_stats_is_a_frozen_snapshot() -> None:
    stats = _cache().stats()
    assert stats == CacheStats(0, 0, 0, 0, 0, 0, 0, 0)
    assert stats.hit_rate == 0.0
    with pytest.raises(AttributeError):
        stats.chunks = 1  # type: ignore[misc]


# -- bad inputs ------------------------------------------------------------------------------------------
class _Odd:
    """Not an array, not a sequence."""


TOKEN_CASES: list[tuple[str, Any, type[Exception], str]] = [
    ("None", None, TokensTypeError, "1-D sequence of integer token ids"),
    ("scalar", 7, TokensTypeError, "got a int"),
    ("numpy scalar", np.int64(7), TokensTypeError, "got a int64"),
    ("string", "hello", TokensTypeError, "got a str"),
    ("bytes", b"\x01\x02", TokensTypeError, "got a bytes"),
    ("floats", [1.0, 2.0], TokensTypeError, "dtype float64"),
    ("float array", np.arange(4, dtype=np.float32), TokensTypeError, "dtype float32"),
    ("bools", [True, False], TokensTypeError, "dtype bool"),
    ("strings", ["1", "2"], TokensTypeError, "dtype <U1"),
    ("mixed", [1, "2"], TokensTypeError, "dtype <U21"),
    ("objects", [_Odd()], TokensTypeError, "dtype object"),
    ("beyond int64", [2**70], TokensValueError, "fit in int64"),
    ("2**64", [2**64], TokensValueError, "fit in int64"),
    ("below int64", [-(2**63) - 1], TokensValueError, "fit in int64"),
    ("a bool among ints", [5, True, 7], TokensTypeError, "a bool is not a token id"),
    ("False among ints", (0, False), TokensTypeError, "a bool is not a token id"),
    ("a numpy bool among ints", [5, np.True_, 7], TokensTypeError, "a bool is not a token id"),
    ("uint64 overflow", np.array([2**63], dtype=np.uint64), TokensValueError, "fit in int64"),
    ("nested", [[1, 2], [3, 4]], TokensValueError, "must be 1-D"),
    ("0-d array", np.array(5), TokensValueError, "must be 1-D"),
    ("ragged", [[1, 2], [3]], TokensValueError, "flat sequence"),
    ("not a sequence", _Odd(), TokensTypeError, "dtype object"),
]


def _snapshot(cache: ChunkCache) -> tuple[CacheStats, list[bytes], int]:
    return cache.stats(), sorted(cache.cached_keys()), cache.pool.stats().used


@pytest.mark.parametrize(
    ("label", "tokens", "error", "message"), TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES]
)
def test_bad_tokens_raise_and_change_nothing(label: str, tokens: Any, error: type, message: str) -> None:
    cache = _cache()
    good = _prompt(CHUNK + 3)
    cache.store(good, prefix_kv(good))
    before = _snapshot(cache)
    kv = np.zeros((2, 2, 2, 2, 8), np.float16)
    calls: list[Callable[[], Any]] = [
        lambda: cache.keys(tokens),
        lambda: cache.lookup(tokens),
        lambda: cache.store(tokens, kv),
        lambda: cache.retrieve(tokens),
        lambda: cache.lease(tokens),
    ]
    for call in calls:
        with pytest.raises(error, match=message) as info:
            call()
        assert isinstance(info.value, MemPoolError)
        assert _snapshot(cache) == before


def test_bad_token_tensors_raise() -> None:
    torch = require("torch")
    cache = _cache()
    with pytest.raises(TokensTypeError, match="bfloat16"):
        cache.keys(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(TokensTypeError, match="dtype bool"):
        cache.keys(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TokensValueError, match="1-D"):
        cache.keys(torch.zeros((2, 2), dtype=torch.int64))


L_, K_, _T, H_, D_ = SMALL_SHAPE
KV_CASES: list[tuple[str, Callable[[int], Any], type[Exception], str]] = [
    ("not an array", lambda t: [[0.0]] * t, ChunkTypeError, "expected an array"),
    (
        "too few tokens",
        lambda t: np.zeros((L_, K_, t - 1, H_, D_), np.float16),
        ChunkShapeError,
        "tokens has",
    ),
    (
        "too many tokens",
        lambda t: np.zeros((L_, K_, t + 1, H_, D_), np.float16),
        ChunkShapeError,
        "tokens has",
    ),
    ("4 dims", lambda t: np.zeros((L_, K_, t, H_ * D_), np.float16), ChunkShapeError, "expected"),
    ("wrong heads", lambda t: np.zeros((L_, K_, t, H_ + 1, D_), np.float16), ChunkShapeError, "expected"),
    ("wrong dtype", lambda t: np.zeros((L_, K_, t, H_, D_), np.float32), ChunkShapeError, "dtype float32"),
    ("unsupported dtype", lambda t: np.zeros((L_, K_, t, H_, D_), np.int64), MemPoolError, "int64"),
]


@pytest.mark.parametrize(("label", "make", "error", "message"), KV_CASES, ids=[c[0] for c in KV_CASES])
def test_bad_kv_raises_before_anything_is_stored(
    label: str, make: Callable[[int], Any], error: type, message: str
) -> None:
    cache = _cache(slots=4)
    good = _prompt(CHUNK)
    cache.store(good, prefix_kv(good))
    before = _snapshot(cache)
    tokens = _prompt(2 * CHUNK + 1, seed=9)
    with pytest.raises(error, match=message):
        cache.store(tokens, make(len(tokens)))
    assert _snapshot(cache) == before


def test_bad_out_and_framework_raise_before_any_copy() -> None:
    cache = _cache()
    tokens = _prompt(2 * CHUNK)
    cache.store(tokens, prefix_kv(tokens))
    before = _snapshot(cache)
    short = np.full((2, 2, 2 * CHUNK - 1, 2, 8), 5, np.float16)
    cases: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: cache.retrieve(tokens, out=short), ChunkShapeError, "at least 32 tokens"),
        (
            lambda: cache.retrieve(tokens, out=np.zeros((2, 2, 40, 2, 8), np.float32)),
            ChunkShapeError,
            "dtype",
        ),
        (lambda: cache.retrieve(tokens, out=np.zeros((2, 2, 40, 2), np.float16)), ChunkShapeError, "5 dims"),
        (lambda: cache.retrieve(tokens, out=[0] * 4), ChunkTypeError, "expected an array"),
        (lambda: cache.retrieve(tokens, framework="tensorflow"), ConfigError, "framework must be one of"),
        (
            lambda: cache.retrieve(tokens, out=np.zeros((2, 2, 40, 2, 8), np.float16), framework="torch"),
            ConfigError,
            "one or the other",
        ),
    ]
    readonly = np.zeros((2, 2, 40, 2, 8), np.float16)
    readonly.flags.writeable = False
    cases.append((lambda: cache.retrieve(tokens, out=readonly), ChunkTypeError, "read-only"))
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert _snapshot(cache) == before
    assert (short == 5).all()


def test_jax_out_is_refused() -> None:
    jnp = require("jax").numpy
    cache = _cache()
    tokens = _prompt(CHUNK)
    cache.store(tokens, prefix_kv(tokens))
    with pytest.raises(ChunkTypeError, match="immutable"):
        cache.retrieve(tokens, out=jnp.zeros((2, 2, CHUNK, 2, 8), jnp.float16))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ConfigError, match="needs a LocalPool"):
        ChunkCache(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="namespace must be a str"):
        ChunkCache(cache_pool(), namespace=b"x")  # type: ignore[arg-type]


def test_empty_prompts_are_valid_and_cached_nowhere() -> None:
    cache = _cache()
    assert cache.store([], np.zeros((2, 2, 0, 2, 8), np.float16)) == 0
    assert (cache.lookup([]), cache.retrieve([]), len(cache)) == (0, (None, 0), 0)
    with cache.lease(np.array([], dtype=np.int64)) as lease:
        assert (lease.num_tokens, lease.chunks) == (0, [])


def test_the_cache_imports_no_framework() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from lmcache.chunk_cache import ChunkCache
        from lmcache.config import LMCacheMemPoolMetadata
        from lmcache.storage_backend.mem_pool import LocalCPUPool
        meta = LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "bfloat16", 0.001)
        cache = ChunkCache(LocalCPUPool(meta, backend="numpy"))
        kv = np.ones((2, 2, 20, 2, 8), dtype=meta.dtype.numpy_dtype)
        assert cache.store(list(range(20)), kv) == 20
        out, n = cache.retrieve(range(20))
        with cache.lease((0, 1, 2)) as lease:
            pass
        assert n == 20 and out.tobytes() == kv.tobytes()
        bad = [m for m in ("torch", "jax", "jaxlib") if m in sys.modules]
        print("imported:", bad)
        sys.exit(1 if bad else 0)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "adapters"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_kvobj_kept_from_a_released_lease_goes_stale_once_evicted(backend: str) -> None:
    """An evicted slot goes back to the pool before its next chunk takes it, so a handle kept from a
    released lease can never read the next chunk's bytes (found by review: it stayed live)."""
    from lmcache.errors import StaleHandleError

    require(backend)
    cache = ChunkCache(cache_pool(backend, slots=2))
    first = list(range(CHUNK))
    cache.store(first, prefix_kv(first))
    with cache.lease(first) as lease:
        kept = lease.chunks[0]
        assert same_bits(kept.data, prefix_kv(first))
    for seed in (1, 2):  # two more one-chunk prompts: the pool of 2 slots evicts `first`
        other = [seed * 10_000 + i for i in range(CHUNK)]
        assert cache.store(other, prefix_kv(other)) == CHUNK
    assert cache.lookup(first) == 0
    with pytest.raises(StaleHandleError):
        kept.data  # noqa: B018
    with pytest.raises(StaleHandleError):
        kept.as_numpy()
