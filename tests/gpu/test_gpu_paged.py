"""Paged transfer with caches in GPU memory (skipped without a GPU).

A request is stored from a paged cache on the GPU into host and device pools, then loaded into another
GPU paged cache with other blocks; bytes are compared with the naive per-token reference, and every
position outside the loaded tokens must keep its bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvtest import SMALL_SHAPE, require_gpu, small_pool
from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.paged import block_table, describe
from lmcache.storage_backend.mem_pool import LocalGPUPool
from pagedtest import Paged, assert_same

L, KV, CHUNK, H, D = SMALL_SHAPE


def _on_gpu(paged: Paged) -> None:
    """Move a test cache to the GPU (its numpy reference stays on the host)."""
    layers = [paged.caches] if paged.layout == "stacked" else list(paged.caches)
    if paged.framework == "torch":
        moved = [layer.cuda() for layer in layers]
    else:
        jax = require_gpu("jax")
        device = next(d for d in jax.devices() if d.platform != "cpu")
        moved = [jax.device_put(layer, device) for layer in layers]
    paged.caches = moved[0] if paged.layout == "stacked" else moved


def _pool(backend: str, device: str) -> Any:
    if device == "cpu":
        return small_pool(backend, "float16", slots=8)
    meta = LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.01)
    return LocalGPUPool(meta, backend=backend)


@pytest.mark.parametrize(
    ("backend", "device"), [("numpy", "cpu"), ("torch", "cpu"), ("torch", "gpu"), ("jax", "gpu")]
)
@pytest.mark.parametrize(
    ("framework", "layout"),
    [("torch", "vllm"), ("torch", "stacked"), ("jax", "stacked"), ("jax", "interleaved")],
)
def test_store_and_load_gpu_caches(backend: str, device: str, framework: str, layout: str) -> None:
    require_gpu(framework)
    if backend != "numpy":
        require_gpu(backend)
    cache = ChunkCache(_pool(backend, device))
    tokens = list(range(45))
    source = Paged(framework, layout, (L, KV, 16, 6, H, D), "float16", seed=1)
    _on_gpu(source)
    src_ids = np.random.default_rng(0).permutation(16)
    assert cache.store_paged(tokens, source.caches, src_ids, layout=layout) == 45
    kv_bits = source.ref_gather(src_ids, 0, 45)
    target = Paged(framework, layout, (L, KV, 12, 4, H, D), "float16", seed=2)
    _on_gpu(target)
    dst_ids = np.random.default_rng(1).permutation(12)
    if framework == "torch":
        n = cache.load_paged(tokens, target.caches, dst_ids, layout=layout)
    else:
        target.caches, n = cache.load_paged(tokens, target.caches, dst_ids, layout=layout)
    assert n == 45
    target.ref_scatter(block_table(dst_ids, 45, describe(target.caches, layout)), 0, kv_bits)
    assert_same(target)
    assert_same(source)
