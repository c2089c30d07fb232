"""The sglang-jax adapter (adapters/lmcache_sglang_jax) against sglang-jax's own ``HostKVPool`` ABC.

sglang-jax is pinned to commit cddbf6f1 of github.com/sgl-project/sglang-jax (PyPI's sglang-jax 0.0.2
predates the host pool). The "device" KV buffers are JAX CPU arrays in sglang-jax's per-layer layout
``(pages, page_size, 2 * num_kv_heads, head_dim)`` (fused K/V); a layer of an entry is its padded pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvtest import require

PAGE_SHAPE = (4, 2 * 2, 16)  # page_size 4, 2 KV heads fused K/V, head_dim 16


@pytest.fixture(autouse=True)
def _needs_jax_and_sglang_jax() -> None:
    """Every case here drives sglang-jax's ABC with JAX arrays: skip (or fail, where required) without."""
    require("jax")
    require("sgl_jax")


def _pool(pool_size: int = 3, max_pages: int = 5, layer_num: int = 3, dtype: Any = "bfloat16") -> Any:
    require("jax")
    require("sgl_jax")
    from lmcache_sglang_jax import LMCacheHostKVPool

    return LMCacheHostKVPool(pool_size, max_pages, layer_num, PAGE_SHAPE, dtype)


def _layers(pages: int, layer_num: int, dtype: str, seed: int) -> list[Any]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**16, size=(layer_num, pages, *PAGE_SHAPE), dtype=np.uint16)
    if dtype == "float32":
        bits = rng.integers(0, 2**32, size=(layer_num, pages, *PAGE_SHAPE), dtype=np.uint32)
    cpu = jax.devices("cpu")[0]
    return [jax.device_put(jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.dtype(dtype)), cpu) for b in bits]


def _bits(array: Any) -> np.ndarray:
    host = np.asarray(array)
    return host.view(np.uint16 if host.dtype.itemsize == 2 else np.uint32)


def test_is_a_host_kv_pool() -> None:
    pool = _pool()
    from sgl_jax.srt.mem_cache.host_kv_pool import HostKVPool

    assert isinstance(pool, HostKVPool)
    assert pool.total_size() == pool.available_size() == 3
    pool.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("pages", [1, 3, 5])
def test_device_host_device_bytes_exact(dtype: str, pages: int) -> None:
    import jax

    pool = _pool(dtype=dtype)
    layers = _layers(pages, 3, dtype, seed=pages)
    buffer_id = pool.reserve()
    assert buffer_id is not None
    staged = pool.copy_from_device(layers, buffer_id)
    assert staged.buffer_id == buffer_id
    back = [jax.device_put(a, jax.devices()[0]) for a in staged.array_pytree]  # host -> "device"
    for src, got, slot in zip(layers, back, pool.read_slot(buffer_id, pages), strict=True):
        assert got.shape == src.shape
        assert got.dtype == src.dtype
        np.testing.assert_array_equal(_bits(got), _bits(src))
        np.testing.assert_array_equal(_bits(slot), _bits(src))  # the bytes live in the LMCache slot
    pool.release(buffer_id)
    pool.close()


def test_entries_do_not_overlap() -> None:
    pool = _pool()
    ids = [pool.reserve() for _ in range(3)]
    sets = {i: _layers(5, 3, "bfloat16", seed=10 + k) for k, i in enumerate(ids)}
    for i, layers in sets.items():
        pool.copy_from_device(layers, i)
    for i, layers in sets.items():
        for src, slot in zip(layers, pool.read_slot(i, 5), strict=True):
            np.testing.assert_array_equal(_bits(slot), _bits(src))
    pool.close()


