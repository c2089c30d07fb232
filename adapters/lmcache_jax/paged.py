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
* XLA:CPU's scatter is slow for 32 KiB rows: 0.08x-0.23x of a numpy copy of the same bytes in two
  runs on a busy 2-CPU machine (2026-12-04), 0.63x of a jitted copy in the 2026-12-02 bench. On the
  CPU the scatter therefore writes the rows with numpy, one task per layer on the copy engine, into the
  cache's own buffers: a donating identity
  (:func:`_own`) first takes the buffers over, which waits for every computation still reading them (as
  XLA's donation does), and returns new arrays that nothing else references, so no reader races the
  writes. Caches on other platforms and sharded ones take XLA's scatter.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmcache import copy_engine
from lmcache.dlpack import DLPackView
from lmcache.dtypes import KV_DTYPES
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
    """Gather tokens ``start .. start+count-1`` of a request from its blocks, in one jitted call (on the
    CPU: numpy tasks on the copy engine into new host memory, which the returned arrays alias).

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
    caches = kv_caches if spec.layout == "stacked" else list(kv_caches)
    if _on_host(caches, spec):  # on the CPU: numpy into new host memory that the result aliases
        out = _aligned_host(spec.chunk_shape(m), spec)
        gather_into(caches, spec, table, start, out[:, :, : used * g])
        if spec.layout == "stacked":
            return _to_device(out, spec, caches)
        return [_to_device(layer, spec, caches[0]) for layer in out]
    rows = np.zeros(m // g, np.int32)
    rows[:used] = row_index(table, spec.block_size, start, used * g, g)
    return _gather(caches, jnp.asarray(rows), layout=spec.layout, g=g)


def _aligned_host(shape: tuple[int, ...], spec: PagedSpec) -> np.ndarray:
    """A new host array of the cache's dtype, 256-byte aligned (JAX aliases only aligned host memory)."""
    nbytes = math.prod(shape) * spec.dtype.itemsize
    raw = np.empty(nbytes + 256, dtype=np.uint8)
    offset = (-raw.ctypes.data) % 256
    return raw[offset : offset + nbytes].view(spec.dtype.numpy_dtype).reshape(shape)


def gather_into(kv_caches: Any, spec: PagedSpec, table: np.ndarray, start: int, dst: np.ndarray) -> None:
    """Copy tokens ``start .. start + n - 1`` of a request into host memory ``dst`` (``(L, K, n, H, D)`` of
    the cache's dtype, such as a pool slot's view), straight from the cache's buffers: one copy-engine task
    per layer, no XLA program and no intermediate array. Only for caches where :func:`on_host` holds (the
    cache is read, never written, so readers need no ownership; :func:`jax.Array` buffers are immutable
    while an array refers to them).
    """
    _check_layout(spec)
    n = dst.shape[2]
    g = math.gcd(spec.block_size, start, n)
    rows = row_index(table, spec.block_size, start, n, g)
    bits = spec.dtype.bits_dtype
    out = dst.view(bits)
    tokens = spec.num_blocks * spec.block_size
    if spec.layout == "stacked":
        whole = _read_bits(kv_caches, bits)  # zero-copy on the CPU (on_host checked it)
        width = g * spec.token_elems
        tasks = [
            partial(_read_rows, whole[layer, k].reshape(tokens // g, width), rows, out[layer, k], width)
            for layer in range(spec.num_layers)
            for k in range(spec.kv)
        ]
    else:
        heads, d = spec.num_kv_heads, spec.head_size
        tasks = []
        for layer, array in enumerate(kv_caches):
            cache = _read_bits(array, bits).reshape(tokens // g, g * 2 * heads * d)
            target = out[layer].reshape(2, rows.shape[0], g, heads, d)
            tasks.append(partial(_read_interleaved, cache, rows, target))
    copy_engine.run(tasks)


def _read_interleaved(cache: np.ndarray, rows: np.ndarray, target: np.ndarray) -> None:
    """Rows of an interleaved layer (whole rows first: memcpy-speed, into a cache-sized buffer), then
    regrouped by K / V (head ``2h + k`` -> ``(k, token, h)``): numpy copies both at memory speed, where
    one strided ``take`` moves element by element."""
    _, n_rows, g, heads, d = target.shape
    rows_first = np.take(cache, rows, axis=0, mode="clip").reshape(n_rows, g, heads, 2, d)
    target[...] = rows_first.transpose(3, 0, 1, 2, 4)


def _read_rows(cache: np.ndarray, rows: np.ndarray, dst: np.ndarray, width: int) -> None:
    np.take(cache, rows, axis=0, out=dst.reshape(rows.shape[0], width), mode="clip")


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
    caches = kv_caches if spec.layout == "stacked" else list(kv_caches)
    if _on_host(caches, spec):
        pieces = [(start, _host_source(src, spec)[:, :, :count])] if count else []
        return scatter_pieces(caches, spec, table, pieces)
    m = shape[2]
    g = math.gcd(spec.block_size, start, count, m) or spec.block_size
    rows = spec.num_blocks * spec.block_size // g + np.arange(m // g, dtype=np.int64)  # dropped
    rows[: count // g] = row_index(table, spec.block_size, start, count, g)
    if isinstance(src, np.ndarray):
        src = _to_device(src, spec, caches if spec.layout == "stacked" else caches[0])
    return _scatter(caches, jnp.asarray(rows.astype(np.int32)), src, layout=spec.layout, g=g)


def scatter_pieces(
    kv_caches: Any, spec: PagedSpec, table: np.ndarray, pieces: Sequence[tuple[int, Any]], *, bucket: int = 1
) -> Any:
    """Write host arrays into a request's tokens: each piece ``(start, array)`` covers tokens ``start ..
    start + n - 1``, ``array`` being ``(L, K, n, H, D)`` of the cache's dtype (any strides).

    Donates ``kv_caches`` like :func:`scatter`. On the CPU (:func:`on_host`) the pieces go straight
    into the cache's buffers, one copy-engine task per layer; elsewhere they are staged in one host array
    (its length rounded up to ``bucket``, so that lengths share compiled programs) and written by
    :func:`scatter`. :meth:`lmcache.paged.PagedRequest.scatter_chunks` hands it the slots of a cached
    prefix.

    Returns:
        The new paged cache: one array (``"stacked"``) or a list (``"interleaved"``).

    Raises:
        ChunkShapeError: a piece has the wrong shape or dtype, or lies past the tokens ``table`` covers;
            nothing was donated or written.
    """
    _check_layout(spec)
    caches = kv_caches if spec.layout == "stacked" else list(kv_caches)
    if not pieces:
        return caches
    for start, piece in pieces:  # before anything is donated: a bad piece leaves the cache as it was
        shape = tuple(piece.shape)
        if len(shape) != 5 or shape != spec.chunk_shape(shape[2]) or shape[2] < 1:
            raise ChunkShapeError(
                f"a piece at token {start} has shape {shape}, expected {spec.chunk_shape(1)[:2]} + "
                f"(n, {spec.num_kv_heads}, {spec.head_size}) with n >= 1"
            )
        if np.dtype(piece.dtype) != spec.dtype.numpy_dtype:
            raise ChunkShapeError(
                f"a piece at token {start} has dtype {piece.dtype}, the paged cache {spec.dtype.name}"
            )
        if start < 0 or start + shape[2] > table.shape[0] * spec.block_size:
            raise ChunkShapeError(
                f"a piece covers tokens {start}..{start + shape[2] - 1}, but the block table covers "
                f"{table.shape[0] * spec.block_size} tokens; pass a table for the whole range"
            )
    if not _on_host(caches, spec):
        total = max(start + piece.shape[2] for start, piece in pieces)
        staging = np.empty(spec.chunk_shape(-(-total // bucket) * bucket), spec.dtype.numpy_dtype)
        for start, piece in pieces:
            copy_engine.copy(staging[:, :, start : start + piece.shape[2]], piece)
        return scatter(caches, spec, table, 0, staging, total)
    bits = spec.dtype.bits_dtype
    placed = []
    for start, piece in pieces:
        n = piece.shape[2]
        g = math.gcd(spec.block_size, start, n)
        placed.append((row_index(table, spec.block_size, start, n, g), g, np.asarray(piece).view(bits)))
    owned = _own([caches] if spec.layout == "stacked" else caches)
    jax.block_until_ready(owned)  # type: ignore[no-untyped-call]
    tokens = spec.num_blocks * spec.block_size
    if spec.layout == "stacked":
        whole = _writable_bits(owned[0], bits)
        write = partial(_write_stacked, placed=placed, tokens=tokens, width=spec.token_elems)
        copy_engine.run([partial(write, whole[layer], layer) for layer in range(spec.num_layers)])
        return owned[0]
    write = partial(_write_interleaved, placed=placed, tokens=tokens, spec=spec)
    copy_engine.run([partial(write, _writable_bits(array, bits), layer) for layer, array in enumerate(owned)])
    return owned


def on_host(kv_caches: Any, spec: PagedSpec) -> bool:
    """Whether this module moves the cache's bytes with numpy on the host (:func:`gather_into`, and
    :func:`scatter` into the cache's own buffers; see the module notes), not with XLA."""
    return _on_host(kv_caches if spec.layout == "stacked" else list(kv_caches), spec)


def _on_host(caches: Any, spec: PagedSpec) -> bool:
    for array in [caches] if spec.layout == "stacked" else caches:
        if not isinstance(array, jax.Array) or array.is_deleted() or len(array.devices()) != 1:
            return False
        if next(iter(array.devices())).platform != "cpu" or not array.is_fully_addressable:
            return False
        try:
            readable = _read_bits(array, spec.dtype.bits_dtype)
        except (BufferError, RuntimeError, TypeError, ValueError):
            return False  # no host view of it: XLA moves it
        dense = readable.ctypes.data == array.unsafe_buffer_pointer() and readable.flags.c_contiguous
        del readable  # its external reference would make the buffer impossible to donate
        if not dense:  # a custom layout: XLA moves it
            return False
    return True


def _host_source(src: Any, spec: PagedSpec) -> np.ndarray:
    """``src`` as a host numpy array of the cache's dtype: itself, a view of a CPU JAX array's memory, or
    (another device) a copy."""
    if isinstance(src, np.ndarray):
        return src
    devices = src.devices() if isinstance(src, jax.Array) else set()
    if len(devices) == 1 and next(iter(devices)).platform == "cpu":
        return _read_bits(src, spec.dtype.bits_dtype).view(spec.dtype.numpy_dtype)
    return np.asarray(jax.device_get(src))


#: A DLPack-known element type of each item size, for exporting a JAX array's bits to numpy.
_SAME_SIZE = {1: "uint8", 2: "float16", 4: "float32"}


def _read_bits(array: jax.Array, bits: Any) -> np.ndarray:
    """A read-only numpy view of a CPU array's bits through DLPack (retyped, since numpy has no bfloat16
    or float8 DLPack type). It holds an external reference to the buffer only while it lives; never
    ``np.asarray``, which caches its view in the array, after which XLA can never donate the buffer and
    every donating call copies the whole cache."""
    view: np.ndarray = np.from_dlpack(DLPackView(array, KV_DTYPES[_SAME_SIZE[array.dtype.itemsize]]))
    return view.view(bits)


@partial(jax.jit, donate_argnums=(0,))
def _own(arrays: list[jax.Array]) -> list[jax.Array]:
    """The same buffers as new arrays (donated, so XLA first waits for every reader of the old ones)."""
    return arrays


def _writable_bits(array: jax.Array, bits: Any) -> np.ndarray:
    """A writable numpy view of the bits of a dense CPU array that this module owns (from :func:`_own`;
    :func:`_on_host` checked the layout before the donation, which keeps it)."""
    nbytes = array.size * array.dtype.itemsize
    raw = memoryview((ctypes.c_char * nbytes).from_address(array.unsafe_buffer_pointer())).cast("B")
    writable: np.ndarray = np.frombuffer(raw, dtype=bits).reshape(array.shape)
    return writable


def _write_stacked(cache: np.ndarray, layer: int, *, placed: list[Any], tokens: int, width: int) -> None:
    """Write every piece's tokens of one layer into a stacked cache's layer (``(K, B, S, H, D)`` bits)."""
    for rows, g, piece in placed:
        target = cache.reshape(cache.shape[0], tokens // g, g * width)
        for k in range(target.shape[0]):
            target[k, rows] = piece[layer, k].reshape(rows.shape[0], g * width)


def _write_interleaved(
    cache: np.ndarray, layer: int, *, placed: list[Any], tokens: int, spec: PagedSpec
) -> None:
    """Write every piece's tokens of one layer into an interleaved layer (``(B, S, 2H, D)`` bits, head
    ``2h + k`` holding K (``k = 0``) or V of head ``h``)."""
    heads, d = spec.num_kv_heads, spec.head_size
    for rows, g, piece in placed:
        target = cache.reshape(tokens // g, g, heads, 2, d)
        source = piece[layer].reshape(2, rows.shape[0], g, heads, d)
        # (k, token, h) -> (token, head 2h + k), regrouped first into a cache-sized buffer: whole rows
        # then go in at memcpy speed.
        target[rows] = np.ascontiguousarray(source.transpose(1, 2, 3, 0, 4))


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


__all__ = ["gather", "gather_into", "scatter", "scatter_pieces", "stack_layers", "on_host"]
