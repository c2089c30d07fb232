"""Pools over memory they did not allocate (``memory=``): what the shared cache's server and clients use."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from kvtest import SMALL_SHAPE, pointer, random_bits, require, same_bits
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import ConfigError
from lmcache.layout import SlotLayout
from lmcache.storage_backend.mem_pool import LocalCPUPool, LocalPool

SLOTS = 4


def _meta() -> LMCacheMemPoolMetadata:
    slot_bytes = SlotLayout.from_metadata(LMCacheMemPoolMetadata(SMALL_SHAPE, "bfloat16", 1.0)).slot_bytes
    return LMCacheMemPoolMetadata(SMALL_SHAPE, "bfloat16", SLOTS * slot_bytes / 2**30)


def _mapping(nbytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def test_pool_views_live_in_the_adopted_memory(backend: str) -> None:
    meta = _meta()
    memory = _mapping(SLOTS * SlotLayout.from_metadata(meta).slot_bytes + 4096)
    pool = LocalCPUPool(meta, backend=backend, memory=memory, pin_memory=False)
    assert pool.base_address == memory.ctypes.data
    chunk = random_bits(SMALL_SHAPE, "bfloat16")
    obj = pool.put(chunk)
    assert obj is not None
    assert pointer(obj.data) == memory.ctypes.data + obj.chunk_idx * pool.size_per_chunk
    start = obj.chunk_idx * pool.size_per_chunk
    assert memory[start : start + chunk.nbytes].tobytes() == chunk.tobytes()
    assert same_bits(obj.data, chunk)
    assert pool.overlaps(memory[:8])
    pool.close()


@pytest.mark.parametrize(
    ("memory", "match"),
    [
        (np.zeros(1 << 20, dtype=np.uint16), "uint8"),
        ([0] * 100, "numpy uint8"),
        (np.zeros((2, 1 << 20), dtype=np.uint8), "1-D"),
        (_mapping(1 << 20)[::2], "C-contiguous"),
        (_mapping(1 << 20)[1:], "aligned"),
        (_mapping(4096), "holds 4096 bytes"),
    ],
    ids=["dtype", "list", "2-d", "strided", "misaligned", "too-small"],
)
def test_bad_memory_is_refused(memory: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LocalCPUPool(_meta(), backend="numpy", memory=memory)


def test_read_only_memory_is_refused() -> None:
    memory = _mapping(1 << 20)
    memory.flags.writeable = False
    with pytest.raises(ConfigError, match="writable"):
        LocalCPUPool(_meta(), backend="numpy", memory=memory)


def test_memory_is_for_cpu_pools_only() -> None:
    require("torch")
    with pytest.raises(ConfigError, match="CPU pool"):
        LocalPool(_meta(), backend="torch", device="gpu", memory=_mapping(1 << 20))
