"""GPU pools, pinned host arenas and torch <-> JAX views of device memory (skipped without a GPU).

Run on a machine with CUDA: ``tests/gpu/run_device_checks.sh`` (or ``pytest tests/gpu -o addopts=``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvtest import pointer, random_bits, require_gpu, same_bits, to_host
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.storage_backend.mem_pool import LocalCPUPool, LocalGPUPool

SHAPE = (4, 2, 64, 8, 128)  # 1 MiB bf16 chunks
NON_POW2_GIB = 0.75 + 3 / 1024  # 771 MiB: torch's pinned allocator would round it up to 1 GiB


def _meta(dtype: Any, gib: float = 0.05) -> LMCacheMemPoolMetadata:
    return LMCacheMemPoolMetadata(SHAPE, dtype, gib)


def _torch_cuda(array: np.ndarray) -> Any:
    torch = require_gpu("torch")
    bits = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
    return torch.from_numpy(bits.copy()).view(getattr(torch, array.dtype.name)).cuda()


@pytest.mark.parametrize("tokens", [64, 17])
def test_torch_gpu_pool(tokens: int) -> None:
    torch = require_gpu("torch")
    pool = LocalGPUPool(_meta(torch.bfloat16))
    assert pool.device.startswith("cuda")
    content = random_bits((4, 2, tokens, 8, 128), "bfloat16", seed=tokens)
    src = _torch_cuda(content)
    obj = pool.put(src)
    assert obj is not None
    assert obj.data.is_cuda
    assert obj.data.data_ptr() == pool.slot_address(obj.chunk_idx)
    assert same_bits(obj.data, content)
    assert same_bits(obj.clone("numpy"), content)
    host = np.empty_like(content)
    obj.copy_to(host)
    assert same_bits(host, content)
    obj.copy_from(content)  # host numpy into device memory
    assert same_bits(obj.data, content)


def test_torch_cpu_pool_is_pinned_at_exact_size() -> None:
    torch = require_gpu("torch")
    pool = LocalCPUPool(_meta(torch.bfloat16, NON_POW2_GIB))
    assert pool.pinned
    nbytes = pool.max_chunk_num * pool.size_per_chunk
    assert nbytes & (nbytes - 1), "the test needs a size that is not a power of two"
    cudart = torch.cuda.cudart()
    # Registering a page that is already registered fails with cudaErrorHostMemoryAlreadyRegistered
    # (712): so the first and the last page of the arena are pinned.
    for offset in (0, nbytes - 4096):
        code = cudart.cudaHostRegister(pool.base_address + offset, 4096, 0)
        assert int(code) == 712, f"page at byte {offset} of the arena is not pinned (got {int(code)})"
    # torch's own pinned allocator, for the same size, reserves the next power of two.
    stats = getattr(torch.cuda, "host_memory_stats", dict)
    before = stats().get("reserved_bytes.current", 0)
    reference = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    reserved = stats().get("reserved_bytes.current", 0) - before
    print(f"pool pins {nbytes} bytes; torch pin_memory=True reserved {reserved} bytes for the same size")
    assert reserved == 0 or reserved >= nbytes
    del reference
    pool.close()
    assert not pool.pinned


def test_pinned_pool_copies_synchronize() -> None:
    torch = require_gpu("torch")
    pool = LocalCPUPool(_meta(torch.bfloat16))
    for trial in range(20):
        content = random_bits(SHAPE, "bfloat16", seed=100 + trial)
        src = _torch_cuda(content) * 1  # produced by a kernel that may still run
        obj = pool.put(src)
        assert obj is not None
        assert same_bits(obj.as_numpy(), content), f"stale read in trial {trial}"
        dst = torch.empty_like(src)
        obj.copy_to(dst)
        assert same_bits(dst, content)
        pool.free(obj)


@pytest.mark.parametrize("tokens", [64, 17])
def test_jax_gpu_pool(tokens: int) -> None:
    jax = require_gpu("jax")
    jnp = jax.numpy
    pool = LocalGPUPool(_meta(jnp.bfloat16))
    content = random_bits((4, 2, tokens, 8, 128), "bfloat16", seed=tokens)
    src = jax.device_put(jnp.asarray(content), jax.devices("gpu")[0])
    obj = pool.put(src)
    assert obj is not None
    view = obj.data
    assert view.unsafe_buffer_pointer() == pool.slot_address(obj.chunk_idx)
    assert same_bits(view, content)
    assert same_bits(obj.clone("numpy"), content)
    obj.copy_from(content)  # from the host
    assert same_bits(obj.data, content)


def test_jax_cpu_pool_in_pinned_host_memory() -> None:
    jax = require_gpu("jax")
    jnp = jax.numpy
    pool = LocalCPUPool(_meta(jnp.bfloat16))
    print(f"JAX CPU pool pinned: {pool.pinned}")
    content = random_bits(SHAPE, "bfloat16", seed=5)
    obj = pool.put(jnp.asarray(content))
    assert obj is not None
    assert same_bits(obj.data, content)
    assert obj.as_numpy().ctypes.data == pool.slot_address(obj.chunk_idx)


def test_gpu_views_cross_frameworks_without_copy() -> None:
    torch = require_gpu("torch")
    jax = require_gpu("jax")
    jnp = jax.numpy
    torch_pool = LocalGPUPool(_meta(torch.bfloat16))
    content = random_bits(SHAPE, "bfloat16", seed=7)
    obj = torch_pool.put(_torch_cuda(content))
    as_jax = obj.as_jax()
    assert as_jax.unsafe_buffer_pointer() == torch_pool.slot_address(obj.chunk_idx)
    assert same_bits(as_jax, content)
    obj.data.mul_(2)
    torch.cuda.synchronize()
    assert same_bits(as_jax, to_host(obj.data))

    jax_pool = LocalGPUPool(_meta(jnp.bfloat16))
    jobj = jax_pool.put(jnp.asarray(content))
    as_torch = jobj.as_torch()
    assert as_torch.is_cuda
    assert pointer(as_torch) == jax_pool.slot_address(jobj.chunk_idx)
    assert same_bits(as_torch, content)
    as_torch.add_(1)
    torch.cuda.synchronize()
    assert same_bits(jobj.data, to_host(as_torch))


def test_side_stream_write_is_visible_to_jax_after_synchronize() -> None:
    torch = require_gpu("torch")
    require_gpu("jax")
    pool = LocalGPUPool(_meta(torch.float32))
    obj = pool.allocate(torch.empty(SHAPE, dtype=torch.float32, device="meta"))
    assert obj is not None
    as_jax = obj.as_jax()
    stream = torch.cuda.Stream()
    for trial in range(20):
        with torch.cuda.stream(stream):
            obj.data.fill_(float(trial))
            big = torch.randn(2048, 2048, device="cuda")
            for _ in range(5):  # keep the stream busy so a missing wait would show
                big = big @ big / 2048
        stream.synchronize()  # the documented step before another framework reads
        assert float(as_jax.min()) == float(trial) == float(as_jax.max())
