"""The chunk cache on GPU pools and with device arrays (skipped without a GPU).

Every pair of (pool backend, pool device) and (source framework, device) stores and retrieves the same
bytes, bf16 and fp8 included; retrieve gives arrays on the pool's device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cachetest import prefix_kv
from kvtest import require_gpu, same_bits, to_host
from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.storage_backend.mem_pool import LocalCPUPool, LocalGPUPool

SHAPE = (4, 2, 64, 8, 128)  # 1 MiB bf16 chunks
TOKENS = 2 * 64 + 17


def _pool(backend: str, device: str, dtype: str) -> Any:
    meta = LMCacheMemPoolMetadata(SHAPE, dtype, 0.05)
    if device == "gpu":
        return LocalGPUPool(meta, backend=backend)
    return LocalCPUPool(meta, backend=backend)


def _source(kv: np.ndarray, framework: str) -> Any:
    if framework == "numpy":
        return kv
    if framework == "torch":
        torch = require_gpu("torch")
        bits = np.ascontiguousarray(kv).view(f"u{kv.dtype.itemsize}")
        return torch.from_numpy(bits.copy()).view(getattr(torch, kv.dtype.name)).cuda()
    jax = require_gpu("jax")
    return jax.device_put(kv, next(d for d in jax.devices() if d.platform != "cpu"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float16"])
@pytest.mark.parametrize("source", ["numpy", "torch", "jax"])
@pytest.mark.parametrize(("backend", "device"), [("torch", "gpu"), ("jax", "gpu"), ("torch", "cpu")])
def test_store_and_retrieve_with_device_memory(backend: str, device: str, source: str, dtype: str) -> None:
    require_gpu(backend)
    tokens = list(range(TOKENS))
    kv = prefix_kv(tokens, dtype, SHAPE)
    cache = ChunkCache(_pool(backend, device, dtype))
    assert cache.store(tokens, _source(kv, source)) == TOKENS
    for framework in ("numpy", "torch", "jax"):
        if framework != "numpy":
            require_gpu(framework)
        out, n = cache.retrieve(tokens, framework=framework)
        assert n == TOKENS
        assert same_bits(out, kv), f"{framework} retrieve of a {backend} {device} pool"
    native, _ = cache.retrieve(tokens)
    if device == "gpu" and backend == "torch":
        assert native.is_cuda
    if device == "gpu" and backend == "jax":
        assert all(d.platform != "cpu" for d in native.devices())


@pytest.mark.parametrize(("backend", "device"), [("torch", "gpu"), ("jax", "gpu"), ("torch", "cpu")])
def test_retrieve_into_device_and_host_out(backend: str, device: str) -> None:
    torch = require_gpu("torch")
    require_gpu(backend)
    tokens = list(range(TOKENS))
    kv = prefix_kv(tokens, "bfloat16", SHAPE)
    cache = ChunkCache(_pool(backend, device, "bfloat16"))
    cache.store(tokens, kv)
    L, K, _, H, D = SHAPE
    for out in (
        torch.zeros((L, K, TOKENS + 5, H, D), dtype=torch.bfloat16, device="cuda"),
        torch.zeros((L, K, TOKENS + 5, H, D), dtype=torch.bfloat16),
        np.zeros((L, K, TOKENS + 5, H, D), dtype=kv.dtype),
    ):
        result, n = cache.retrieve(tokens, out=out)
        assert (result is out, n) == (True, TOKENS)
        host = to_host(out)
        assert host[:, :, :n].tobytes() == kv.tobytes()
        assert np.count_nonzero(host[:, :, n:].astype(np.float32)) == 0


def test_leased_gpu_chunks_are_device_views() -> None:
    torch = require_gpu("torch")
    tokens = list(range(TOKENS))
    kv = prefix_kv(tokens, "bfloat16", SHAPE)
    pool = _pool("torch", "gpu", "bfloat16")
    cache = ChunkCache(pool)
    cache.store(tokens, kv)
    with cache.lease(tokens) as lease:
        views = [obj.as_torch() for obj in lease.chunks]
        assert all(v.is_cuda for v in views)
        assert [v.data_ptr() for v in views] == [pool.slot_address(o.chunk_idx) for o in lease.chunks]
        assert same_bits(torch.cat(views, dim=2), kv)
