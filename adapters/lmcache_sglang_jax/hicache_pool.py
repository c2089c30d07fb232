"""``LMCacheLRUHostKVPool``: sglang-jax's HiCache L2 host pool (``LRUHostKVPool``'s role) on LMCache.

sglang-jax's hierarchical cache (``UnifiedRadixCache`` + ``HiCacheController``) keeps KV pages that
leave HBM in a *retaining*, page-addressed host pool: ``alloc(n)`` / ``free(ids)`` of host page ids,
``stage_backup -> flush_backup`` (device -> host), ``stage_load -> flush_load`` (host -> device),
``inc_lock_ref`` / ``dec_lock_ref``. This class is that pool on a
:class:`~lmcache.storage_backend.mem_pool.LocalCPUPool` with the JAX backend: one LMCache slot per host
page, the slot ids are the page ids sglang-jax sees, and the bytes of a backed-up page live in its slot
(``pinned_host`` memory where JAX offers it, plain host memory otherwise).

Eviction: sglang-jax's pool never evicts. ``alloc`` is all-or-nothing and returns ``None`` when short;
the radix cache then evicts its own LRU host leaves (``UnifiedRadixCache.evict_host``) and retries,
because only the tree knows which page ids a node owns. No victim choice is left to the pool, so none
is made here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as _PartitionSpec
from sgl_jax.srt.mem_cache.host_kv_pool import HostKVPool

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import normalize_dtype
from lmcache.errors import (
    ChunkShapeError,
    ConfigError,
    DoubleFreeError,
    InvalidHandleError,
    MemPoolError,
)
from lmcache.layout import SlotLayout
from lmcache.storage_backend.mem_pool import KVObj, LocalCPUPool
from lmcache_jax import pinned_host_bytes

logger = logging.getLogger(__name__)
PartitionSpec: Any = _PartitionSpec  # untyped in jax's stubs

#: Page-count buckets of the transfer kernels (sglang-jax's ``_KV_GATHER_PAGE_BUCKETS``): a transfer of
#: ``n`` pages compiles for the smallest bucket ``>= n``, so serving compiles a bounded set of shapes.
PAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class HostPageStateError(InvalidHandleError, RuntimeError):
    """A host page id is in range but in the wrong state for the call: not allocated (in the free
    list), locked (``lock_ref > 0``) for a free, or unlocked for ``dec_lock_ref``.

    Also a ``RuntimeError``, which is what sglang-jax's ``LRUHostKVPool`` raises for these."""


class HostPageDoubleFreeError(HostPageStateError, DoubleFreeError):
    """A host page id that is free already was freed (or released) again."""


class TransferOrderError(MemPoolError, RuntimeError):
    """A two-phase transfer was finished before it was started (``flush_backup`` without
    ``stage_backup``, ``flush_load`` without ``stage_load``), or a page with no backed-up bytes was
    loaded. A ``RuntimeError``, as in sglang-jax."""


