"""The shared cache with CUDA (skipped without a GPU): a torch client pins its mapping of the server's
arena at exactly its size (``cudaHostRegister``), moves chunks between device memory and the mapping
bit-exactly, and a JAX client's host views go to the device with ``jax.device_put``.

Run on a machine with CUDA: ``tests/gpu/run_device_checks.sh``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from cachetest import prefix_kv
from kvtest import require_gpu, same_bits, to_host
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.shared import CacheServer, connect

SHAPE = (4, 2, 64, 8, 128)  # 1 MiB bf16 chunks
NON_POW2_GIB = 0.25 + 3 / 1024  # 259 MiB: torch's pinned allocator would round it up to 512 MiB
TOKENS = list(range(2 * 64 + 17))


@pytest.fixture
def server() -> Iterator[CacheServer]:
    with tempfile.TemporaryDirectory(prefix="lmc-") as directory:
        meta = LMCacheMemPoolMetadata(SHAPE, "bfloat16", NON_POW2_GIB)
        with CacheServer(os.path.join(directory, "gpu.sock"), meta) as running:
            yield running


def test_a_torch_client_pins_its_mapping_at_exact_size(server: CacheServer) -> None:
    torch = require_gpu("torch")
    client = connect(server.socket_path, backend="torch")
    assert client.pinned
    arena = client.arena
    base, nbytes = arena.data_ptr(), arena.numel() * arena.element_size()
    assert nbytes & (nbytes - 1), "the test needs a size that is not a power of two"
    cudart = torch.cuda.cudart()
    # Registering a page that is registered already fails with cudaErrorHostMemoryAlreadyRegistered (712).
    for offset in (0, nbytes - 4096):
        assert int(cudart.cudaHostRegister(base + offset, 4096, 0)) == 712, f"byte {offset} is not pinned"
    client.close()
    assert not client.pinned  # unregistered with the connection


def test_device_tensors_through_the_shared_cache(server: CacheServer) -> None:
    torch = require_gpu("torch")
    kv = prefix_kv(TOKENS, "bfloat16", SHAPE)
    device_kv = torch.from_numpy(kv.view(np.uint16).copy()).view(torch.bfloat16).cuda()
    with connect(server.socket_path, backend="torch") as writer, connect(server.socket_path) as reader:
        assert writer.store(TOKENS, device_kv) == len(TOKENS)
        out = torch.zeros_like(device_kv)
        result, n = writer.retrieve(TOKENS, out=out)
        assert (result is out, n) == (True, len(TOKENS))
        assert same_bits(out, kv)
        with writer.lease(TOKENS) as lease:
            moved = torch.cat([obj.as_torch().to("cuda", non_blocking=True) for obj in lease.chunks], dim=2)
            torch.cuda.synchronize()
            assert same_bits(moved, kv)
        host, n = reader.retrieve(TOKENS)  # a numpy process sees the bytes a CUDA process stored
        assert n == len(TOKENS)
        assert same_bits(host, kv)


def test_a_jax_client_moves_leased_chunks_to_the_device(server: CacheServer) -> None:
    jax = require_gpu("jax")
    kv = prefix_kv(TOKENS, "bfloat16", SHAPE)
    with connect(server.socket_path, backend="jax") as client:
        assert client.store(TOKENS, kv) == len(TOKENS)
        gpu = next(d for d in jax.devices() if d.platform != "cpu")
        with client.lease(TOKENS) as lease:
            on_device = [jax.device_put(obj.as_jax(), gpu) for obj in lease.chunks]
            got = np.concatenate([to_host(x) for x in on_device], axis=2)
        assert got.tobytes() == kv.tobytes()
