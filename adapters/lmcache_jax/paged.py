"""Paged transfer for JAX caches: one jitted gather out of the blocks, one jitted donated scatter into them.

The geometry, the block table checks and the row arithmetic are the core's (:mod:`lmcache.paged`); this
module only moves bytes. Both functions are ``jax.jit``-compiled once per cache shape, row width and
padded length (the caller rounds lengths up to a bucket, such as the chunk size, so a serving engine's
many request lengths share a few compiled programs).

Two facts shape the code:

* XLA:CPU updates a bfloat16 or float8 array by converting all of it, and a float round trip may change
  NaN payloads. Both kernels work on the cache's bits (a same-width unsigned integer, a free bitcast inside
  the program), so every dtype moves at memory speed and byte-exact.
* The scatter donates the cache, so XLA writes the rows in place instead of copying the whole cache; the
  caller's input arrays are invalid afterwards and the returned ones replace them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmcache.errors import ChunkShapeError
from lmcache.paged import PagedSpec, row_index, row_tokens
from lmcache_jax import ADAPTER


def _bits(array: jax.Array) -> jax.Array:
    """The same bytes as an unsigned integer of the element's width (no copy inside a jitted program)."""
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[array.dtype.itemsize]
    if array.dtype == unsigned:
        return array
    return jax.lax.bitcast_convert_type(array, unsigned)


def _typed(bits: jax.Array, like: Any) -> jax.Array:
    return bits if bits.dtype == like else jax.lax.bitcast_convert_type(bits, like)


