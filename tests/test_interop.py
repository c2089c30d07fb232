"""One KVObj, zero-copy in numpy, torch and JAX: pointers, visibility of writes, bit-exact round trips."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvtest import BACKENDS, pointer, random_bits, require, same_bits, small_pool, to_host, to_native

DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "int8")


def _write_native(obj: Any, backend: str, content: np.ndarray) -> None:
    """Write through the pool's own native view (``data``)."""
    if backend == "torch":
        obj.data.copy_(to_native(content, "torch"))
    elif backend == "numpy":
        obj.data[...] = content
    else:  # JAX arrays are immutable: the pool's byte copy is the JAX way to write
        obj.copy_from(to_native(content, "jax"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("tokens", [16, 5])
def test_views_alias_the_slot_in_every_framework(backend: str, target: str, dtype: str, tokens: int) -> None:
    require(target)
    pool = small_pool(backend, dtype=dtype, slots=2)
    shape = (2, 2, tokens, 2, 8)
    obj = pool.allocate(to_native(random_bits(shape, dtype), backend))
    assert obj is not None
    view = {"numpy": obj.as_numpy, "torch": obj.as_torch, "jax": obj.as_jax}[target]()
    assert pointer(view) == pool.slot_address(obj.chunk_idx)
    assert tuple(view.shape) == shape
    assert to_host(view).dtype == pool.layout.dtype.numpy_dtype
    for seed in (1, 2):  # a write after the view was made is visible through it
        content = random_bits(shape, dtype, seed=seed)
        _write_native(obj, backend, content)
        assert same_bits(view, content)
        assert same_bits(obj.data, content)
    assert {"numpy": obj.as_numpy, "torch": obj.as_torch, "jax": obj.as_jax}[target]() is view  # cached


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", BACKENDS)
def test_copy_from_any_framework_round_trips(backend: str, source: str, dtype: str) -> None:
    require(source)
    pool = small_pool(backend, dtype=dtype, slots=2)
    content = random_bits((2, 2, 7, 2, 8), dtype, seed=11)
    obj = pool.put(to_native(content, source))
    assert obj is not None
    assert same_bits(obj.as_numpy(), content)
    out = np.empty_like(content)
    obj.copy_to(out)
    assert same_bits(out, content)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dlpack_protocol(backend: str, dtype: str) -> None:
    pool = small_pool(backend, dtype=dtype, slots=1)
    content = random_bits((2, 2, 3, 2, 8), dtype, seed=4)
    obj = pool.put(to_native(content, backend))
    assert obj is not None
    assert obj.__dlpack_device__() == (1, 0)
    address = pool.slot_address(obj.chunk_idx)
    for max_version in (None, (1, 0)):
        capsule = obj.__dlpack__(max_version=max_version)
        expected = "dltensor_versioned" if max_version else "dltensor"
        assert f'"{expected}"' in repr(capsule)  # the capsule's name, quoted in its repr
    if pool.layout.dtype.numpy_has_dlpack:
        array = np.from_dlpack(obj)
        assert pointer(array) == address
        assert same_bits(array, content)
    else:
        with pytest.raises((BufferError, RuntimeError), match=r"(?i)dtype"):  # numpy knows no bf16 / fp8
            np.from_dlpack(obj)
    with pytest.raises(BufferError, match="device"):
        obj.__dlpack__(dl_device=(2, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("consumer", ["torch", "jax"])
def test_dlpack_consumers_import_without_copy(backend: str, consumer: str, dtype: str) -> None:
    module = require(consumer)
    pool = small_pool(backend, dtype=dtype, slots=1)
    content = random_bits((2, 2, 3, 2, 8), dtype, seed=4)
    obj = pool.put(to_native(content, backend))
    assert obj is not None
    importer = module.from_dlpack if consumer == "torch" else module.dlpack.from_dlpack
    imported = importer(obj)
    assert pointer(imported) == pool.slot_address(obj.chunk_idx)
    assert same_bits(imported, content)


def test_attention_end_to_end_torch_to_jax_and_back() -> None:
    """K and V from a torch attention layer, stored in a torch pool, read by JAX zero-copy; and back."""
    torch = require("torch")
    jax = require("jax")
    jnp = jax.numpy
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.storage_backend.mem_pool import LocalCPUPool

    layers, heads, head_size, tokens = 2, 4, 32, 24
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, heads * head_size, generator=gen)
    w_k = torch.randn(layers, heads * head_size, heads * head_size, generator=gen) / 8
    w_v = torch.randn(layers, heads * head_size, heads * head_size, generator=gen) / 8
    query = torch.randn(heads, 1, head_size, generator=gen).to(torch.bfloat16)

    def torch_attention(k: Any, v: Any) -> Any:  # k, v: (heads, tokens, head_size)
        scores = (query.float() @ k.float().transpose(-1, -2)) / head_size**0.5
        return torch.softmax(scores, dim=-1) @ v.float()

    def jax_attention(k: Any, v: Any) -> Any:
        q = jnp.asarray(to_host(query))
        scores = (q.astype(jnp.float32) @ jnp.swapaxes(k.astype(jnp.float32), -1, -2)) / head_size**0.5
        return jax.nn.softmax(scores, axis=-1) @ v.astype(jnp.float32)

    kv = torch.stack([torch.stack([hidden @ w_k[i], hidden @ w_v[i]]) for i in range(layers)])
    kv = kv.view(layers, 2, tokens, heads, head_size).to(torch.bfloat16)
    meta = LMCacheMemPoolMetadata((layers, 2, 32, heads, head_size), torch.bfloat16, 0.01)

    with LocalCPUPool(meta, pin_memory=False) as torch_pool:  # torch produces, JAX consumes
        obj = torch_pool.put(kv)
        assert obj is not None
        as_jax = obj.as_jax()
        assert pointer(as_jax) == torch_pool.slot_address(obj.chunk_idx)
        for layer in range(layers):
            want = torch_attention(kv[layer, 0].transpose(0, 1), kv[layer, 1].transpose(0, 1))
            k, v = jnp.swapaxes(as_jax[layer, 0], 0, 1), jnp.swapaxes(as_jax[layer, 1], 0, 1)
            got = np.asarray(jax_attention(k, v))
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-2, atol=2e-2)

    jax_meta = LMCacheMemPoolMetadata((layers, 2, 32, heads, head_size), jnp.bfloat16, 0.01)
    with LocalCPUPool(jax_meta) as jax_pool:  # JAX produces, torch consumes
        jax_kv = jnp.asarray(to_host(kv)) * 0.5
        obj = jax_pool.put(jax_kv)
        assert obj is not None
        as_torch = obj.as_torch()
        assert pointer(as_torch) == jax_pool.slot_address(obj.chunk_idx)
        for layer in range(layers):
            k, v = jnp.swapaxes(jax_kv[layer, 0], 0, 1), jnp.swapaxes(jax_kv[layer, 1], 0, 1)
            want = np.asarray(jax_attention(k, v))
            got = torch_attention(as_torch[layer, 0].transpose(0, 1), as_torch[layer, 1].transpose(0, 1))
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-2, atol=2e-2)


def test_each_adapter_concatenates_chunks_on_the_token_axis(backend: str) -> None:
    """The adapter contract's concat_tokens (the chunk cache's device retrieve): bit-exact, axis 2."""
    from kvtest import random_bits, require, to_host, to_native
    from lmcache.registry import load_adapter

    require(backend)
    whole = random_bits((2, 2, 10, 2, 8), "bfloat16", seed=3)
    parts = [to_native(whole[:, :, :4], backend), to_native(whole[:, :, 4:], backend)]
    joined = load_adapter(backend).concat_tokens(parts)
    assert to_host(joined).view("u2").tobytes() == whole.view("u2").tobytes()