def test_reserve_never_hands_a_slot_twice() -> None:
    pool = _pool(pool_size=4)
    rng = np.random.default_rng(0)
    held: set[int] = set()
    for _ in range(400):
        if held and (len(held) == 4 or rng.random() < 0.45):
            victim = sorted(held)[int(rng.integers(len(held)))]
            pool.release(victim)
            held.remove(victim)
        else:
            got = pool.reserve()
            assert got is not None
            assert got not in held
            assert 0 <= got < 4
            held.add(got)
        assert pool.available_size() == 4 - len(held)
    while len(held) < 4:
        got = pool.reserve()
        assert got is not None
        assert got not in held
        held.add(got)
    assert pool.reserve() is None
    assert pool.available_size() == 0
    pool.close()


def test_release_errors_leave_state_unchanged() -> None:
    from lmcache.errors import DoubleFreeError, InvalidHandleError

    pool = _pool()
    b = pool.reserve()
    assert b is not None
    with pytest.raises(InvalidHandleError, match="outside the pool's range"):
        pool.release(99)
    with pytest.raises(InvalidHandleError, match="must be an int"):
        pool.release("0")  # type: ignore[arg-type]
    free_id = next(i for i in range(3) if i != b)
    with pytest.raises(DoubleFreeError, match="not reserved"):
        pool.release(free_id)
    assert pool.available_size() == 2
    pool.release(b)
    with pytest.raises(DoubleFreeError):
        pool.release(b)
    assert pool.available_size() == 3
    pool.close()


def test_copy_from_device_rejects_bad_layers_and_keeps_the_slot() -> None:
    import jax.numpy as jnp

    from lmcache.errors import ChunkShapeError, DoubleFreeError

    pool = _pool()
    b = pool.reserve()
    assert b is not None
    good = _layers(2, 3, "bfloat16", seed=1)
    pool.copy_from_device(good, b)
    with pytest.raises(ChunkShapeError, match="3 layers"):
        pool.copy_from_device(good[:2], b)
    with pytest.raises(ChunkShapeError, match="max_padded_pages"):
        pool.copy_from_device(_layers(6, 3, "bfloat16", seed=2), b)
    with pytest.raises(ChunkShapeError, match="dtype"):
        pool.copy_from_device([layer.astype(jnp.float32) for layer in good], b)
    ragged = [*good[:2], jnp.zeros((2, 4, 4, 8), jnp.bfloat16)]
    with pytest.raises(ChunkShapeError, match="layer 2 has shape"):
        pool.copy_from_device(ragged, b)
    with pytest.raises(DoubleFreeError):
        pool.copy_from_device(good, (b + 1) % 3)
    for src, slot in zip(good, pool.read_slot(b, 2), strict=True):
        np.testing.assert_array_equal(_bits(slot), _bits(src))
    pool.close()


def test_bad_config() -> None:
    require("sgl_jax")
    from lmcache.errors import ConfigError
    from lmcache_sglang_jax import LMCacheHostKVPool

    with pytest.raises(ConfigError, match="pool_size"):
        LMCacheHostKVPool(0, 5, 3, PAGE_SHAPE, "bfloat16")
    with pytest.raises(ConfigError, match="per_layer_shape"):
        LMCacheHostKVPool(2, 5, 3, (), "bfloat16")


def test_sglang_jax_own_pd_pool_cases() -> None:
    """sglang-jax's own QueueHostKVPool cases (TestABCExtensionDoesNotBreakPD) with our pool in its place."""
    import importlib
    import unittest

    require("jax")
    require("sgl_jax")
    from lmcache_sglang_jax import LMCacheHostKVPool

    cases = importlib.import_module("sglang_jax_upstream.host_kv_pool_cases")
    original = cases.QueueHostKVPool
    cases.QueueHostKVPool = LMCacheHostKVPool
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(cases.TestABCExtensionDoesNotBreakPD)
        result = unittest.TestResult()
        suite.run(result)
    finally:
        cases.QueueHostKVPool = original
    assert suite.countTestCases() == 3
    assert not result.errors, result.errors
    assert not result.failures, result.failures
    assert not result.skipped, result.skipped
    assert result.testsRun == 3