@partial(jax.jit, static_argnames=("layout", "g"))
def _gather(kv_caches: Any, rows: jax.Array, *, layout: str, g: int) -> Any:
    """Rows ``rows`` (of ``g`` tokens) of every layer: one ``(L, K, len(rows) * g, H, D)`` array for a
    stacked cache, a list of ``(K, len(rows) * g, H, D)`` arrays, one per layer, for a list of layers."""
    m = rows.shape[0] * g
    if layout == "stacked":
        L, kv, B, S, H, D = kv_caches.shape
        cache = _bits(kv_caches).reshape(L, kv, B * S // g, g * H * D)
        out = jnp.take(cache, rows, axis=2, mode="clip").reshape(L, kv, m, H, D)
        return _typed(out, kv_caches.dtype)
    B, S, H2, D = kv_caches[0].shape
    layers = []
    for layer in kv_caches:
        cache = _bits(layer).reshape(B * S // g, g * H2 * D)
        tokens = jnp.take(cache, rows, axis=0, mode="clip").reshape(m, H2 // 2, 2, D)
        layers.append(_typed(tokens.transpose(2, 0, 1, 3), layer.dtype))  # head 2h + k -> (k, token, h)
    # Not stacked: XLA:CPU concatenates 32 such outputs at a third of the speed of the gathers themselves.
    return layers


@partial(jax.jit, static_argnames=("layout", "g"), donate_argnums=(0,))
def _scatter(kv_caches: Any, rows: jax.Array, src: jax.Array, *, layout: str, g: int) -> Any:
    """Write ``src`` (``len(rows) * g`` tokens) into rows ``rows``; out-of-range rows are dropped."""
    n_rows = rows.shape[0]
    if layout == "stacked":
        L, kv, B, S, H, D = kv_caches.shape
        cache = _bits(kv_caches).reshape(L, kv, B * S // g, g * H * D)
        update = _bits(src).reshape(L, kv, n_rows, g * H * D)
        cache = cache.at[:, :, rows].set(update, mode="drop", unique_indices=True)
        return _typed(cache.reshape(kv_caches.shape), kv_caches.dtype)
    B, S, H2, D = kv_caches[0].shape
    out = []
    for layer, part in zip(kv_caches, _bits(src), strict=True):
        cache = _bits(layer).reshape(B * S // g, g * H2 * D)
        update = part.transpose(1, 2, 0, 3).reshape(n_rows, g * H2 * D)  # (k, token, h) -> head 2h + k
        cache = cache.at[rows].set(update, mode="drop", unique_indices=True)
        out.append(_typed(cache.reshape(layer.shape), layer.dtype))
    return out


def _check_layout(spec: PagedSpec) -> None:
    if spec.framework != "jax":
        raise ChunkShapeError(f"layout {spec.layout!r} with {spec.framework} arrays is not a JAX cache")


def gather(
    kv_caches: Any, spec: PagedSpec, table: np.ndarray, start: int, count: int, *, bucket: int = 1
) -> Any:
    """Gather tokens ``start .. start+count-1`` of a request from its blocks, in one jitted call.

    Args:
        kv_caches: the paged cache (``"stacked"`` array or ``"interleaved"`` list), as ``spec`` describes.
        spec: the cache's geometry (:func:`lmcache.paged.describe`).
        table: the request's checked block ids (:func:`lmcache.paged.block_table`), covering the range.
        start: first token.
        count: tokens to gather.
        bucket: round the output's token count up to a multiple of this, so that lengths share compiled
            programs; tokens past ``count`` hold unspecified values.

    Returns:
        ``"stacked"``: one ``(L, K, m, H, D)`` JAX array; ``"interleaved"``: a list of ``L`` arrays
        ``(K, m, H, D)``, one per layer. ``m = count`` rounded up to ``bucket``; on the cache's device,
        dispatched asynchronously like any JAX result.
    """
    _check_layout(spec)
    m = -(-count // bucket) * bucket
    g = row_tokens(spec.block_size, start, m)
    used = -(-count // g)  # the last row may run past count, never past its block
    rows = np.zeros(m // g, np.int32)
    rows[:used] = row_index(table, spec.block_size, start, used * g, g)
    caches = kv_caches if spec.layout == "stacked" else list(kv_caches)
    return _gather(caches, jnp.asarray(rows), layout=spec.layout, g=g)


def scatter(kv_caches: Any, spec: PagedSpec, table: np.ndarray, start: int, src: Any, count: int) -> Any:
    """Write the first ``count`` tokens of ``src`` into tokens ``start .. start+count-1`` of a request.

    One jitted call that donates ``kv_caches``: do not use the arrays passed in afterwards; use the
    returned ones (same structure, shapes and dtype). Only those tokens' positions change.

    Args:
        kv_caches: the paged cache (``"stacked"`` array or ``"interleaved"`` list), as ``spec`` describes.
        spec: the cache's geometry.
        table: the request's checked block ids, covering the range.
        start: first token to write.
        src: a ``(L, K, m, H, D)`` array (JAX or numpy) of the cache's dtype, ``m >= count``; pad ``m`` to a
            bucket (such as the chunk size) to share compiled programs between lengths.
        count: tokens to write.

    Returns:
        The new paged cache: one array (``"stacked"``) or a list (``"interleaved"``).

    Raises:
        ChunkShapeError: ``src`` has the wrong shape or dtype.
    """
    _check_layout(spec)
    shape = tuple(src.shape)
    if len(shape) != 5 or shape != spec.chunk_shape(shape[2]) or shape[2] < count:
        raise ChunkShapeError(
            f"the source has shape {shape}, expected {spec.chunk_shape(count)} or longer in dim 2"
        )
    if np.dtype(src.dtype) != spec.dtype.numpy_dtype:
        raise ChunkShapeError(f"the source has dtype {src.dtype}, the paged cache {spec.dtype.name}")
    m = shape[2]
    g = math.gcd(spec.block_size, start, count, m) or spec.block_size
    rows_total = m // g
    rows = spec.num_blocks * spec.block_size // g + np.arange(rows_total, dtype=np.int64)  # dropped
    rows[: count // g] = row_index(table, spec.block_size, start, count, g)
    caches = kv_caches if spec.layout == "stacked" else list(kv_caches)
    if isinstance(src, np.ndarray):
        src = _to_device(src, spec, caches if spec.layout == "stacked" else caches[0])
    return _scatter(caches, jnp.asarray(rows.astype(np.int32)), src, layout=spec.layout, g=g)


def _to_device(src: np.ndarray, spec: PagedSpec, like: Any) -> jax.Array:
    """Put a host array where the cache is: aliased without a copy when the cache is on the CPU and the
    array is contiguous and 64-byte aligned (what JAX can alias), else copied there."""
    device = next(iter(like.devices()))
    if device.platform == "cpu" and src.flags.c_contiguous and src.ctypes.data % 64 == 0:
        return ADAPTER.from_host(src.view(spec.dtype.bits_dtype), spec.dtype)
    placed: jax.Array = jax.device_put(src, device)
    return placed


def stack_layers(layers: list[jax.Array]) -> jax.Array:
    """Stack per-layer ``(K, n, H, D)`` arrays into one ``(L, K, n, H, D)`` chunk (for device pools)."""
    return jnp.stack(layers)


__all__ = ["gather", "scatter", "stack_layers"]
