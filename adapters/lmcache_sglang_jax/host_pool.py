"""``LMCacheHostKVPool``: sglang-jax's ``HostKVPool`` ABC over an LMCache JAX pool.

A slot of the LMCache pool holds one entry of the host pool: ``layer_num`` layers of up to
``max_padded_pages`` device pages each, each page a row of ``prod(per_layer_shape)`` elements. The
pool's chunk shape is ``(layer_num, 1, max_padded_pages, 1, prod(per_layer_shape))``: the token axis
carries pages, so one slot is exactly one entry and the slot ids are the buffer ids sglang-jax sees.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import jax
import numpy as np
from sgl_jax.srt.mem_cache.host_kv_pool import HostKVPool, StagedData

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import ChunkShapeError, ConfigError, DoubleFreeError, InvalidHandleError
from lmcache.layout import SlotLayout
from lmcache.storage_backend.mem_pool import KVObj, LocalCPUPool


class LMCacheHostKVPool(HostKVPool):  # type: ignore[misc]
    """sglang-jax's PD host-staging pool (``QueueHostKVPool``'s role) on an LMCache JAX pool.

    Takes ``QueueHostKVPool``'s constructor arguments, so it is a drop-in where sglang-jax builds
    one. ``mesh`` and ``partition_spec`` are accepted for that signature; the LMCache arena is one
    host buffer, not a sharded array, so staged layers are single-device host arrays.

    Args:
        pool_size: entries (slots) in the pool.
        max_padded_pages: the most pages one layer of an entry may have.
        layer_num: layers per entry.
        per_layer_shape: shape of one page of one layer (the device KV buffer's ``shape[1:]``).
        dtype: element dtype of the KV (any numpy/JAX dtype, bfloat16 included).
        mesh, partition_spec: as for ``QueueHostKVPool``; unused (see above).
        pool_name: a name for logs.

    Raises:
        ConfigError: a size is not a positive int, or the shape is empty.
    """

    def __init__(
        self,
        pool_size: int,
        max_padded_pages: int,
        layer_num: int,
        per_layer_shape: tuple[int, ...],
        dtype: Any,
        mesh: Any = None,
        partition_spec: Any = None,
        *,
        pool_name: str = "default",
    ) -> None:
        for name, value in (
            ("pool_size", pool_size),
            ("max_padded_pages", max_padded_pages),
            ("layer_num", layer_num),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        shape = tuple(int(d) for d in per_layer_shape)
        if not shape or any(d <= 0 for d in shape):
            raise ConfigError(
                f"per_layer_shape must be a non-empty tuple of positive ints, got {per_layer_shape!r}"
            )
        self._pool_size = pool_size
        self._max_padded_pages = max_padded_pages
        self._layer_num = layer_num
        self._per_layer_shape = shape
        self._row = math.prod(shape)
        self._dtype = np.dtype(dtype)
        self._mesh = mesh
        self._partition_spec = partition_spec
        self._pool_name = pool_name
        kv_shape = (layer_num, 1, max_padded_pages, 1, self._row)
        slot_bytes = SlotLayout.from_metadata(LMCacheMemPoolMetadata(kv_shape, self._dtype, 1.0)).slot_bytes
        # Half a slot of slack so that floor(budget / slot) is exactly pool_size despite float rounding.
        budget_gib = (pool_size + 0.5) * slot_bytes / 2**30
        self._pool = LocalCPUPool(LMCacheMemPoolMetadata(kv_shape, self._dtype, budget_gib), backend="jax")
        if self._pool.max_chunk_num != pool_size:
            self._pool.close()
            raise ConfigError(f"the LMCache pool holds {self._pool.max_chunk_num} entries, not {pool_size}")
        self._probe = np.broadcast_to(np.zeros((), dtype=self._dtype), kv_shape)
        self._lock = threading.Lock()
        self._held: dict[int, KVObj] = {}

    # -- the HostKVPool ABC ------------------------------------------------------------------------
    def reserve(self) -> int | None:
        """Take a free slot and return its id, or ``None`` when all ``pool_size`` are reserved."""
        with self._lock:
            obj = self._pool.allocate(self._probe)
            if obj is None:
                return None
            self._held[obj.chunk_idx] = obj
            return obj.chunk_idx

    def release(self, buffer_id: int) -> None:
        """Give a reserved slot back.

        Raises:
            InvalidHandleError: ``buffer_id`` is not an int in ``[0, pool_size)``.
            DoubleFreeError: the slot is not reserved (never reserved, or released already).
        """
        with self._lock:
            obj = self._held_obj(buffer_id)
            self._pool.free(obj)
            del self._held[buffer_id]

    def available_size(self) -> int:
        """Slots free to :meth:`reserve`."""
        with self._lock:
            return self._pool_size - len(self._held)

    def total_size(self) -> int:
        """Slots in the pool, free and reserved."""
        return self._pool_size

    def copy_from_device(self, layers: list[jax.Array], buffer_id: int) -> StagedData:
        """Copy ``layers`` (per layer ``(padded_pages, *per_layer_shape)``) into slot ``buffer_id``.

        The bytes land in the LMCache slot; the returned ``StagedData.array_pytree`` holds per-layer
        host ``jax.Array`` copies of them, as sglang-jax's PD producer reads. The caller releases
        ``buffer_id`` when the consumer has pulled the data.

        Raises:
            InvalidHandleError, DoubleFreeError: ``buffer_id`` is not a reserved slot.
            ChunkShapeError: wrong layer count, shape or dtype; the slot is unchanged.
        """
        with self._lock:
            obj = self._held_obj(buffer_id)
        pages = self._check_layers(layers)
        view = obj.as_numpy()
        hosts = [np.asarray(jax.device_get(layer)) for layer in layers]
        for i, host in enumerate(hosts):
            view[i, 0, :pages, 0, :] = host.reshape(pages, self._row)
        staged = [
            np.array(view[i, 0, :pages, 0, :]).reshape(pages, *self._per_layer_shape)
            for i in range(self._layer_num)
        ]
        cpu = jax.devices("cpu")[0]
        return StagedData(buffer_id=buffer_id, array_pytree=[jax.device_put(a, cpu) for a in staged])

    # -- beyond the ABC ----------------------------------------------------------------------------
    def read_slot(self, buffer_id: int, padded_pages: int) -> list[np.ndarray]:
        """Return copies of the first ``padded_pages`` pages of every layer of a reserved slot.

        Raises:
            InvalidHandleError, DoubleFreeError: ``buffer_id`` is not a reserved slot.
            ChunkShapeError: ``padded_pages`` is outside ``[1, max_padded_pages]``.
        """
        with self._lock:
            obj = self._held_obj(buffer_id)
        if not isinstance(padded_pages, int) or not 1 <= padded_pages <= self._max_padded_pages:
            raise ChunkShapeError(
                f"padded_pages must be an int in [1, {self._max_padded_pages}], got {padded_pages!r}"
            )
        view = obj.as_numpy()
        return [
            np.array(view[i, 0, :padded_pages, 0, :]).reshape(padded_pages, *self._per_layer_shape)
            for i in range(self._layer_num)
        ]

    def close(self) -> None:
        """Release the LMCache pool's memory; the pool is unusable afterwards."""
        with self._lock:
            self._held.clear()
            self._pool.close()

    def _held_obj(self, buffer_id: int) -> KVObj:
        if not isinstance(buffer_id, (int, np.integer)) or isinstance(buffer_id, bool):
            raise InvalidHandleError(f"buffer_id must be an int, got {type(buffer_id).__name__}")
        buffer_id = int(buffer_id)
        if not 0 <= buffer_id < self._pool_size:
            raise InvalidHandleError(
                f"buffer_id={buffer_id} is outside the pool's range [0, {self._pool_size})"
            )
        obj = self._held.get(buffer_id)
        if obj is None:
            raise DoubleFreeError(
                f"buffer_id={buffer_id} is not reserved: reserve() it first (or it was released)"
            )
        return obj

    def _check_layers(self, layers: list[jax.Array]) -> int:
        if not isinstance(layers, (list, tuple)) or len(layers) != self._layer_num:
            got = len(layers) if isinstance(layers, (list, tuple)) else type(layers).__name__
            raise ChunkShapeError(f"expected a list of {self._layer_num} layers, got {got}")
        shape0 = getattr(layers[0], "shape", None)
        if shape0 is None or len(shape0) == 0:
            raise ChunkShapeError("layers must be arrays of shape (padded_pages, *per_layer_shape)")
        pages = int(shape0[0])
        if not 1 <= pages <= self._max_padded_pages:
            raise ChunkShapeError(
                f"layer has {pages} pages; the pool takes 1 to max_padded_pages={self._max_padded_pages}"
            )
        expected = (pages, *self._per_layer_shape)
        for i, layer in enumerate(layers):
            if tuple(getattr(layer, "shape", ())) != expected:
                raise ChunkShapeError(
                    f"layer {i} has shape {getattr(layer, 'shape', None)}, expected {expected}"
                )
            if np.dtype(layer.dtype) != self._dtype:
                raise ChunkShapeError(f"layer {i} has dtype {layer.dtype}, expected {self._dtype}")
        return pages
