"""Paged transfer for torch caches: gather a request's tokens into a chunk, scatter a chunk back.

The geometry, the block table checks and the row arithmetic are the core's (:mod:`lmcache.paged`); this
module only moves bytes. Each call is one ``index_select`` / ``index_copy_`` on dim 0 (one per layer for
the ``"vllm"`` list layout): the cache and the chunk are both viewed as 2-D ``(rows, row_width)`` arrays
whose rows are ``g`` tokens of one layer and one of K / V, and ``g`` is as wide as the range allows (a
whole block when the range is block-aligned).

Why rows of a wide element type: torch copies indexed rows element by element, so the element type sets
the speed. Measured here (CPU, torch 2.13, 2 threads, 16-token bf16 rows): ``index_copy_`` moves
5.7 GB/s as bfloat16, 10 GB/s as int32, 21 GB/s as complex128. The rows are viewed as the widest of
complex128, float64, float32, int16, uint8 that divides the row's bytes and its address; a copy of
these types moves bits unchanged (no arithmetic touches them), so the bytes are exact for every dtype.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch

from lmcache.errors import ChunkShapeError, ChunkTypeError
from lmcache.paged import PagedSpec, row_index, row_tokens
from lmcache_torch import torch_dtype

#: Element types to view rows as, widest first (copies of them move bits unchanged).
_ROW_DTYPES = (torch.complex128, torch.float64, torch.float32, torch.int16, torch.uint8)


def _as_rows(tensor: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """View a contiguous tensor as ``(rows, width)`` of the widest element type that fits ``row_bytes``."""
    flat = tensor.reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    address = flat.data_ptr()
    for dtype in _ROW_DTYPES:
        size = dtype.itemsize
        if row_bytes % size == 0 and address % size == 0:
            return flat.view(torch.uint8).view(dtype).view(nbytes // row_bytes, row_bytes // size)
    raise ChunkShapeError(f"cannot view {row_bytes}-byte rows")  # unreachable: uint8 always fits


def _layers(kv_caches: object, spec: PagedSpec) -> list[torch.Tensor]:
    """The tensors one op covers: the stacked cache, or each layer of a list."""
    if spec.layout == "stacked":
        return [kv_caches]  # type: ignore[list-item]
    if spec.layout == "vllm":
        return list(cast("list[torch.Tensor]", kv_caches))
    raise ChunkTypeError(f"layout {spec.layout!r} holds JAX arrays; torch moves 'vllm' and 'stacked' caches")


def _index(
    spec: PagedSpec, table: np.ndarray, start: int, count: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Row numbers of tokens ``start .. start+count-1`` for one op, and the row width in bytes.

    One op covers every (layer, K/V) pair of its tensor: ``L * K`` of them for a stacked cache, ``K``
    for one layer of a list; pair ``p``'s rows start at ``p * rows_per_pair``.
    """
    g = row_tokens(spec.block_size, start, count)
    rows = row_index(table, spec.block_size, start, count, g)
    pairs = spec.kv * (spec.num_layers if spec.layout == "stacked" else 1)
    rows_per_pair = spec.num_blocks * spec.block_size // g
    index = (np.arange(pairs, dtype=np.int64)[:, None] * rows_per_pair + rows[None, :]).reshape(-1)
    return torch.from_numpy(index).to(device), g * spec.token_elems * spec.dtype.itemsize


def _check_chunk(chunk: torch.Tensor, spec: PagedSpec, what: str) -> int:
    """Check that ``chunk`` is a ``(L, K, n, H, D)`` tensor of the cache's dtype; return ``n``."""
    if not isinstance(chunk, torch.Tensor):
        raise ChunkTypeError(f"{what} must be a torch tensor, got {type(chunk).__name__}")
    shape = tuple(chunk.shape)
    if len(shape) != 5 or shape != spec.chunk_shape(shape[2]):
        L, kv, _, H, D = spec.chunk_shape(0)
        raise ChunkShapeError(
            f"{what} has shape {shape}, expected (L, K, n, H, D) = ({L}, {kv}, n, {H}, {D})"
        )
    if chunk.dtype != torch_dtype(spec.dtype):
        raise ChunkShapeError(f"{what} has dtype {chunk.dtype}, the paged cache {spec.dtype.name}")
    return shape[2]


def gather_into(kv_caches: object, spec: PagedSpec, table: np.ndarray, start: int, dst: torch.Tensor) -> None:
    """Copy tokens ``start .. start+n-1`` of a request from its blocks into ``dst``.

    Args:
        kv_caches: the paged cache (``"vllm"`` list or ``"stacked"`` tensor), as ``spec`` describes it.
        spec: the cache's geometry (:func:`lmcache.paged.describe`).
        table: the request's checked block ids (:func:`lmcache.paged.block_table`), covering the range.
        start: first token to copy.
        dst: a contiguous ``(L, K, n, H, D)`` tensor of the cache's dtype, on any device (a slot view).

    Raises:
        ChunkShapeError: ``dst`` has the wrong shape or dtype, or is not contiguous.
    """
    count = _check_chunk(dst, spec, "the destination chunk")
    if not dst.is_contiguous():
        raise ChunkShapeError("the destination chunk must be contiguous (a slot view is)")
    layers = _layers(kv_caches, spec)
    device = layers[0].device
    index, row_bytes = _index(spec, table, start, count, device)
    target = dst if dst.device == device else torch.empty(dst.shape, dtype=dst.dtype, device=device)
    if spec.layout == "stacked":
        torch.index_select(_as_rows(layers[0], row_bytes), 0, index, out=_as_rows(target, row_bytes))
    else:
        for layer, out in zip(layers, target, strict=True):
            torch.index_select(_as_rows(layer, row_bytes), 0, index, out=_as_rows(out, row_bytes))
    if target is not dst:
        dst.copy_(target)
    _wait(device)


def scatter_from(
    kv_caches: object, spec: PagedSpec, table: np.ndarray, start: int, src: torch.Tensor
) -> None:
    """Copy ``src`` (``n`` tokens) into tokens ``start .. start+n-1`` of a request's blocks, in place.

    Only those tokens' positions are written: the rest of each block and every other block keep their
    bytes.

    Args:
        kv_caches: the paged cache (``"vllm"`` list or ``"stacked"`` tensor), as ``spec`` describes it.
        spec: the cache's geometry.
        table: the request's checked block ids, covering the range.
        start: first token to write.
        src: a ``(L, K, n, H, D)`` tensor of the cache's dtype, on any device.

    Raises:
        ChunkShapeError: ``src`` has the wrong shape or dtype.
    """
    count = _check_chunk(src, spec, "the source chunk")
    layers = _layers(kv_caches, spec)
    device = layers[0].device
    index, row_bytes = _index(spec, table, start, count, device)
    source = src.to(device).contiguous()
    if spec.layout == "stacked":
        _as_rows(layers[0], row_bytes).index_copy_(0, index, _as_rows(source, row_bytes))
    else:
        for layer, part in zip(layers, source, strict=True):
            _as_rows(layer, row_bytes).index_copy_(0, index, _as_rows(part, row_bytes))
    _wait(device)


def _wait(device: torch.device) -> None:
    """Wait for the copies on a GPU: a chunk's slot is read (or published) as soon as this returns."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


__all__ = ["gather_into", "scatter_from"]
