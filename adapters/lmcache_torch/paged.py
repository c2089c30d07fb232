"""Paged transfer for torch caches: gather a request's tokens into a chunk, scatter a chunk back.

The geometry, the block table checks and the row arithmetic are the core's (:mod:`lmcache.paged`); this
module only moves bytes. The cache and the chunk are both viewed as 2-D ``(rows, row_width)`` arrays
whose rows are ``g`` tokens of one layer and one of K / V, and ``g`` is as wide as the range allows (a
whole block when the range is block-aligned).

Caches in host memory are moved by numpy (``take`` / indexed assignment on numpy views of the same
memory), one task per layer, on the core's copy engine (:mod:`lmcache.copy_engine`): each task is
single-threaded and the threads claim tasks one at a time, so a thread that the scheduler leaves waiting
on a busy machine delays one layer, not the whole copy. torch's own ops on the CPU split each op over its
intra-op threads and wait for the slowest: measured on the 2-CPU development VM with another CPU-bound
process running, a ``"vllm"`` list gather fell to 0.07x of a contiguous copy that way (docs/benchmarks.md).
Caches on a GPU are moved by one ``index_select`` / ``index_copy_`` on dim 0 (one per layer for the
``"vllm"`` list layout).

Why rows of a wide element type: torch copies indexed rows element by element, so the element type sets
the speed. Measured here (CPU, torch 2.13, 2 threads, 16-token bf16 rows): ``index_copy_`` moves
5.7 GB/s as bfloat16, 10 GB/s as int32, 21 GB/s as complex128. The rows are viewed as the widest of
complex128, float64, float32, int16, uint8 that divides the row's bytes and its address; a copy of
these types moves bits unchanged (no arithmetic touches them), so the bytes are exact for every dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import cast

import numpy as np
import torch

from lmcache import copy_engine
from lmcache.errors import ChunkShapeError, ChunkTypeError
from lmcache.paged import PagedSpec, row_index, row_tokens
from lmcache_torch import torch_dtype

#: Element types to view rows as, widest first (copies of them move bits unchanged).
_ROW_DTYPES = (torch.complex128, torch.float64, torch.float32, torch.int16, torch.uint8)


def _byte_offsets(tensor: torch.Tensor) -> list[int]:
    """What a row type must divide: the tensor's address, and its byte offset into its storage
    (``Tensor.view(dtype)`` needs the latter; a storage base can itself be misaligned)."""
    return [tensor.data_ptr(), int(tensor.storage_offset()) * tensor.element_size()]


def _row_dtype(row_bytes: int, addresses: list[int]) -> torch.dtype:
    """The widest element type that divides ``row_bytes`` and every address and byte offset."""
    for dtype in _ROW_DTYPES:
        size = dtype.itemsize
        if row_bytes % size == 0 and all(address % size == 0 for address in addresses):
            return dtype
    return torch.uint8


def _as_rows(tensor: torch.Tensor, dtype: torch.dtype, width: int, lead: int = 0) -> torch.Tensor:
    """View a contiguous tensor's bytes as ``(rows, width)`` of ``dtype`` (``(lead, rows, width)`` when
    ``lead`` is given: one block of rows per layer)."""
    flat = tensor.reshape(-1).view(torch.uint8).view(dtype)
    return flat.view(lead, -1, width) if lead else flat.view(-1, width)


def _host_rows(tensor: torch.Tensor, width: int) -> np.ndarray:
    """A contiguous host tensor's bytes as a numpy ``(rows, width)`` ``uint8`` array (a view, no copy)."""
    flat = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    return flat.reshape(-1, width)


