"""A table of bad inputs: each raises the promised exception with a helpful message and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvtest import SMALL_SHAPE, forge, random_bits, small_pool, to_native
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import (
    ChunkShapeError,
    ChunkTypeError,
    ConfigError,
    DoubleFreeError,
    ForeignHandleError,
    InvalidHandleError,
    PoolClosedError,
    PoolTooLargeError,
    StaleHandleError,
)
from lmcache.storage_backend.mem_pool import KVObj, LocalCPUBufferPool, LocalCPUPool

META_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("4 dims", lambda: LMCacheMemPoolMetadata((2, 2, 16, 2), "float16", 1), ConfigError, "5 dims"),
    (
        "zero dim",
        lambda: LMCacheMemPoolMetadata((2, 2, 0, 2, 8), "float16", 1),
        ConfigError,
        r"kv_shape\[2\]",
    ),
    (
        "float dim",
        lambda: LMCacheMemPoolMetadata((2, 2, 1.5, 2, 8), "float16", 1),
        ConfigError,
        "positive int",
    ),
    ("kv axis 3", lambda: LMCacheMemPoolMetadata((2, 3, 16, 2, 8), "float16", 1), ConfigError, "2 .K and V."),
    ("shape str", lambda: LMCacheMemPoolMetadata("22", "float16", 1), ConfigError, "sequence of 5 ints"),
    (
        "dtype",
        lambda: LMCacheMemPoolMetadata(SMALL_SHAPE, "complex64", 1),
        ConfigError,
        "unsupported kv_dtype",
    ),
    (
        "dtype obj",
        lambda: LMCacheMemPoolMetadata(SMALL_SHAPE, object(), 1),
        ConfigError,
        "unsupported kv_dtype",
    ),
    ("negative", lambda: LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", -1), ConfigError, "positive"),
    ("NaN size", lambda: LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", float("nan")), ConfigError, "finite"),
    ("inf size", lambda: LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", float("inf")), ConfigError, "finite"),
    ("str size", lambda: LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", "1"), ConfigError, "number of GiB"),
    (
        "too small",
        lambda: LocalCPUPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 1e-9)),
        ConfigError,
        "smaller than one chunk slot",
    ),
    (
        "too large",
        lambda: LocalCPUPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 2**20)),
        PoolTooLargeError,
        "GiB of host memory is available",
    ),
    ("not metadata", lambda: LocalCPUPool({"kv_shape": SMALL_SHAPE}), ConfigError, "LMCacheMemPoolMetadata"),
    (
        "bad backend",
        lambda: LocalCPUPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001), backend="tf"),
        ConfigError,
        "unknown backend",
    ),
    (
        "bad alignment",
        lambda: LocalCPUPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001), slot_alignment=100),
        ConfigError,
        "power of two",
    ),
]


@pytest.mark.parametrize(("case", "make", "error", "message"), META_CASES, ids=[c[0] for c in META_CASES])
def test_bad_metadata_and_options(
    case: str, make: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


def _cases(backend: str) -> list[tuple[str, Callable[[Any, Any], Any], type[Exception], str]]:
    """Calls on a pool with one live KVObj ``obj`` (and ``other``, a live KVObj of another pool)."""

    def chunk(tokens: int = 16, dtype: str = "float16", shape: tuple[int, ...] | None = None) -> Any:
        return to_native(random_bits(shape or (2, 2, tokens, 2, 8), dtype), backend)

    return [
        ("ndim 4", lambda p, o: p.allocate(chunk(shape=(2, 2, 16, 2))), ChunkShapeError, "5 dims"),
        ("layers", lambda p, o: p.allocate(chunk(shape=(3, 2, 16, 2, 8))), ChunkShapeError, "dim 0"),
        ("heads", lambda p, o: p.allocate(chunk(shape=(2, 2, 16, 3, 8))), ChunkShapeError, "dim 3"),
        ("head size", lambda p, o: p.allocate(chunk(shape=(2, 2, 16, 2, 4))), ChunkShapeError, "dim 4"),
        ("0 tokens", lambda p, o: p.allocate(chunk(shape=(2, 2, 0, 2, 8))), ChunkShapeError, "1..16 tokens"),
        ("17 tokens", lambda p, o: p.allocate(chunk(17)), ChunkShapeError, "1..16 tokens"),
        ("dtype", lambda p, o: p.allocate(chunk(dtype="float32")), ChunkShapeError, "dtype float32"),
        ("not array", lambda p, o: p.allocate([1, 2, 3]), ChunkTypeError, "array-like"),
        ("None", lambda p, o: p.allocate(None), ChunkTypeError, "NoneType"),
        ("batch str", lambda p, o: p.allocate_batch("abc"), ChunkTypeError, "sequence of arrays"),
        ("batch bad", lambda p, o: p.allocate_batch([chunk(), chunk(17)]), ChunkShapeError, "tokens"),
        ("put dtype", lambda p, o: p.put(chunk(dtype="int8")), ChunkShapeError, "dtype int8"),
        ("free None", lambda p, o: p.free(None), ForeignHandleError, "takes a KVObj"),
        ("hand-built", lambda p, o: p.free(KVObj(0, 1, None)), ForeignHandleError, "built by hand"),
        ("foreign", lambda p, o: p.free(o[1]), ForeignHandleError, "another pool"),
        ("double", lambda p, o: p.free(o[2]), DoubleFreeError, "double free"),
        ("stale", lambda p, o: p.free(o[3]), StaleHandleError, "handed out again"),
        ("edited idx", lambda p, o: p.free(_edited(o[0])), InvalidHandleError, "stale|double"),
        ("idx -1", lambda p, o: p.free(_edited(o[0], -1)), StaleHandleError, "not an int in this pool"),
        ("idx 99", lambda p, o: p.free(_edited(o[0], 99)), StaleHandleError, "not an int in this pool"),
        ("batch -1", lambda p, o: p.free_batch([o[0], _edited(o[0], -1)]), StaleHandleError, "not an int in"),
        ("batch dup", lambda p, o: p.free_batch([o[0], o[0]]), DoubleFreeError, "twice"),
        ("batch mixed", lambda p, o: p.free_batch([o[0], o[2]]), DoubleFreeError, "double free"),
        ("copy shape", lambda p, o: o[0].copy_from(chunk(8)), ChunkShapeError, "shape"),
        ("copy dtype", lambda p, o: o[0].copy_from(chunk(dtype="float32")), ChunkShapeError, "dtype"),
        ("copy list", lambda p, o: o[0].copy_from([[1]]), ChunkTypeError, "expected an array"),
        ("stale view", lambda p, o: o[2].as_numpy(), StaleHandleError, "was freed"),
        ("stale data", lambda p, o: o[2].data, StaleHandleError, "was freed"),
        ("stale copy", lambda p, o: o[3].copy_from(chunk()), StaleHandleError, "handed out again"),
        ("hand view", lambda p, o: KVObj(0, 1, None).as_torch(), ForeignHandleError, "built by hand"),
    ]


def _edited(obj: KVObj, chunk_idx: int | None = None) -> KVObj:
    """A copy of a live handle edited to name another slot (the neighbouring one by default)."""
    slot = obj.chunk_idx + 1 if chunk_idx is None else chunk_idx
    return forge(obj.pool, slot, obj.num_tokens, obj.generation)


def _scenario(backend: str) -> tuple[Any, list[Any], Any]:
    pool = small_pool(backend, slots=4)
    other = small_pool(backend, slots=1)
    full = to_native(random_bits((2, 2, 16, 2, 8), "float16", seed=1), backend)
    live = pool.put(full)
    neighbour = pool.put(full)  # the slot an edited handle points at
    freed = pool.allocate(full)
    pool.free(freed)
    stale = pool.allocate(full)
    pool.free(stale)
    pool.allocate(full)  # reuses stale's slot
    foreign = other.allocate(full)
    # freed and stale both named slot 2 at different times; give the double-free case its own slot
    double = pool.allocate(full)
    pool.free(double)
    assert neighbour is not None
    return pool, [live, foreign, double, stale], other


CALL_CASES = [case[0] for case in _cases("numpy")]


@pytest.mark.parametrize("case", CALL_CASES)
def test_bad_calls_raise_and_change_nothing(backend: str, case: str) -> None:
    _, call, error, message = next(c for c in _cases(backend) if c[0] == case)
    pool, objs, _other = _scenario(backend)
    before = pool.stats()
    content = objs[0].clone("numpy")
    with pytest.raises(error, match=message) as info:
        call(pool, objs)
    assert str(info.value), "errors must carry a message"
    assert pool.stats() == before, f"{case}: the pool changed"
    assert objs[0].is_live
    assert np.array_equal(objs[0].clone("numpy").view("u2"), content.view("u2"))


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_buffer_pool_rejects_bad_timeouts(timeout: object) -> None:
    pool = LocalCPUBufferPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001), backend="numpy")
    before = pool.stats()
    with pytest.raises(ConfigError, match="timeout must be a number of seconds"):
        pool.allocate(random_bits((2, 2, 16, 2, 8), "float16"), timeout=timeout)  # type: ignore[arg-type]
    assert pool.stats() == before


def test_calls_after_close(backend: str) -> None:
    pool, objs, _ = _scenario(backend)
    pool.close()
    chunk = to_native(random_bits((2, 2, 16, 2, 8), "float16"), backend)
    for call in (
        lambda: pool.allocate(chunk),
        lambda: pool.put(chunk),
        lambda: pool.allocate_batch([chunk]),
        lambda: pool.free(objs[0]),
        lambda: pool.free_batch([objs[0]]),
        lambda: objs[0].copy_from(chunk),
        lambda: pool.arena,
    ):
        with pytest.raises(PoolClosedError, match="closed"):
            call()


def test_numpy_sources_with_negative_or_odd_strides_copy_correctly(backend: str) -> None:
    pool = small_pool(backend)
    base = random_bits((2, 2, 32, 2, 8), "float16", seed=9)
    for src in (base[:, :, ::-2], base[:, :, 1::2], base[::-1, :, :16]):
        obj = pool.put(src)
        assert obj is not None
        assert np.array_equal(obj.clone("numpy"), src)
