"""Paged KV caches: layouts, validation and the token -> (block, offset) arithmetic.

Serving engines keep KV in paged caches: fixed blocks of ``block_size`` tokens, a request's tokens spread
over blocks listed in its block table (token ``t`` at block ``block_ids[t // block_size]``, offset
``t % block_size``). Moving a request between a paged cache and contiguous ``(L, 2, n, H, D)`` chunks
is a gather (store) or a scatter (load). This module owns the framework-neutral part: which layouts
exist, checking a paged cache and a block table before anything is read or written, and turning a token
range into row indices. The copies themselves are per framework, in ``lmcache_torch.paged`` and
``lmcache_jax.paged``, imported only when a cache of that framework is used (:func:`kernels`).

Rows: the kernels view a cache as rows of ``g`` consecutive tokens of one block, where ``g`` divides
``block_size``, the range's start and its length (:func:`row_tokens`). Wide rows (a whole block when the
range is block-aligned) turn the gather into a few large memory copies instead of one per token.

Layouts (``L`` layers, ``K`` = 2 for K and V or 1 for MLA, ``B`` blocks of ``S`` tokens, ``H`` KV heads
of size ``D``):

- ``"vllm"``: a list of ``L`` torch tensors ``(K, B, S, H, D)`` (vLLM's FlashAttention layout).
- ``"stacked"``: one torch or JAX array ``(L, K, B, S, H, D)``.
- ``"interleaved"``: a list of ``L`` JAX arrays ``(B, S, 2 * H, D)``, head ``2h`` holding K of head ``h``
  and ``2h + 1`` its V (tpu-inference's layout without sub-word packing). It has no MLA form.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from lmcache import copy_engine
from lmcache.dtypes import DTypeSpec, normalize_dtype
from lmcache.errors import (
    BackendUnavailableError,
    ChunkShapeError,
    ChunkTypeError,
    ConfigError,
    OverlapError,
)
from lmcache.layout import SlotLayout
from lmcache.memory import first_overlap
from lmcache.registry import detect_framework, load_adapter

#: Every paged layout, and the frameworks each accepts.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "vllm": ("torch",),
    "stacked": ("torch", "jax"),
    "interleaved": ("jax",),
}

#: Framework -> module with the paged kernels (imported lazily).
KERNEL_MODULES: dict[str, str] = {"torch": "lmcache_torch.paged", "jax": "lmcache_jax.paged"}


@dataclass(frozen=True)
class PagedSpec:
    """The geometry of one paged KV cache, as found by :func:`describe`.

    Attributes:
        layout: ``"vllm"``, ``"stacked"`` or ``"interleaved"``.
        framework: ``"torch"`` or ``"jax"``.
        num_layers: ``L``.
        kv: 2 (K and V) or 1 (MLA).
        num_blocks: blocks in the cache (``B``).
        block_size: tokens per block (``S``).
        num_kv_heads: ``H`` (for ``"interleaved"``, half the head axis).
        head_size: ``D``.
        dtype: element type.
    """

    layout: str
    framework: str
    num_layers: int
    kv: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: DTypeSpec

    @property
    def token_elems(self) -> int:
        """Elements of one token in one layer and one of K / V: ``H * D``."""
        return self.num_kv_heads * self.head_size

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of ``num_tokens`` tokens as a contiguous chunk: ``(L, K, n, H, D)``."""
        return (self.num_layers, self.kv, num_tokens, self.num_kv_heads, self.head_size)

    def check_fits(self, layout: SlotLayout) -> None:
        """Check that chunks of this cache have the pool's ``(L, K, H, D)`` and dtype.

        Raises:
            ChunkShapeError: a dimension or the dtype differs; the message names which.
        """
        L, kv, _, H, D = layout.kv_shape
        ours = (self.num_layers, self.kv, self.num_kv_heads, self.head_size)
        for name, got, want in zip(
            ("num_layers", "K/V", "num_kv_heads", "head_size"), ours, (L, kv, H, D), strict=True
        ):
            if got != want:
                raise ChunkShapeError(
                    f"the {self.layout!r} paged cache has {name} = {got} but the pool's chunks have {want} "
                    f"(pool kv_shape {layout.kv_shape}); use a pool built for this model"
                )
        if self.dtype is not layout.dtype:
            raise ChunkShapeError(
                f"the paged cache has dtype {self.dtype.name} but the pool holds {layout.dtype.name}; "
                "use a pool of the cache's dtype"
            )


