"""The LMCache v0 API end to end, on every backend: the foundation scenario and the pool's contract."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from kvtest import (
    kv_dtype_for,
    live_kvobjs,
    pointer,
    random_bits,
    require,
    require_no_gpu,
    same_bits,
    small_pool,
    to_native,
)
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import DoubleFreeError, PoolClosedError
from lmcache.storage_backend.mem_pool import (
    BasePool,
    KVObj,
    LocalCPUBufferPool,
    LocalCPUPool,
    LocalGPUPool,
    LocalPool,
    base_pool,
    local_pool,
)

LLAMA = (32, 2, 256, 8, 128)


def _chunk(backend: str, tokens: int) -> Any:
    """A shape-only stand-in chunk of the Llama shape (no 32 MiB allocation)."""
    shape = (32, 2, tokens, 8, 128)
    if backend == "torch":
        torch = require("torch")
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")
    if backend == "jax":
        jax = require("jax")
        return jax.ShapeDtypeStruct(shape, jax.numpy.bfloat16)
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype=ml_dtypes.bfloat16), shape, (0,) * 5)


def test_lmcache_v0_module_paths() -> None:
    assert base_pool.BasePool is BasePool
    assert base_pool.KVObj is KVObj
    for cls in (LocalPool, LocalCPUPool, LocalGPUPool, LocalCPUBufferPool):
        assert getattr(local_pool, cls.__name__) is cls
    assert issubclass(LocalCPUBufferPool, LocalCPUPool)
    assert issubclass(LocalCPUPool, LocalPool)
    assert issubclass(LocalGPUPool, LocalPool)
    assert issubclass(LocalPool, BasePool)


def test_kvobj_constructs_like_lmcache_v0() -> None:
    data = np.zeros((1, 2, 3, 1, 1))
    obj = KVObj(7, 4096, data)
    assert (obj.chunk_idx, obj.size, obj.data, obj.num_tokens, obj.pool) == (7, 4096, data, 3, None)
    assert not obj.is_live


def test_foundation_scenario(backend: str) -> None:
    """32 chunks of (32, 2, 256, 8, 128) bf16 in 1 GiB; None on the 33rd; partial views; double free."""
    meta = LMCacheMemPoolMetadata(LLAMA, kv_dtype_for(backend, "bfloat16"), 1)
    with LocalCPUPool(meta, backend=backend, pin_memory=False) as pool:
        assert pool.backend == backend
        assert pool.max_chunk_num == 32
        assert pool.chunk_size == 256
        assert pool.size_per_chunk == 32 * 2 * 256 * 8 * 128 * 2
        full = _chunk(backend, 256)
        objs = [pool.allocate(full) for _ in range(32)]
        assert all(obj is not None for obj in objs)
        assert len({obj.chunk_idx for obj in objs}) == 32
        assert pool.allocate(full) is None
        pool.free(objs.pop())
        again = pool.allocate(full)
        assert again is not None
        pool.free(again)
        partial = pool.allocate(_chunk(backend, 128))
        assert partial is not None
        view = partial.data
        assert tuple(view.shape) == (32, 2, 128, 8, 128)
        assert pointer(view) == pool.slot_address(partial.chunk_idx)
        src = to_native(random_bits((32, 2, 128, 8, 128), "bfloat16"), backend)
        if backend == "torch":
            assert view.is_contiguous()
            assert not view.is_inference()
            view.copy_(src)
        else:
            partial.copy_from(src)
        assert same_bits(partial.data, src)
        pool.free(partial)
        with pytest.raises(DoubleFreeError):
            pool.free(partial)


def test_backend_follows_the_dtype(backend: str) -> None:
    meta = LMCacheMemPoolMetadata(LLAMA, kv_dtype_for(backend, "bfloat16"), 1)
    with LocalCPUPool(meta, pin_memory=False) as pool:
        assert pool.backend == backend


def test_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_BACKEND", "numpy")
    with small_pool(backend=None) as pool:  # type: ignore[arg-type]
        assert pool.backend == "numpy"


def test_views_are_contiguous_aligned_and_inside_their_slot(backend: str) -> None:
    with small_pool(backend, slots=4) as pool:
        for tokens in (1, 7, 16):
            obj = pool.allocate(to_native(random_bits((2, 2, tokens, 2, 8), "float16"), backend))
            assert obj is not None
            assert obj.num_tokens == tokens
            assert pointer(obj.data) == pool.slot_address(obj.chunk_idx)
            assert pointer(obj.data) % 256 == 0
            assert obj.size == pool.size_per_chunk
        assert pool.base_address % 4096 == 0


def test_put_round_trips_and_returns_none_when_full(backend: str) -> None:
    with small_pool(backend, slots=2) as pool:
        chunks = [to_native(random_bits((2, 2, n, 2, 8), "float16", seed=n), backend) for n in (16, 5)]
        objs = [pool.put(chunk) for chunk in chunks]
        assert all(obj is not None for obj in objs)
        for obj, chunk in zip(objs, chunks, strict=False):
            assert same_bits(obj.data, chunk)
        assert pool.put(chunks[0]) is None
        assert pool.stats().failed_allocations == 1


def test_copy_to_and_clone(backend: str) -> None:
    with small_pool(backend) as pool:
        src = random_bits((2, 2, 9, 2, 8), "float16", seed=3)
        obj = pool.put(to_native(src, backend))
        assert obj is not None
        out = np.empty_like(src)
        obj.copy_to(out)
        assert same_bits(out, src)
        copy = obj.clone()
        assert same_bits(copy, src)
        assert pointer(copy) != pointer(obj.data)
        assert same_bits(obj.clone("numpy"), src)


def test_stats_count_every_operation(backend: str) -> None:
    with small_pool(backend, slots=3) as pool:
        chunk = to_native(random_bits((2, 2, 16, 2, 8), "float16"), backend)
        _a, b, _c = (pool.allocate(chunk) for _ in range(3))
        assert pool.allocate(chunk) is None
        pool.free(b)  # type: ignore[arg-type]
        stats = pool.stats()
        assert (stats.total, stats.used, stats.free, stats.peak_used) == (3, 2, 1, 3)
        assert (stats.allocations, stats.frees, stats.failed_allocations) == (3, 1, 1)
        assert stats.slot_bytes == pool.size_per_chunk


def test_batch_is_all_or_nothing(backend: str) -> None:
    with small_pool(backend, slots=4) as pool:
        chunk = to_native(random_bits((2, 2, 16, 2, 8), "float16"), backend)
        objs = pool.allocate_batch([chunk] * 3)
        assert objs is not None
        assert len({o.chunk_idx for o in objs}) == 3
        before = pool.stats()
        assert pool.allocate_batch([chunk] * 2) is None
        after = pool.stats()
        assert (after.used, after.free) == (before.used, before.free)
        assert after.failed_allocations == before.failed_allocations + 2
        pool.free_batch(objs)
        assert pool.stats().used == 0
        assert len(pool.allocate_batch([chunk] * 4) or []) == 4


def test_close_keeps_views_valid_and_refuses_calls(backend: str) -> None:
    pool = small_pool(backend)
    src = random_bits((2, 2, 16, 2, 8), "float16", seed=5)
    obj = pool.put(to_native(src, backend))
    assert obj is not None
    view = obj.data
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    assert same_bits(view, src)
    with pytest.raises(PoolClosedError):
        pool.allocate(src)
    with pytest.raises(PoolClosedError):
        pool.free(obj)
    with pytest.raises(PoolClosedError):
        obj.as_numpy()


def test_gpu_pool_without_accelerator_raises(backend: str) -> None:
    from lmcache.errors import ConfigError, DeviceUnavailableError

    require_no_gpu(backend)
    meta = LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "float16", 0.001)
    with pytest.raises(
        ConfigError if backend == "numpy" else DeviceUnavailableError, match=r"GPU|host memory"
    ):
        LocalGPUPool(meta, backend=backend)


def test_batches_build_handles_lazily_and_mix_with_single_frees(backend: str) -> None:
    from lmcache.errors import DoubleFreeError
    from lmcache.storage_backend.mem_pool import KVBatch

    with small_pool(backend, slots=6) as pool:
        chunks = [to_native(random_bits((2, 2, n, 2, 8), "float16", seed=n), backend) for n in (16, 3, 9)]
        before = live_kvobjs()
        batch = pool.allocate_batch(chunks)
        assert isinstance(batch, KVBatch)
        assert len(batch) == 3
        assert batch.num_tokens == (16, 3, 9)
        assert live_kvobjs() == before  # nothing built yet
        assert batch[-1] is batch[2]
        assert [obj.num_tokens for obj in batch] == [16, 3, 9]
        assert tuple(obj.chunk_idx for obj in batch[0:2]) == batch.chunk_idx[:2]
        for obj, chunk in zip(batch, chunks, strict=True):
            obj.copy_from(chunk)
            assert same_bits(obj.data, chunk)
        pool.free(batch[1])  # one handle freed on its own ...
        before = pool.stats()
        with pytest.raises(DoubleFreeError, match="double free"):  # ... so the batch is no longer whole
            pool.free_batch(batch)
        assert pool.stats() == before  # nothing freed
        pool.free_batch([batch[0], batch[2]])
        assert pool.stats().used == 0
        with pytest.raises(IndexError):
            batch[3]