def pad_to_page_bucket(num_pages: int) -> int:
    """The bucket a transfer of ``num_pages`` pages runs at: the smallest of :data:`PAGE_BUCKETS`
    that holds it, beyond the largest a multiple of it (never truncates, bounds compiled shapes)."""
    for bucket in PAGE_BUCKETS:
        if bucket >= num_pages:
            return bucket
    largest = PAGE_BUCKETS[-1]
    return -(-num_pages // largest) * largest


# XLA on the CPU rewrites the payload of a bfloat16 NaN in a scatter or concatenate (0x7F8C becomes
# 0x7FC0); on the unsigned-int bits every op moves bytes unchanged. So pages are gathered, stacked and
# scattered as bits and bitcast back only into the KV buffer.
@partial(jax.jit, static_argnames=("out_sharding",))
def _gather_one_layer(buf: jax.Array, page_indices: jax.Array, out_sharding: Any) -> jax.Array:
    """The bits of rows ``page_indices`` of one layer's KV buffer (one compile per bucket)."""
    bits = jax.lax.bitcast_convert_type(buf, normalize_dtype(buf.dtype).bits_dtype)
    return bits.at[page_indices].get(out_sharding=out_sharding)


@partial(jax.jit, static_argnames=("out_sharding",), donate_argnums=(0,))
def _scatter_one_layer(buf: jax.Array, page_indices: jax.Array, pages: jax.Array, out_sharding: Any) -> Any:
    """``buf`` with rows ``page_indices`` set to the bits ``pages``; out-of-range indices (padding) are
    dropped.

    The buffer is donated, so XLA writes in place where the platform can, as sglang-jax's
    ``write_kv_layer`` does; the caller replaces its reference with the result."""
    bits = jax.lax.bitcast_convert_type(buf, pages.dtype)
    bits = bits.at[page_indices].set(pages, mode="drop", out_sharding=out_sharding)
    return jax.lax.bitcast_convert_type(bits, buf.dtype)


#: Where the host pages live: ``"auto"`` is ``pinned_host`` when the device pool's buffers are on an
#: accelerator that offers it (a TPU or GPU) and the default host memory on the CPU.
HOST_MEMORY_KINDS = ("auto", "pinned_host", "default")


def _as_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidHandleError(f"{what} must be an int, got {type(value).__name__}")
    return int(value)


class LMCacheLRUHostKVPool(HostKVPool):  # type: ignore[misc]
    """sglang-jax's HiCache host pool (``LRUHostKVPool``'s role) on an LMCache JAX pool.

    Takes ``LRUHostKVPool``'s constructor arguments, so it is a drop-in where sglang-jax builds one
    (``kv_cache_builder.init_hicache``). Every int crossing the interface is a page id: host page ids
    in ``[0, pool_size)`` (LMCache slot ids), device page ids in ``[0, kv_buffer[0].shape[0])``.

    Transfers are two-phase, as in sglang-jax, split by which thread may touch the device KV buffer
    (the forward donates it every step): ``stage_backup`` gathers on the KV-owning thread and
    ``flush_backup`` writes the host slot on a worker; ``stage_load`` copies slots to the device on a
    worker and ``flush_load`` scatters into the KV buffer on the KV-owning thread. Each host page has an
    epoch, its LMCache handle's generation, captured when a transfer starts and checked when it
    publishes: a page freed and allocated again in between drops the stale transfer.

    Args:
        device_pool: the device KV pool (``MHATokenToKVPool``): ``kv_buffer`` is a list of
            ``layer_num`` arrays ``(pages, *per_layer_shape)``, replaced by the scatter of
            ``flush_load``.
        pool_size: host pages in the pool.
        page_size: tokens per page (the device pool's).
        layer_num: layers per page.
        per_layer_shape: the device buffer's ``kv_buffer[0].shape[1:]`` (see Raises).
        dtype: element dtype of the KV, bfloat16 included (see Raises).
        mesh, partition_spec: the device pool's mesh and ``kv_sharding.spec``: loaded pages are put on
            the device with the page axis dropped from that spec, gathered pages with it replicated.
        pool_name: a name for logs.
        host_memory_kind: one of :data:`HOST_MEMORY_KINDS`; ``"pinned_host"`` asks for JAX's pinned
            host memory of the device pool's first device even on the CPU (where it is plain memory).

    Raises:
        ConfigError: a size is not a positive int, the shape is empty, or the device pool's buffers are
            not ``layer_num`` layers of one shape and dtype. The page shape and dtype are the device
            buffers' (``per_layer_shape`` and ``dtype`` are checked against them, and a mismatch is
            logged): ``LRUHostKVPool`` never reads them either.
    """

    def __init__(
        self,
        device_pool: Any,
        pool_size: int,
        page_size: int,
        layer_num: int,
        per_layer_shape: tuple[int, ...],
        dtype: Any,
        mesh: Any,
        partition_spec: Any,
        *,
        pool_name: str = "hicache",
        host_memory_kind: str = "auto",
    ) -> None:
        for name, value in (("pool_size", pool_size), ("page_size", page_size), ("layer_num", layer_num)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        shape = tuple(int(d) for d in per_layer_shape)
        if not shape or any(d <= 0 for d in shape):
            raise ConfigError(
                f"per_layer_shape must be a non-empty tuple of positive ints, got {per_layer_shape!r}"
            )
        if host_memory_kind not in HOST_MEMORY_KINDS:
            raise ConfigError(
                f"host_memory_kind must be one of {HOST_MEMORY_KINDS}, got {host_memory_kind!r}"
            )
        buffers = getattr(device_pool, "kv_buffer", None)
        if not isinstance(buffers, Sequence) or len(buffers) != layer_num:
            got = len(buffers) if isinstance(buffers, Sequence) else type(buffers).__name__
            raise ConfigError(f"device_pool.kv_buffer must hold layer_num={layer_num} layers, got {got}")
        # The device buffers decide the page shape and dtype, as in LRUHostKVPool, which never reads
        # per_layer_shape (sglang-jax's own tests pass one that does not match): a page must fit its slot.
        device_shape = tuple(int(d) for d in buffers[0].shape[1:])
        device_dtype = np.dtype(buffers[0].dtype)
        for i, buf in enumerate(buffers):
            if tuple(buf.shape[1:]) != device_shape or np.dtype(buf.dtype) != device_dtype:
                raise ConfigError(
                    f"device_pool.kv_buffer[{i}] is {tuple(buf.shape)} {buf.dtype} but kv_buffer[0] is "
                    f"{tuple(buffers[0].shape)} {buffers[0].dtype}: every layer must have one page shape"
                )
        if device_shape != shape or device_dtype != np.dtype(dtype):
            logger.warning(
                "host pool %s: per_layer_shape=%s dtype=%s differ from the device pool's %s %s; using the "
                "device pool's",
                pool_name,
                shape,
                np.dtype(dtype),
                device_shape,
                device_dtype,
            )
        shape = device_shape
        self._dtype = device_dtype
        self._bits = normalize_dtype(device_dtype).bits_dtype
        self._device_pool = device_pool
        self._pool_size = int(pool_size)
        self._page_size = int(page_size)
        self._layer_num = int(layer_num)
        self._per_layer_shape = shape
        self._mesh = mesh
        self._partition_spec = partition_spec
        self._pool_name = pool_name
        tail = tuple(partition_spec)[1:]
        # A loaded page is (layer_num, *per_layer_shape): the layer axis replicated in place of the
        # device buffer's (DP-sharded) page axis; the TP axis on heads is kept. A gathered layer of
        # many pages has its page axis back, replicated.
        self._device_packed_sharding = NamedSharding(mesh, PartitionSpec(None, *tail))
        self._batched_layer_sharding = NamedSharding(mesh, PartitionSpec(None, *tail))
        self._index_sharding = NamedSharding(mesh, PartitionSpec(None))
        # Instance attributes, as in LRUHostKVPool: tests wrap the gather to interleave a free.
        self._jit_gather_one_layer = _gather_one_layer
        self._pad_to_page_bucket = pad_to_page_bucket

        self._kv_shape = (self._layer_num, 1, 1, 1, math.prod(shape))
        slot_bytes = SlotLayout.from_metadata(
            LMCacheMemPoolMetadata(self._kv_shape, self._dtype, 1.0)
        ).slot_bytes
        # Half a slot of slack so that floor(budget / slot) is exactly pool_size despite float rounding.
        budget_gib = (self._pool_size + 0.5) * slot_bytes / 2**30
        device = min(buffers[0].sharding.device_set, key=lambda d: d.id)
        has_pinned = "pinned_host" in {m.kind for m in device.addressable_memories()}
        if host_memory_kind == "pinned_host" and not has_pinned:
            raise ConfigError(
                f"host_memory_kind='pinned_host' but {device} has no pinned_host memory; pass 'auto'"
            )
        pin = host_memory_kind == "pinned_host" or (
            host_memory_kind == "auto" and has_pinned and device.platform != "cpu"
        )
        memory = pinned_host_bytes(device, slot_bytes * self._pool_size) if pin else None
        self._memory_kind = "pinned_host" if pin else "default"
        self._pool = LocalCPUPool(
            LMCacheMemPoolMetadata(self._kv_shape, self._dtype, budget_gib),
            backend="jax",
            pin_memory=False if pin else None,
            memory=memory,
        )
        if self._pool.max_chunk_num != self._pool_size:
            self._pool.close()
            raise ConfigError(f"the LMCache pool holds {self._pool.max_chunk_num} pages, not {pool_size}")
        self._probe = np.broadcast_to(np.zeros((), dtype=self._dtype), self._kv_shape)

        # _lock guards _held, _slots and _lock_ref; lock order _lock -> _pending_lock / _pending_load_lock.
        self._lock = threading.Lock()
        self._held: dict[int, KVObj] = {}  # allocated page id -> its LMCache handle (epoch = generation)
        self._slots: list[KVObj | None] = [None] * self._pool_size  # the handle once its bytes are backed up
        self._lock_ref = [0] * self._pool_size
        self._pending_lock = threading.Lock()
        self._pending_gather: dict[int, tuple[int, jax.Array]] = {}  # page -> (epoch, gathered page)
        self._pending_load_lock = threading.Lock()
        self._pending_load: dict[int, tuple[int, jax.Array]] = {}  # page -> (epoch, page on device)
        self._peak_used = 0
        self._exhaust_count = 0
        self._last_exhaust_log = 0.0

    # -- allocation ---------------------------------------------------------------------------------
    def alloc(self, need_pages: int) -> np.ndarray | None:
        """Take ``need_pages`` free host pages, all or nothing; ``None`` (and nothing taken) when short.

        The pool never evicts: the radix cache frees LRU host leaves and retries.

        Raises:
            ChunkShapeError: ``need_pages`` is not a positive int.
        """
        if isinstance(need_pages, bool) or not isinstance(need_pages, (int, np.integer)) or need_pages <= 0:
            raise ChunkShapeError(f"need_pages must be a positive int, got {need_pages!r}")
        with self._lock:
            batch = self._pool.allocate_batch([self._probe] * int(need_pages))
            if batch is None:
                self._note_exhausted(int(need_pages))
                return None
            pages = []
            for obj in batch:
                self._held[obj.chunk_idx] = obj
                pages.append(obj.chunk_idx)
            self._peak_used = max(self._peak_used, len(self._held))
        return np.asarray(pages, dtype=np.int64)

    def free(self, host_page_ids: Iterable[Any]) -> None:
        """Give host pages back (duplicates count once); their backed-up bytes and staged transfers go.

        Every id is checked before any is freed, so an error frees none.

        Raises:
            InvalidHandleError: an id is not an int in ``[0, pool_size)``.
            HostPageDoubleFreeError: a page is free already.
            HostPageStateError: a page is locked (``lock_ref > 0``).
        """
        unique = list(dict.fromkeys(_as_id(pid, "host page id") for pid in host_page_ids))
        with self._lock:
            for pid in unique:
                self._check_range(pid)
                if pid not in self._held:
                    raise HostPageDoubleFreeError(f"host page {pid} is free already (double free)")
                if self._lock_ref[pid]:
                    raise HostPageStateError(
                        f"host page {pid} is locked (lock_ref={self._lock_ref[pid]}): dec_lock_ref it first"
                    )
            objs = []
            for pid in unique:
                with self._pending_lock:
                    self._pending_gather.pop(pid, None)
                with self._pending_load_lock:
                    self._pending_load.pop(pid, None)
                self._slots[pid] = None
                objs.append(self._held.pop(pid))
            self._pool.free_batch(objs)

    def reserve(self) -> int | None:
        """One free host page id, or ``None`` when all are allocated (``alloc(1)``)."""
        pages = self.alloc(1)
        return None if pages is None else int(pages[0])

    def release(self, buffer_id: int) -> None:
        """Give one host page back (``free([buffer_id])``; same errors)."""
        self.free([buffer_id])

    def available_size(self) -> int:
        """Free host pages."""
        with self._lock:
            return self._pool_size - len(self._held)

    def total_size(self) -> int:
        """Host pages in the pool, free and allocated."""
        return self._pool_size

    # -- lock refs ----------------------------------------------------------------------------------
    def inc_lock_ref(self, buffer_id: int) -> None:
        """Protect an allocated host page from ``free`` until a matching :meth:`dec_lock_ref`.

        Raises:
            InvalidHandleError: not an int in range. HostPageStateError: the page is not allocated.
        """
        with self._lock:
            pid = self._require_allocated(buffer_id)
            self._lock_ref[pid] += 1

    def dec_lock_ref(self, buffer_id: int) -> None:
        """Undo one :meth:`inc_lock_ref`.

        Raises:
            InvalidHandleError: not an int in range.
            HostPageStateError: the page is not allocated, or not locked (underflow).
        """
        with self._lock:
            pid = self._require_allocated(buffer_id)
            if self._lock_ref[pid] <= 0:
                raise HostPageStateError(f"dec_lock_ref underflow on host page {pid}: it is not locked")
            self._lock_ref[pid] -= 1

    # -- device -> host -----------------------------------------------------------------------------
    def stage_backup(self, device_indices: Sequence[Any], host_buffer_ids: Sequence[Any]) -> None:
        """D2H phase 1, on the KV-owning thread: gather device pages ``device_indices[i]`` for host
        pages ``host_buffer_ids[i]`` and keep them until :meth:`flush_backup`.

        Raises:
            ChunkShapeError: the lists differ in length.
            InvalidHandleError: an id is not an int in range, or a host id appears twice.
            HostPageStateError: a host page is not allocated.
        """
        devices = [_as_id(d, "device page id") for d in device_indices]
        hosts = self._host_ids(host_buffer_ids)
        if len(devices) != len(hosts):
            raise ChunkShapeError(
                f"device_indices ({len(devices)}) and host_buffer_ids ({len(hosts)}) differ in length"
            )
        if not hosts:
            return
        with self._lock:
            gens = {pid: self._held_obj(pid).generation for pid in hosts}
        self._check_device_pages(devices)
        n = len(devices)
        padded = np.zeros(self._pad_to_page_bucket(n), dtype=np.int32)  # padding rows gather page 0
        padded[:n] = devices
        page_indices = jax.device_put(padded, self._index_sharding)
        buffers = self._device_pool.kv_buffer
        per_layer = [
            self._jit_gather_one_layer(buffers[layer], page_indices, self._batched_layer_sharding)
            for layer in range(self._layer_num)
        ]
        packed = jnp.stack(per_layer, axis=0)  # bits (layer_num, bucket, *per_layer_shape)
        packed.block_until_ready()
        with self._lock, self._pending_lock:
            for i, pid in enumerate(hosts):
                obj = self._held.get(pid)
                if obj is not None and obj.generation == gens[pid]:
                    self._pending_gather[pid] = (gens[pid], packed[:, i])

    def flush_backup(self, host_buffer_ids: Sequence[Any]) -> None:
        """D2H phase 2, on a worker: copy the staged pages into their LMCache slots.

        A page freed (and maybe allocated again) since its stage is skipped: its slot is not written.

        Raises:
            TransferOrderError: a page has no staged gather (:meth:`stage_backup` first); none is written.
        """
        hosts = self._host_ids(host_buffer_ids)
        with self._pending_lock:
            missing = [pid for pid in hosts if pid not in self._pending_gather]
            if missing:
                raise TransferOrderError(
                    f"flush_backup of host page(s) {missing} with no staged gather: call stage_backup first"
                )
            entries = [(pid, *self._pending_gather.pop(pid)) for pid in hosts]
        for _, _, staged in entries:
            staged.copy_to_host_async()
        for pid, gen, staged in entries:
            host = np.asarray(jax.device_get(staged)).view(self._dtype).reshape(self._kv_shape)
            with self._lock:
                obj = self._held.get(pid)
                if obj is not None and obj.generation == gen:
                    obj.copy_from(host)
                    self._slots[pid] = obj

    def copy_into(self, device_indices: Sequence[Any], host_buffer_ids: Sequence[Any]) -> None:
        """Back device pages up into allocated host pages, pairwise, on one thread."""
        hosts = list(host_buffer_ids)
        self.stage_backup(device_indices, hosts)
        self.flush_backup(hosts)

    # -- host -> device -----------------------------------------------------------------------------
    def stage_load(self, host_buffer_ids: Sequence[Any]) -> None:
        """H2D phase 1, on a worker: put backed-up host pages on the device, kept for :meth:`flush_load`.

        Raises:
            InvalidHandleError: an id is not an int in range, or appears twice.
            HostPageStateError: a page is not allocated.
            TransferOrderError: a page holds no backed-up bytes.
        """
        hosts = self._host_ids(host_buffer_ids)
        if not hosts:
            return
        shape = (self._layer_num, *self._per_layer_shape)
        with self._lock:
            objs = {pid: self._held_obj(pid) for pid in hosts}
            empty = [pid for pid in hosts if self._slots[pid] is None]
            if empty:
                raise TransferOrderError(f"stage_load of host page(s) {empty} that hold no backed-up KV")
            views = {pid: objs[pid].as_numpy().reshape(shape).view(self._bits) for pid in hosts}
        loaded = {
            pid: jax.device_put(views[pid], self._device_packed_sharding, may_alias=False) for pid in hosts
        }
        for array in loaded.values():
            array.block_until_ready()
        with self._lock, self._pending_load_lock:
            for pid in hosts:
                obj = self._held.get(pid)
                if obj is objs[pid] and obj.generation == objs[pid].generation:
                    self._pending_load[pid] = (obj.generation, loaded[pid])

    def flush_load(self, host_buffer_ids: Sequence[Any], device_indices: Sequence[Any]) -> None:
        """H2D phase 2, on the KV-owning thread: scatter the staged pages into device pages
        ``device_indices`` (replaces ``device_pool.kv_buffer[layer]``). A page whose host page was
        freed since its stage is not written.

        Raises:
            ChunkShapeError: the lists differ in length.
            InvalidHandleError: an id is not an int in range, or appears twice.
            TransferOrderError: a page has no staged load (:meth:`stage_load` first); none is written.
        """
        hosts = self._host_ids(host_buffer_ids)
        devices = [_as_id(d, "device page id") for d in device_indices]
        if len(devices) != len(hosts):
            raise ChunkShapeError(
                f"host_buffer_ids ({len(hosts)}) and device_indices ({len(devices)}) differ in length"
            )
        if not hosts:
            return
        self._check_device_pages(devices)
        if len(set(devices)) != len(devices):
            raise InvalidHandleError(f"device_indices {devices} name a device page twice")
        for pid in hosts:
            self._check_range(pid)
        with self._lock, self._pending_load_lock:
            missing = [pid for pid in hosts if pid not in self._pending_load]
            if missing:
                raise TransferOrderError(
                    f"flush_load of host page(s) {missing} with no staged load: call stage_load first"
                )
            current = {
                pid: (obj.generation if (obj := self._held.get(pid)) is not None else None) for pid in hosts
            }
            entries = [self._pending_load.pop(pid) for pid in hosts]
        n_dev = int(self._device_pool.kv_buffer[0].shape[0])
        n = len(hosts)
        bucket = self._pad_to_page_bucket(n)
        loc = np.full(bucket, n_dev, dtype=np.int32)  # n_dev is out of range: dropped by the scatter
        fresh = 0
        for k, (pid, (gen, _)) in enumerate(zip(hosts, entries, strict=True)):
            if current[pid] == gen:
                loc[k] = devices[k]
                fresh += 1
        if not fresh:
            return
        pages = [page for _, page in entries]
        stack = jnp.stack(pages + [pages[0]] * (bucket - n), axis=0)  # (bucket, layer_num, ...)
        page_indices = jax.device_put(loc, self._index_sharding)
        buffers = self._device_pool.kv_buffer
        for layer in range(self._layer_num):
            buffers[layer] = _scatter_one_layer(
                buffers[layer], page_indices, stack[:, layer], out_sharding=buffers[layer].sharding
            )
        for buf in buffers:
            buf.block_until_ready()

    def copy_to_device(self, host_buffer_ids: Sequence[Any], device_indices: Sequence[Any]) -> None:
        """Load host pages back into device pages, pairwise, on one thread."""
        hosts = list(host_buffer_ids)
        self.stage_load(hosts)
        self.flush_load(hosts, device_indices)

    # -- beyond LRUHostKVPool -----------------------------------------------------------------------
    def read_page(self, buffer_id: int) -> np.ndarray:
        """A copy of the backed-up bytes of a host page, ``(layer_num, *per_layer_shape)``.

        Raises:
            InvalidHandleError, HostPageStateError: as :meth:`inc_lock_ref`.
            TransferOrderError: the page holds no backed-up KV.
        """
        with self._lock:
            pid = self._require_allocated(buffer_id)
            obj = self._slots[pid]
            if obj is None:
                raise TransferOrderError(f"host page {pid} holds no backed-up KV")
            return np.array(obj.as_numpy()).reshape(self._layer_num, *self._per_layer_shape)

    @property
    def memory_kind(self) -> str:
        """Where the host pages are: ``"pinned_host"`` (JAX's pinned host memory, adopted by the
        LMCache pool) or ``"default"`` (the LMCache pool's own host arena)."""
        return self._memory_kind

    def precompile_transfers(self, max_pages: int | None = None) -> None:
        """Compile the gather and scatter for every page bucket serving can reach, using device pages
        ``[0, r)`` as scratch (safe only before serving, as in sglang-jax); restores the pool."""
        dev_pages = int(self._device_pool.kv_buffer[0].shape[0])
        cap = min(self._pool_size, dev_pages, int(self._device_pool.size) // self._page_size)
        if max_pages is not None:
            cap = min(cap, int(max_pages))
        if cap <= 0:
            return
        counts = [b for b in PAGE_BUCKETS if b <= cap]
        if not counts or counts[-1] < cap:
            counts.append(cap)
        start = time.perf_counter()
        warmed = 0
        for r in counts:
            pages = self.alloc(r)
            if pages is None:
                logger.warning("hicache precompile: %d host pages not free; stopping warmup", r)
                break
            ids = [int(p) for p in pages]
            try:
                self.copy_into(list(range(r)), ids)
                self.copy_to_device(ids, list(range(r)))
            finally:
                self.free(ids)
            warmed += 1
        logger.info("hicache precompile: warmed %d shapes in %.1fs", warmed, time.perf_counter() - start)

    def close(self) -> None:
        """Release the LMCache pool's memory; the pool is unusable afterwards."""
        with self._lock:
            self._held.clear()
            self._slots = [None] * self._pool_size
            self._pool.close()

    # -- checks -------------------------------------------------------------------------------------
    def _note_exhausted(self, need: int) -> None:
        self._exhaust_count += 1
        now = time.time()
        if now - self._last_exhaust_log >= 1.0:
            self._last_exhaust_log = now
            logger.info(
                "host pool %s short on alloc (need=%d, free=%d, size=%d, exhaust_count=%d); "
                "the tree cache must evict before retry",
                self._pool_name,
                need,
                self._pool_size - len(self._held),
                self._pool_size,
                self._exhaust_count,
            )

    def _check_range(self, pid: int) -> None:
        if not 0 <= pid < self._pool_size:
            raise InvalidHandleError(f"host page id {pid} is outside the pool's range [0, {self._pool_size})")

    def _held_obj(self, pid: int) -> KVObj:
        self._check_range(pid)
        obj = self._held.get(pid)
        if obj is None:
            raise HostPageStateError(f"host page {pid} is not allocated: alloc() it first")
        return obj

    def _require_allocated(self, buffer_id: Any) -> int:
        pid = _as_id(buffer_id, "host page id")
        self._held_obj(pid)
        return pid

    def _host_ids(self, host_buffer_ids: Sequence[Any]) -> list[int]:
        hosts = [_as_id(b, "host page id") for b in host_buffer_ids]
        if len(set(hosts)) != len(hosts):
            raise InvalidHandleError(f"host_buffer_ids {hosts} name a host page twice")
        return hosts

    def _check_device_pages(self, devices: list[int]) -> None:
        # The bound is the buffer's page axis, not size // page_size: the device pool packs an extra
        # sentinel page and its allocator hands out page ids up to that top row.
        n_dev = int(self._device_pool.kv_buffer[0].shape[0])
        bad = [d for d in devices if not 0 <= d < n_dev]
        if bad:
            raise InvalidHandleError(f"device page id(s) {bad} outside the device pool's range [0, {n_dev})")