def framework_of_array(obj: object) -> str | None:
    """Name the framework of a torch or JAX array (subclasses too); None for anything else."""
    framework = detect_framework(obj)
    return framework if framework in ("torch", "jax") else None


def _shape_of(array: Any, what: str, framework: str) -> tuple[int, ...]:
    if framework_of_array(array) != framework or not hasattr(array, "shape"):
        raise ChunkTypeError(f"{what} must be a {framework} array, got {type(array).__name__}")
    return tuple(int(d) for d in array.shape)


def _dtype_of(array: Any, what: str) -> DTypeSpec:
    try:
        return normalize_dtype(array.dtype)
    except ConfigError as exc:
        raise ChunkShapeError(f"{what} has an unsupported dtype: {exc}") from exc


def describe(kv_caches: Any, layout: str) -> PagedSpec:
    """Check a paged KV cache against ``layout`` and return its geometry.

    Reads only shapes, dtypes, devices and (torch) strides: nothing is copied.

    Args:
        kv_caches: a list of per-layer arrays (``"vllm"``, ``"interleaved"``) or one array (``"stacked"``).
        layout: one of :data:`LAYOUTS`.

    Returns:
        The cache's :class:`PagedSpec`.

    Raises:
        ConfigError: ``layout`` is not a known layout.
        ChunkTypeError: ``kv_caches`` is not the container or framework the layout takes.
        ChunkShapeError: a shape, dtype or device does not fit the layout, or layers differ.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown paged layout {layout!r}; use one of {', '.join(map(repr, LAYOUTS))}")
    if layout == "stacked":
        framework = framework_of_array(kv_caches)
        if framework is None:
            raise ChunkTypeError(
                f"layout 'stacked' takes one torch or JAX array (L, K, B, S, H, D), "
                f"got {type(kv_caches).__name__}"
            )
        shape = _shape_of(kv_caches, "the stacked paged cache", framework)
        if len(shape) != 6 or shape[1] not in (1, 2):
            raise ChunkShapeError(
                f"a 'stacked' paged cache has shape (num_layers, 2 or 1, num_blocks, block_size, "
                f"num_kv_heads, head_size), got {shape}"
            )
        layers = [kv_caches]
        L, kv, B, S, H, D = shape
    else:
        framework = LAYOUTS[layout][0]
        if not isinstance(kv_caches, (list, tuple)) or not kv_caches:
            raise ChunkTypeError(
                f"layout {layout!r} takes a non-empty list of per-layer {framework} arrays, "
                f"got {type(kv_caches).__name__}"
            )
        layers = list(kv_caches)
        shape = _shape_of(layers[0], "layer 0 of the paged cache", framework)
        L = len(layers)
        if layout == "vllm":
            if len(shape) != 5 or shape[0] not in (1, 2):
                raise ChunkShapeError(
                    f"a 'vllm' paged cache layer has shape (2 or 1, num_blocks, block_size, num_kv_heads, "
                    f"head_size), got {shape}"
                )
            kv, B, S, H, D = shape
        else:
            if len(shape) != 4 or shape[2] % 2:
                raise ChunkShapeError(
                    f"an 'interleaved' paged cache layer has shape (num_blocks, block_size, "
                    f"2 * num_kv_heads, head_size) with K and V interleaved on the head axis, got {shape}"
                )
            B, S, H2, D = shape
            kv, H = 2, H2 // 2
        for index, layer in enumerate(layers[1:], 1):
            other = _shape_of(layer, f"layer {index} of the paged cache", framework)
            if other != shape:
                raise ChunkShapeError(f"layer {index} of the paged cache has shape {other}, layer 0 {shape}")
    if framework == "jax":
        for index, layer in enumerate(layers):
            if layer.is_deleted():
                raise ChunkTypeError(
                    f"layer {index} of the paged cache was deleted (donated to an earlier load_paged?); "
                    "pass the caches that load_paged returned"
                )
    adapter = load_adapter(framework)
    for index, layer in enumerate(layers):  # meta, sparse, quantized tensors, tracers: no memory to move
        try:
            adapter.check_source(layer)
        except ChunkTypeError as exc:
            raise ChunkTypeError(f"layer {index} of the paged cache: {exc}") from None
    dtype = _dtype_of(layers[0], "the paged cache")
    devices = set()
    for index, layer in enumerate(layers):
        if _dtype_of(layer, f"layer {index}") is not dtype:
            raise ChunkShapeError(
                f"layer {index} of the paged cache has dtype {layer.dtype}, layer 0 {dtype.name}"
            )
        devices.add(_device_of(layer, framework))
        if framework == "torch" and not layer.is_contiguous():
            raise ChunkShapeError(
                f"layer {index} of the paged cache is not contiguous; the kernels write into the cache's own "
                "memory, so pass the engine's contiguous cache tensors (not a transposed or sliced view)"
            )
    if len(devices) > 1:
        raise ChunkShapeError(f"the paged cache's layers live on different devices: {sorted(devices)}")
    if min(L, B, S, H, D) < 1:
        raise ChunkShapeError(f"every dimension of a paged cache must be positive, got {shape}")
    return PagedSpec(layout, framework, L, kv, B, S, H, D, dtype)


def check_scatter_target(kv_caches: Any, spec: PagedSpec, overlaps_pool: Callable[[Any], bool]) -> None:
    """Check the arrays a scatter writes into, before anything is read or written.

    Each layer must be memory of its own: two layers that share bytes (one array named twice, or two
    views of one buffer such as ``[t, t.view(t.shape)]``) would get one layer's KV written over
    another's (or be donated twice), and a layer that overlaps the pool's arena (``overlaps_pool``)
    would have chunks other owners hold overwritten.

    Raises:
        OverlapError: two layers share memory, or a layer overlaps the pool.
    """
    layers = list(kv_caches) if isinstance(kv_caches, (list, tuple)) else [kv_caches]
    adapter = load_adapter(spec.framework)
    extents = [adapter.memory_extent(layer) for layer in layers]
    seen: dict[int, int] = {}
    pair = None
    for index, layer in enumerate(layers):  # identity too: JAX gives no address for some arrays
        pair = (seen[id(layer)], index) if id(layer) in seen else pair
        seen.setdefault(id(layer), index)
    pair = pair or first_overlap(extents)
    if pair is not None:
        raise OverlapError(
            f"layers {pair[0]} and {pair[1]} of the paged cache share memory (one array named for two "
            "layers, or views of one buffer); pass one array per layer, each with memory of its own (a "
            "scatter would write one layer's KV over another's)"
        )
    for index, layer in enumerate(layers):
        if overlaps_pool(layer):
            raise OverlapError(
                f"layer {index} of the paged cache overlaps the cache's pool (a view of its arena): "
                "loading into it would overwrite cached chunks; pass the engine's own KV cache"
            )


def _device_of(array: Any, framework: str) -> str:
    if framework == "torch":
        return str(array.device)
    devices = array.devices() if hasattr(array, "devices") else ()
    return ",".join(sorted(str(d) for d in devices))


def block_table(block_ids: Any, num_tokens: int, spec: PagedSpec) -> np.ndarray:
    """Check a request's block table and return the ids its first ``num_tokens`` tokens use.

    Args:
        block_ids: a 1-D sequence or array (list, tuple, numpy, torch, JAX) of integer block ids.
        num_tokens: tokens that will be read or written; ``ceil(num_tokens / block_size)`` ids are used.
        spec: the paged cache the ids index.

    Returns:
        The used ids as a new ``int64`` numpy array (ids past the used part are ignored).

    Raises:
        ChunkTypeError: the ids are not a 1-D sequence of integers.
        ChunkShapeError: too few ids, an id out of ``0..num_blocks-1``, or an id used twice.
    """
    needed = -(-num_tokens // spec.block_size)
    ids = _as_int_array(block_ids)
    if ids.shape[0] < needed:
        raise ChunkShapeError(
            f"{num_tokens} tokens in blocks of {spec.block_size} need {needed} block ids, got {ids.shape[0]}"
        )
    used = ids[:needed].astype(np.int64, copy=True)
    if needed:
        low, high = int(used.min()), int(used.max())
        if low < 0 or high >= spec.num_blocks:
            bad = low if low < 0 else high
            raise ChunkShapeError(
                f"block id {bad} is out of range: the paged cache has blocks 0..{spec.num_blocks - 1}"
            )
        ordered = np.sort(used)
        repeats = ordered[1:][ordered[1:] == ordered[:-1]]
        if repeats.size:
            raise ChunkShapeError(
                f"block id {int(repeats[0])} appears twice among the {needed} block ids in use; a block "
                "holds one request's tokens once"
            )
    return used


def _as_int_array(block_ids: Any) -> np.ndarray:
    if isinstance(block_ids, (str, bytes)) or np.isscalar(block_ids) or block_ids is None:
        raise ChunkTypeError(f"block_ids must be a 1-D sequence of integers, got {type(block_ids).__name__}")
    if framework_of_array(block_ids) == "torch":
        if block_ids.is_meta:
            raise ChunkTypeError(
                "block_ids is a meta tensor, which holds no ids; pass the block table itself"
            )
        block_ids = block_ids.detach().cpu().numpy()
    try:
        ids = np.asarray(block_ids)
    except (TypeError, ValueError) as exc:
        raise ChunkTypeError(f"block_ids must be a 1-D sequence of integers: {exc}") from exc
    if ids.ndim != 1:
        raise ChunkTypeError(f"block_ids must be 1-D, got shape {ids.shape}")
    if ids.size == 0:
        return np.zeros(0, np.int64)
    if ids.dtype.kind not in "iu" or (
        isinstance(block_ids, (list, tuple))
        and any(
            isinstance(i, (bool, np.bool_)) or str(getattr(i, "dtype", "")) in ("bool", "torch.bool")
            for i in block_ids
        )
    ):
        raise ChunkTypeError(f"block_ids must be integer ids (not bools or floats), got dtype {ids.dtype}")
    return ids


def row_tokens(block_size: int, start: int, count: int) -> int:
    """Tokens per row for moving tokens ``start .. start+count-1``: the widest ``g`` that divides
    ``block_size``, ``start`` and ``count``, so every row lies inside one block."""
    return math.gcd(block_size, start, count) or block_size


def row_index(table: np.ndarray, block_size: int, start: int, count: int, g: int) -> np.ndarray:
    """Row numbers, in a cache viewed as ``num_blocks * block_size / g`` rows of ``g`` tokens, of tokens
    ``start, start + g, ..., start + count - g`` (``g`` must divide ``block_size``, ``start``, ``count``).

    Returns:
        ``count // g`` row numbers as ``int64``, in token order.
    """
    tokens = np.arange(start, start + count, g, dtype=np.int64)
    return table[tokens // block_size] * (block_size // g) + (tokens % block_size) // g


def kernels(framework: str) -> ModuleType:
    """Import and return the paged kernels of ``framework``: ``lmcache_torch.paged`` or ``lmcache_jax.paged``.

    Raises:
        BackendUnavailableError: the framework or its adapter is not installed.
    """
    try:
        return importlib.import_module(KERNEL_MODULES[framework])
    except ImportError as exc:
        raise BackendUnavailableError(
            f"paged transfer for {framework} caches needs {framework}: "
            f"pip install 'lmcache-mempool[{framework}]'"
        ) from exc


class PagedRequest:
    """One request's paged cache and block table, checked against a pool; copies chunks to and from slots.

    :class:`~lmcache.chunk_cache.ChunkCache` drives it: ``store_paged`` asks :meth:`gather_into_slot` for
    each missing chunk, ``load_paged`` hands :meth:`scatter_chunks` the cached prefix's slots. The cache
    keeps its own slot handling (eviction, pins, visibility); this class only knows where tokens are.

    Args:
        kv_caches: the paged cache, in ``layout``.
        block_ids: the request's block table (checked by :meth:`check_table`).
        layout: one of :data:`LAYOUTS`.
        pool_layout: the pool's slot layout; the cache's ``(L, K, H, D)`` and dtype must match it.
        host: whether the pool's slots are in host memory (numpy copies) or on a device.

    Raises:
        ConfigError, ChunkTypeError, ChunkShapeError: as :func:`describe` and :meth:`PagedSpec.check_fits`.
        BackendUnavailableError: the cache's framework adapter cannot be imported.
    """

    def __init__(
        self, kv_caches: Any, block_ids: Any, layout: str, pool_layout: SlotLayout, *, host: bool
    ) -> None:
        self.spec = describe(kv_caches, layout)
        self.spec.check_fits(pool_layout)
        self.kv_caches = kv_caches
        self.block_ids = block_ids
        self.host = host
        self.chunk_size = pool_layout.chunk_size
        self.table = np.zeros(0, np.int64)
        self._kernels = kernels(self.spec.framework)
        # torch: the cache's row views, made once for every chunk of the request.
        self._torch = (
            self._kernels.TorchPaged(kv_caches, self.spec) if self.spec.framework == "torch" else None
        )
        # JAX: whether the kernels move the cache's bytes with numpy (a CPU cache), and else tokens
        # _origin .. total-1, gathered by one call.
        self._on_host = self.spec.framework == "jax" and self._kernels.on_host(kv_caches, self.spec)
        self._gathered: Any = None
        self._origin = 0
        self._per_layer = False

    def check_table(self, num_tokens: int) -> None:
        """Check the block table for the first ``num_tokens`` tokens and keep the ids in use.

        Raises:
            ChunkTypeError, ChunkShapeError: as :func:`block_table`.
        """
        self.table = block_table(self.block_ids, num_tokens, self.spec)

    def coverable_tokens(self, num_tokens: int) -> int:
        """How many of the first ``num_tokens`` tokens the table can place: the blocks before its first
        id that is out of range or repeated, times the block size (at most ``num_tokens``).

        A load uses it to fetch no more remote chunks than the table can take.

        Raises:
            ChunkTypeError: the ids are not a 1-D sequence of integers.
        """
        ids = _as_int_array(self.block_ids)
        bad = np.flatnonzero((ids < 0) | (ids >= self.spec.num_blocks))
        usable = int(bad[0]) if bad.size else ids.shape[0]
        _, first = np.unique(ids[:usable], return_index=True)
        repeated = np.ones(usable, dtype=bool)
        repeated[first] = False
        if repeated.any():
            usable = int(np.argmax(repeated))
        return min(usable * self.spec.block_size, num_tokens)

    def gather_into_slot(self, obj: Any, start: int, count: int, total: int) -> None:
        """Copy tokens ``start .. start+count-1`` of the request into the slot of ``obj`` (a KVObj).

        torch: one gather straight into the slot's view. JAX in host memory: the same, with numpy on the
        cache's buffers. Other JAX caches: the first call gathers tokens ``start .. total-1`` at once (one
        jitted call, padded to whole chunks) and every call copies its chunk out of that result.
        """
        if self._torch is not None:
            self._torch.gather_into(self.table, start, obj.as_torch())
            return
        if self.host and self._on_host:  # a JAX cache in host memory: numpy reads its buffers
            self._kernels.gather_into(self.kv_caches, self.spec, self.table, start, obj.as_numpy())
            return
        if self._gathered is None:  # a store asks for its chunks in order: gather them all once
            self._origin = start
            gathered = self._kernels.gather(
                self.kv_caches, self.spec, self.table, start, total - start, bucket=self.chunk_size
            )
            # One (L, K, m, H, D) array, or one (K, m, H, D) array per layer; on the CPU, numpy views.
            self._per_layer = isinstance(gathered, list)
            layers = gathered if self._per_layer else [gathered]
            self._gathered = [np.asarray(x) for x in layers] if self.host else layers
        offset = start - self._origin
        pieces = [layer[..., offset : offset + count, :, :] for layer in self._gathered]
        if not self.host:
            obj.copy_from(self._kernels.stack_layers(pieces) if self._per_layer else pieces[0])
        elif self._per_layer:
            slot = obj.as_numpy()
            for index, piece in enumerate(pieces):
                copy_engine.copy(slot[index], piece)
        else:
            copy_engine.copy(obj.as_numpy(), pieces[0])

    def scatter_chunks(self, chunks: Sequence[tuple[int, Any]], total: int) -> Any:
        """Write chunks (``(start, KVObj)`` pairs covering tokens ``0 .. total-1``) into the blocks.

        Returns:
            torch: ``total`` (the cache was written in place). JAX: the new paged cache (donated: the
            arrays passed in are invalid afterwards; see :func:`lmcache_jax.paged.scatter_pieces`).
        """
        if self._torch is not None:
            for start, obj in chunks:
                self._torch.scatter_from(self.table, start, obj.as_torch())
            return total
        pieces = [(start, obj.as_numpy() if self.host else obj.clone("numpy")) for start, obj in chunks]
        return self._kernels.scatter_pieces(
            self.kv_caches, self.spec, self.table, pieces, bucket=self.chunk_size
        )


__all__ = [
    "KERNEL_MODULES",
    "LAYOUTS",
    "PagedRequest",
    "PagedSpec",
    "block_table",
    "check_scatter_target",
    "describe",
    "framework_of_array",
    "kernels",
    "row_index",
    "row_tokens",
]
