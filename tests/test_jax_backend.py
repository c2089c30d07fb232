"""JAX specifics: lazy views, jitted gathers over the arena, lifetimes, and asynchronous dispatch."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvtest import pointer, random_bits, require, same_bits, small_pool, to_native


@pytest.fixture
def jax():  # type: ignore[no-untyped-def]
    return require("jax")


def test_views_are_made_on_first_access(jax) -> None:  # type: ignore[no-untyped-def]
    pool = small_pool("jax", dtype="bfloat16")
    obj = pool.allocate(to_native(random_bits((2, 2, 16, 2, 8), "bfloat16"), "jax"))
    assert obj is not None
    assert object.__getattribute__(obj, "_data") is None  # allocate built no JAX view
    view = obj.data
    assert isinstance(view, jax.Array)
    assert obj.data is view
    assert view.unsafe_buffer_pointer() == pool.slot_address(obj.chunk_idx)


def test_jitted_gather_over_the_arena(jax) -> None:  # type: ignore[no-untyped-def]
    from lmcache_jax import gather_chunks

    jnp = jax.numpy
    pool = small_pool("jax", dtype="bfloat16", slots=6)
    arena = pool.arena
    assert arena.shape == (6, pool.layout.slot_elems)
    assert arena.dtype == jnp.bfloat16
    assert pointer(arena) == pool.base_address
    chunks = [random_bits((2, 2, 16, 2, 8), "bfloat16", seed=s) for s in range(4)]
    objs = [pool.put(jnp.asarray(c)) for c in chunks]
    order = [2, 0, 3]
    got = gather_chunks(pool.arena, jnp.array([objs[i].chunk_idx for i in order]), pool.layout.kv_shape)
    assert got.shape == (3, *pool.layout.kv_shape)
    for row, i in enumerate(order):
        assert same_bits(got[row], chunks[i])

    @jax.jit
    def total(arena, idx):  # type: ignore[no-untyped-def]  # the documented pattern: arena as an argument
        return gather_chunks(arena, idx, pool.layout.kv_shape).astype(jnp.float32).sum()

    idx = jnp.array([objs[1].chunk_idx])
    before = float(total(pool.arena, idx))
    objs[1].copy_from(jnp.asarray(chunks[3]))
    after = float(total(pool.arena, idx))
    assert after == pytest.approx(float(chunks[3].astype(np.float32).sum()), rel=1e-3)
    assert before != after


def test_free_waits_for_computations_that_read_the_chunk(jax) -> None:  # type: ignore[no-untyped-def]
    """A computation launched on a view before its slot is freed and reused sees the old data."""
    jnp = jax.numpy
    meta_pool = small_pool("jax", dtype="float32", slots=1)
    old = random_bits((2, 2, 16, 2, 8), "float32", seed=1)
    new = random_bits((2, 2, 16, 2, 8), "float32", seed=2)

    @jax.jit
    def heavy(x):  # type: ignore[no-untyped-def]  # long enough to still run when the slot is reused
        for _ in range(40):
            x = jnp.tanh(x @ jnp.ones((8, 8), x.dtype) * 0.1) + x
        return x

    expected = np.asarray(heavy(jnp.asarray(old)))
    for _ in range(5):
        obj = meta_pool.put(jnp.asarray(old))
        result = heavy(obj.data)  # dispatched asynchronously
        meta_pool.free(obj, wait_for=result)  # the documented way: wait, then free
        reuse = meta_pool.put(jnp.asarray(new))  # same slot, overwritten at once
        assert reuse is not None
        assert reuse.chunk_idx == obj.chunk_idx
        np.testing.assert_array_equal(np.asarray(result), expected)
        meta_pool.free(reuse)


def test_views_outlive_the_pool(jax) -> None:  # type: ignore[no-untyped-def]
    pool = small_pool("jax", dtype="bfloat16")
    content = random_bits((2, 2, 16, 2, 8), "bfloat16", seed=8)
    obj = pool.put(jax.numpy.asarray(content))
    view = obj.data
    del obj, pool
    gc.collect()
    assert same_bits(view, content)


def test_process_exits_cleanly_with_views_alive(jax) -> None:  # type: ignore[no-untyped-def]
    code = textwrap.dedent(
        """
        import jax.numpy as jnp
        from lmcache.config import LMCacheMemPoolMetadata
        from lmcache.storage_backend.mem_pool import LocalCPUPool
        pool = LocalCPUPool(LMCacheMemPoolMetadata((2, 2, 16, 2, 8), jnp.bfloat16, 0.001))
        objs = [pool.put(jnp.ones((2, 2, n, 2, 8), jnp.bfloat16)) for n in (16, 3)]
        views = [o.data for o in objs] + [o.as_numpy() for o in objs] + [pool.arena]
        pending = [v.sum() for v in views[:2]]  # work still referencing views at exit
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def test_clone_is_independent(jax) -> None:  # type: ignore[no-untyped-def]
    pool = small_pool("jax", dtype="bfloat16")
    content = random_bits((2, 2, 16, 2, 8), "bfloat16", seed=3)
    obj = pool.put(jax.numpy.asarray(content))
    copy = obj.clone()
    assert pointer(copy) != pointer(obj.data)
    obj.copy_from(jax.numpy.zeros((2, 2, 16, 2, 8), jax.numpy.bfloat16))
    assert same_bits(copy, content)


def test_copy_into_jax_array_is_refused(jax) -> None:  # type: ignore[no-untyped-def]
    from lmcache.errors import ChunkTypeError

    pool = small_pool("jax", dtype="bfloat16")
    obj = pool.put(jax.numpy.zeros((2, 2, 16, 2, 8), jax.numpy.bfloat16))
    with pytest.raises(ChunkTypeError, match="immutable"):
        obj.copy_to(jax.numpy.zeros((2, 2, 16, 2, 8), jax.numpy.bfloat16))