def _put_rows(cache: np.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows`` into rows ``index`` of ``cache`` (distinct rows: checked block ids)."""
    cache[index] = rows


def _layers(kv_caches: object, spec: PagedSpec) -> list[torch.Tensor]:
    """The tensors one op covers: the stacked cache, or each layer of a list."""
    if spec.layout == "stacked":
        return [cast("torch.Tensor", kv_caches)]
    if spec.layout == "vllm":
        return list(cast("list[torch.Tensor]", kv_caches))
    raise ChunkTypeError(f"layout {spec.layout!r} holds JAX arrays; torch moves 'vllm' and 'stacked' caches")


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


class TorchPaged:
    """A torch paged cache ready for many transfers: its row views are made once per row width.

    A ``"vllm"`` list costs one op per layer per call; making the layers' row views once per request (not
    once per chunk and layer) keeps the per-op Python cost small next to the bytes each op moves.

    Args:
        kv_caches: the paged cache (``"vllm"`` list or ``"stacked"`` tensor), as ``spec`` describes it.
        spec: the cache's geometry (:func:`lmcache.paged.describe`).
    """

    def __init__(self, kv_caches: object, spec: PagedSpec) -> None:
        self.spec = spec
        self.layers = _layers(kv_caches, spec)
        self.device = self.layers[0].device
        self._addresses = [offset for layer in self.layers for offset in _byte_offsets(layer)]
        self._views: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._host_views: dict[int, list[np.ndarray]] = {}

    def _host_plan(
        self, table: np.ndarray, start: int, chunk: torch.Tensor
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One ``(cache rows, row numbers, chunk rows)`` triple per layer, as numpy views of the cache's
        and the chunk's host memory (bytes, ``row_bytes`` wide)."""
        spec = self.spec
        count = chunk.shape[2]
        g = row_tokens(spec.block_size, start, count)
        width = g * spec.token_elems * spec.dtype.itemsize
        views = self._host_views.get(width)
        if views is None:
            views = self._host_views[width] = [_host_rows(layer, width) for layer in self.layers]
        rows = row_index(table, spec.block_size, start, count, g)
        rows_per_pair = spec.num_blocks * spec.block_size // g
        pair_rows = np.arange(spec.kv, dtype=np.int64)[:, None] * rows_per_pair
        chunk_rows = _host_rows(chunk, width).reshape(spec.num_layers, spec.kv * rows.shape[0], width)
        if spec.layout == "vllm":
            index = (pair_rows + rows[None, :]).reshape(-1)
            return [(view, index, part) for view, part in zip(views, chunk_rows, strict=True)]
        # stacked: layer l's K/V pairs are pairs l*K .. l*K+K-1 of the one tensor
        layer_rows = spec.kv * rows_per_pair
        return [
            (views[0], (layer * layer_rows + pair_rows + rows[None, :]).reshape(-1), part)
            for layer, part in enumerate(chunk_rows)
        ]

    def _plan(
        self, table: np.ndarray, start: int, chunk: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Row numbers for one op, the cache's row views, and the chunk's rows (one block per op)."""
        spec = self.spec
        count = chunk.shape[2]
        g = row_tokens(spec.block_size, start, count)
        row_bytes = g * spec.token_elems * spec.dtype.itemsize
        dtype = _row_dtype(row_bytes, [*self._addresses, *_byte_offsets(chunk)])
        width = row_bytes // dtype.itemsize
        views = self._views.get((dtype, width))
        if views is None:
            views = self._views[dtype, width] = [_as_rows(layer, dtype, width) for layer in self.layers]
        # One op covers every (layer, K/V) pair of its tensor: L * K for a stacked cache, K for one layer
        # of a list; pair p's rows start at p * rows_per_pair.
        rows = row_index(table, spec.block_size, start, count, g)
        pairs = spec.kv * (spec.num_layers if spec.layout == "stacked" else 1)
        rows_per_pair = spec.num_blocks * spec.block_size // g
        index = (np.arange(pairs, dtype=np.int64)[:, None] * rows_per_pair + rows[None, :]).reshape(-1)
        lead = 0 if spec.layout == "stacked" else spec.num_layers
        return torch.from_numpy(index).to(self.device), views, _as_rows(chunk, dtype, width, lead)

    def gather_into(self, table: np.ndarray, start: int, dst: torch.Tensor) -> None:
        """Copy tokens ``start .. start+n-1`` of a request from its blocks into ``dst``.

        Args:
            table: the request's checked block ids (:func:`lmcache.paged.block_table`), covering the range.
            start: first token to copy.
            dst: a contiguous ``(L, K, n, H, D)`` tensor of the cache's dtype, on any device (a slot view).

        Raises:
            ChunkShapeError: ``dst`` has the wrong shape or dtype, or is not contiguous.
        """
        _check_chunk(dst, self.spec, "the destination chunk")
        if not dst.is_contiguous():
            raise ChunkShapeError("the destination chunk must be contiguous (a slot view is)")
        target = dst if dst.device == self.device else torch.empty_like(dst, device=self.device)
        if self.device.type == "cpu":
            tasks: list[Callable[[], object]] = [
                partial(np.take, cache, index, axis=0, out=out, mode="clip")  # ids checked: never clips
                for cache, index, out in self._host_plan(table, start, target)
            ]
            copy_engine.run(tasks)
            if target is not dst:
                dst.copy_(target)
            return
        index, views, out = self._plan(table, start, target)
        if self.spec.layout == "stacked":
            torch.index_select(views[0], 0, index, out=out)
        else:
            for layer, out_layer in zip(views, out, strict=True):
                torch.index_select(layer, 0, index, out=out_layer)
        if target is not dst:
            dst.copy_(target)
        _wait(self.device)

    def scatter_from(self, table: np.ndarray, start: int, src: torch.Tensor) -> None:
        """Copy ``src`` (``n`` tokens) into tokens ``start .. start+n-1`` of a request's blocks, in place.

        Only those tokens' positions are written: the rest of each block and every other block keep their
        bytes.

        Args:
            table: the request's checked block ids, covering the range.
            start: first token to write.
            src: a ``(L, K, n, H, D)`` tensor of the cache's dtype, on any device.

        Raises:
            ChunkShapeError: ``src`` has the wrong shape or dtype.
        """
        _check_chunk(src, self.spec, "the source chunk")
        source = src.to(self.device).contiguous()
        if self.device.type == "cpu":
            copy_engine.run(
                [
                    partial(_put_rows, cache, index, part)
                    for cache, index, part in self._host_plan(table, start, source)
                ]
            )
            return
        index, views, rows = self._plan(table, start, source)
        if self.spec.layout == "stacked":
            views[0].index_copy_(0, index, rows)
        else:
            for layer, part in zip(views, rows, strict=True):
                layer.index_copy_(0, index, part)
        _wait(self.device)


def gather_into(kv_caches: object, spec: PagedSpec, table: np.ndarray, start: int, dst: torch.Tensor) -> None:
    """Copy tokens ``start .. start+n-1`` of a request from its blocks into ``dst`` (see
    :meth:`TorchPaged.gather_into`; prepare a :class:`TorchPaged` once for many chunks)."""
    TorchPaged(kv_caches, spec).gather_into(table, start, dst)


def scatter_from(
    kv_caches: object, spec: PagedSpec, table: np.ndarray, start: int, src: torch.Tensor
) -> None:
    """Copy ``src`` into tokens ``start .. start+n-1`` of a request's blocks, in place (see
    :meth:`TorchPaged.scatter_from`)."""
    TorchPaged(kv_caches, spec).scatter_from(table, start, src)


def _wait(device: torch.device) -> None:
    """Wait for the copies on a GPU: a chunk's slot is read (or published) as soon as this returns."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


__all__ = ["TorchPaged", "gather_into", "scatter_from"]
