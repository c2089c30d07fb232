"""Pools in local memory: host RAM (optionally pinned) or one GPU, for any backend."""

from __future__ import annotations

import contextlib
import operator
import threading
import time
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from lmcache.allocator import ChunkAllocator, PoolStats
from lmcache.arena import Arena, check_array
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import normalize_dtype
from lmcache.errors import (
    ChunkShapeError,
    ChunkTypeError,
    ConfigError,
    ForeignHandleError,
    PoolClosedError,
)
from lmcache.layout import MIN_SLOT_ALIGNMENT, SlotLayout
from lmcache.registry import load_adapter, resolve_backend
from lmcache.storage_backend.mem_pool.base_pool import BasePool, KVBatch, KVObj


def _closed(*_args: Any) -> Any:
    raise PoolClosedError("the pool was closed; create a new pool to allocate or free again")


class _ClosedLock:
    """Stands in for a closed pool's lock, so the hot path checks ``closed`` at no cost."""

    def acquire(self) -> bool:
        return bool(_closed())

    def release(self) -> None:  # never reached: acquire raises
        _closed()


class LocalPool(BasePool):
    """A pool of ``max_chunk_num`` equal slots in one arena, for chunks of up to ``chunk_size`` tokens.

    Args:
        metadata: chunk shape, dtype and memory budget.
        backend: ``"numpy"``, ``"torch"`` or ``"jax"``; default ``$LMCACHE_BACKEND``, else the framework
            ``kv_dtype`` comes from, else numpy. Pools of different backends live side by side.
        device: ``"cpu"`` (default for :class:`LocalPool` and :class:`LocalCPUPool`), ``"gpu"`` (the first
            accelerator) or a framework device name such as ``"cuda:1"``.
        pin_memory: page-lock a CPU arena for fast device copies. Default: pin when the backend sees an
            accelerator. Pinning registers exactly the arena's bytes.
        thread_safe: guard every public method with a lock (default). ``False`` removes the lock for
            single-owner use.
        slot_alignment: slot stride multiple in bytes (a power of two >= 256).

    Raises:
        ConfigError: bad metadata or options; the budget is smaller than one slot.
        BackendUnavailableError: the backend's framework is not installed.
        PoolTooLargeError: the arena needs more memory than the machine can give.
        DeviceUnavailableError: a GPU was asked for and there is none.

    Example:
        >>> import numpy as np
        >>> from lmcache.config import LMCacheMemPoolMetadata
        >>> from lmcache.storage_backend.mem_pool import LocalCPUPool
        >>> meta = LMCacheMemPoolMetadata((2, 2, 16, 4, 8), "float16", 0.001)
        >>> with LocalCPUPool(meta, backend="numpy") as pool:
        ...     chunk = np.ones((2, 2, 10, 4, 8), dtype=np.float16)
        ...     obj = pool.put(chunk)
        ...     (obj.data.shape, float(obj.data.sum()), pool.stats().used)
        ((2, 2, 10, 4, 8), 1280.0, 1)
    """

    #: Where pools of this class live unless ``device=`` says otherwise.
    default_device = "cpu"

    def __init__(
        self,
        metadata: LMCacheMemPoolMetadata,
        *,
        backend: str | None = None,
        device: str | None = None,
        pin_memory: bool | None = None,
        thread_safe: bool = True,
        slot_alignment: int = MIN_SLOT_ALIGNMENT,
    ) -> None:
        if not isinstance(metadata, LMCacheMemPoolMetadata):
            raise ConfigError(f"metadata must be an LMCacheMemPoolMetadata, got {type(metadata).__name__}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise ConfigError(f"pin_memory must be True, False or None, got {pin_memory!r}")
        self.metadata = metadata
        self._slot_alignment = slot_alignment
        #: Slot geometry (stride, alignment, view shapes); what engines registering memory need.
        self.layout = SlotLayout.from_metadata(metadata, slot_alignment)
        #: Tokens in a full chunk.
        self.chunk_size = self.layout.chunk_size
        #: Bytes per slot (a full chunk rounded up to the slot alignment); ``KVObj.size``.
        self.size_per_chunk = self.layout.slot_bytes
        #: Number of slots: ``floor(budget / size_per_chunk)``.
        self.max_chunk_num = self.init_max_chunk_num(metadata)
        #: The framework of ``KVObj.data`` and ``arena``.
        self.backend = resolve_backend(backend, metadata)
        device = self._resolve_device(device)
        adapter = load_adapter(self.backend)
        self._arena: Arena = adapter.create_arena(
            self.layout, self.max_chunk_num, device=device, pin_memory=pin_memory
        )
        #: Where the arena lives (``"cpu"``, ``"cuda:0"``).
        self.device: str = self._arena.device
        self._allocator = ChunkAllocator(self.max_chunk_num, thread_safe=thread_safe)
        # The allocator's state, shared (same objects) for the single-slot hot path; see ChunkAllocator.
        self._lock: Any = self._allocator.lock
        self._free_slots = self._allocator.free_slots
        self._generation = self._allocator.generation
        self._full_shape = self.layout.kv_shape
        self._view_shapes = [self.layout.view_shape(n) for n in range(self.chunk_size + 1)]
        # Views are made once per slot (full chunks) or kept per slot for the last partial length:
        # making a torch or JAX view costs more than the whole allocate.
        self._full_views: list[Any] = [None] * self.max_chunk_num
        self._partial_views: list[tuple[int, Any] | None] = [None] * self.max_chunk_num
        self._ok_dtypes: set[Any] = set()
        self._fast_dtype: Any = None
        self._closed = False

    # -- the seed API ------------------------------------------------------------------------------
    def init_max_chunk_num(self, metadata: LMCacheMemPoolMetadata) -> int:
        """Return how many slots fit in the budget: ``floor(max_local_cache_size * 2**30 / slot bytes)``.

        Raises:
            ConfigError: not even one slot fits; the message gives both sizes.
        """
        layout = SlotLayout.from_metadata(metadata, self._slot_alignment)
        budget = metadata.budget_bytes
        count = budget // layout.slot_bytes
        if count < 1:
            raise ConfigError(
                f"max_local_cache_size={metadata.max_local_cache_size} GiB ({budget} bytes) is smaller "
                f"than one chunk slot ({layout.slot_bytes} bytes for kv_shape {metadata.kv_shape} "
                f"{metadata.dtype.name}); raise max_local_cache_size or shrink the chunk"
            )
        return int(count)

    def allocate(self, kv_chunk: Any) -> KVObj | None:
        """Allocate a slot for a chunk shaped like ``kv_chunk`` and return its :class:`KVObj`.

        Args:
            kv_chunk: any array-like (torch, numpy, JAX) of shape ``(L, 2, n, H, D)``; only its shape and
                dtype are read. Every dim but the token axis must match the pool's, ``1 <= n <=
                chunk_size``, and the dtype (if it has one) must be the pool's.

        Returns:
            A KVObj whose ``data`` is the contiguous ``(L, 2, n, H, D)`` view at the start of the slot,
            or None if the pool is full.

        Note:
            This does not perform the actual memory movement; see :meth:`put`.

        Raises:
            ChunkTypeError: ``kv_chunk`` has no shape.
            ChunkShapeError: a dim or the dtype does not match; the pool is unchanged.
            PoolClosedError: the pool was closed.
        """
        # Fast path: one shape comparison and one identity check for the dtype seen before; anything
        # else goes through _tokens_of, which validates fully and raises with the reason.
        try:
            shape = kv_chunk.shape
            num_tokens = shape[2]
            fast = (
                kv_chunk.dtype is self._fast_dtype
                and 0 < num_tokens <= self.chunk_size
                and shape == self._view_shapes[num_tokens]
            )
        except (AttributeError, TypeError, IndexError):
            fast = False
        if not fast:
            num_tokens = self._tokens_of(kv_chunk)
        # Hand out a slot: the allocator's single-slot operation, inlined (see ChunkAllocator).
        lock = self._lock
        if lock is not None:
            lock.acquire()  # a closed pool's lock raises PoolClosedError here
        try:
            free_slots = self._free_slots
            if free_slots:
                slot = free_slots.pop()
            else:
                slot = self._allocator.take_fresh()
                if slot < 0:
                    return None
            allocator = self._allocator
            ticket = allocator.ticket = allocator.ticket + 1
            self._generation[slot] = ticket
        finally:
            if lock is not None:
                lock.release()
        # What _handle does, inlined: one Python call less on the hot path.
        if num_tokens == self.chunk_size:
            view = self._full_views[slot]
        else:
            cached = self._partial_views[slot]
            view = cached[1] if cached is not None and cached[0] == num_tokens else None
        return KVObj(slot, self.size_per_chunk, view, num_tokens, self, ticket)

    def free(self, kv_obj: KVObj, *, wait_for: Any = None) -> None:
        """Give the slot of ``kv_obj`` back to the pool and increase the free count by 1.

        Args:
            kv_obj: a live KVObj of this pool.
            wait_for: arrays (or one array) to wait for first, with ``block_until_ready`` or a CUDA
                synchronize: pass the results of asynchronous (JAX) computations that read the chunk,
                so that the slot is not reused while they still run.

        Raises:
            DoubleFreeError, StaleHandleError, ForeignHandleError: the handle does not own a slot of
                this pool; the pool is unchanged.
        """
        if wait_for is not None or kv_obj.__class__ is not KVObj or kv_obj._pool is not self:
            if not isinstance(kv_obj, KVObj):
                raise ForeignHandleError(f"free() takes a KVObj, got {type(kv_obj).__name__}")
            if kv_obj._pool is not self:
                raise self._foreign(kv_obj)
            self._check_live(kv_obj)
            if wait_for is not None:
                wait_until_ready(wait_for)
        # Take the slot back if the handle still owns it: the allocator's single-slot operation, inlined.
        slot, generation = kv_obj.chunk_idx, kv_obj._generation
        lock = self._lock
        if lock is not None:
            lock.acquire()  # a closed pool's lock raises PoolClosedError here
        try:
            generations = self._generation
            try:
                live = generations[slot] == generation and slot >= 0  # -1 would alias the last slot
            except (IndexError, TypeError):
                live = False
            if not live:
                raise self._allocator._handle_error(slot, generation)
            generations[slot] = -generation
            self._free_slots.append(slot)
        finally:
            if lock is not None:
                lock.release()

    # -- beyond the seed ---------------------------------------------------------------------------
    def allocate_batch(self, kv_chunks: Sequence[Any]) -> KVBatch | None:
        """Allocate a slot for each chunk, all or nothing.

        Every chunk is checked first (a chunk object passed many times is checked once); then either
        every chunk gets a slot or none does and the result is None (counted as ``len(kv_chunks)``
        failed allocations).

        Returns:
            A :class:`KVBatch`: a sequence of KVObjs in input order, built lazily on first access.
        """
        if isinstance(kv_chunks, (str, bytes)) or not isinstance(kv_chunks, Iterable):
            raise ChunkTypeError(f"allocate_batch takes a sequence of arrays, got {type(kv_chunks).__name__}")
        chunks = list(kv_chunks)
        if chunks and all(map(operator.is_, chunks, repeat(chunks[0]))):  # one chunk many times: check once
            tokens = [self._tokens_of(chunks[0])] * len(chunks)
        else:
            checked: dict[int, int] = {}  # id(chunk) -> tokens
            tokens = []
            for chunk in chunks:
                n = checked.get(id(chunk))
                if n is None:
                    n = checked[id(chunk)] = self._tokens_of(chunk)
                tokens.append(n)
        self._check_open()
        taken = self._allocator.acquire_many(len(tokens))
        if taken is None:
            return None
        slots, first_ticket = taken
        return KVBatch(self, slots, tokens, first_ticket, self.size_per_chunk)

    def _handle(self, slot: int, num_tokens: int, generation: int) -> KVObj:
        """Build the KVObj of a slot handed out with ``generation`` (used by :class:`KVBatch`)."""
        if num_tokens == self.chunk_size:
            view = self._full_views[slot]
        else:
            cached = self._partial_views[slot]
            view = cached[1] if cached is not None and cached[0] == num_tokens else None
        return KVObj(slot, self.size_per_chunk, view, num_tokens, self, generation)

    def free_batch(self, kv_objs: Iterable[KVObj], *, wait_for: Any = None) -> None:
        """Free several KVObjs (or a whole :class:`KVBatch`); every handle is checked before any is
        freed, so an error frees none."""
        if kv_objs.__class__ is KVBatch and kv_objs._pool is self and wait_for is None:  # type: ignore[attr-defined]
            self._check_open()
            self._allocator.release_many(kv_objs.chunk_idx, kv_objs.generations)  # type: ignore[attr-defined]
            return
        objs = list(kv_objs)
        for obj in objs:
            if obj.__class__ is not KVObj and not isinstance(obj, KVObj):
                raise ForeignHandleError(f"free_batch() takes KVObjs, got a {type(obj).__name__}")
            if obj._pool is not self:
                raise self._foreign(obj)
        self._check_open()
        if wait_for is not None:
            for obj in objs:
                self._check_live(obj)
            wait_until_ready(wait_for)
        self._allocator.release_many([obj.chunk_idx for obj in objs], [obj._generation for obj in objs])

    def put(self, kv_chunk: Any) -> KVObj | None:
        """Allocate a slot for ``kv_chunk`` and copy it in; None (nothing copied) when the pool is full.

        ``kv_chunk`` may come from any framework and device. It is checked completely before a slot is
        taken, so a bad chunk leaves the pool unchanged. Returns when the bytes are in the slot.
        """
        num_tokens = self._tokens_of(kv_chunk)
        check_array(kv_chunk, self.layout.view_shape(num_tokens), self.layout, "kv_chunk")
        kv_obj = self.allocate(kv_chunk)
        if kv_obj is not None:
            try:
                self._arena.copy_in(kv_obj.chunk_idx, num_tokens, kv_chunk)
            except BaseException:
                self.free(kv_obj)
                raise
        return kv_obj

    def stats(self) -> PoolStats:
        """Return a consistent snapshot of the pool's counters (see :class:`~lmcache.allocator.PoolStats`)."""
        return self._allocator.stats(self.size_per_chunk)

    @property
    def arena(self) -> Any:
        """The whole arena as one native array of shape ``(max_chunk_num, slot_elems)``, no copy.

        Row ``i`` is slot ``i``; a chunk of ``n`` tokens is its first ``n * layout.token_elems``
        elements, reshaped to ``layout.view_shape(n)``. Jitted JAX code can take the arena plus chunk
        indices and gather inside ``jit`` (see :func:`lmcache_jax.gather_chunks`).
        """
        self._check_open()
        return self._arena.whole()

    @property
    def base_address(self) -> int:
        """Address of slot 0, for engines that register the arena's memory (RDMA, CUDA IPC)."""
        return self._arena.base_address

    @property
    def pinned(self) -> bool:
        """Whether the arena is page-locked host memory."""
        return self._arena.pinned

    def slot_address(self, chunk_idx: int) -> int:
        """Address of slot ``chunk_idx`` (``base_address + chunk_idx * size_per_chunk``)."""
        if not 0 <= chunk_idx < self.max_chunk_num:
            raise ConfigError(f"chunk_idx must be in 0..{self.max_chunk_num - 1}, got {chunk_idx}")
        return self._arena.base_address + chunk_idx * self.size_per_chunk

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop handing out and taking back slots; release pinning. Outstanding views stay valid memory.

        Calls after ``close`` raise :class:`~lmcache.errors.PoolClosedError`; closing twice is a no-op.
        """
        if self._closed:
            return
        self._closed = True
        self._lock = _ClosedLock()
        self._full_views = [None] * self.max_chunk_num
        self._partial_views = [None] * self.max_chunk_num
        self._arena.close()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, device={self.device!r}, "
            f"kv_shape={self.layout.kv_shape}, dtype={self.layout.dtype.name}, "
            f"max_chunk_num={self.max_chunk_num}{', closed' if self._closed else ''})"
        )

    # -- internals used by KVObj -------------------------------------------------------------------
    def _resolve_device(self, device: str | None) -> str:
        if device is None:
            return self.default_device
        if not isinstance(device, str) or not device:
            raise ConfigError(f"device must be 'cpu', 'gpu' or a name like 'cuda:0', got {device!r}")
        return device

    def _tokens_of(self, kv_chunk: Any) -> int:
        try:
            shape = kv_chunk.shape
        except AttributeError:
            raise ChunkTypeError(
                f"allocate() needs an array-like with .shape and .dtype, got {type(kv_chunk).__name__}"
            ) from None
        try:
            num_tokens = shape[2]
            valid = 0 < num_tokens <= self.chunk_size and shape == self._view_shapes[num_tokens]
        except (TypeError, IndexError):
            valid = False
        if not valid:  # say what is wrong
            try:
                num_tokens = self.layout.tokens_of(tuple(shape))
            except TypeError:
                raise ChunkTypeError(f"kv_chunk.shape must be a tuple of ints, got {shape!r}") from None
        dtype = getattr(kv_chunk, "dtype", None)
        if dtype is not None and dtype not in self._ok_dtypes:
            self._check_dtype(dtype)
        return int(num_tokens)

    def _check_dtype(self, dtype: Any) -> None:
        try:
            spec = normalize_dtype(dtype)
        except ConfigError as exc:
            raise ChunkShapeError(
                f"kv_chunk has dtype {dtype!r}, the pool holds {self.layout.dtype.name}"
            ) from exc
        if spec is not self.layout.dtype:
            raise ChunkShapeError(
                f"kv_chunk has dtype {spec.name}, the pool holds {self.layout.dtype.name}; convert the "
                "chunk or make a pool of that dtype"
            )
        with contextlib.suppress(TypeError):  # unhashable dtype objects are checked every time
            self._ok_dtypes.add(dtype)
        if self._fast_dtype is None:
            self._fast_dtype = dtype

    def _foreign(self, kv_obj: KVObj) -> ForeignHandleError:
        if kv_obj._pool is None:
            return ForeignHandleError(
                f"KVObj(chunk_idx={kv_obj.chunk_idx}) was built by hand; free only KVObjs that "
                "this pool's allocate() returned"
            )
        return ForeignHandleError(
            f"KVObj(chunk_idx={kv_obj.chunk_idx}) belongs to another pool ({kv_obj._pool!r}); "
            "free it with the pool that allocated it"
        )

    def _is_live(self, kv_obj: KVObj) -> bool:
        return not self._closed and self._allocator.is_live(kv_obj.chunk_idx, kv_obj._generation)

    def _check_open(self) -> None:
        if self._closed:
            _closed()

    def _check_live(self, kv_obj: KVObj) -> None:
        slot = kv_obj.chunk_idx
        # Fast path: tickets are unique and positive, so an equal generation means a live handle.
        if (
            slot.__class__ is int
            and 0 <= slot < self.max_chunk_num
            and not self._closed
            and self._generation[slot] == kv_obj._generation
        ):
            return
        self._check_open()
        if not self._is_live(kv_obj):
            raise self._allocator._handle_error(slot, kv_obj._generation)

    def _native_view(self, kv_obj: KVObj) -> Any:
        slot, num_tokens = kv_obj.chunk_idx, kv_obj.num_tokens
        if num_tokens == self.chunk_size:
            view = self._full_views[slot]
            if view is None:
                view = self._full_views[slot] = self._arena.view(slot, num_tokens)
            return view
        cached = self._partial_views[slot]
        if cached is not None and cached[0] == num_tokens:
            return cached[1]
        view = self._arena.view(slot, num_tokens)
        self._partial_views[slot] = (num_tokens, view)
        return view

    def _export(self, kv_obj: KVObj, framework: str) -> Any:
        if framework == self.backend:
            return kv_obj.data
        views = getattr(kv_obj, "_views", None)
        if views is None:
            views = kv_obj._views = {}
        view = views.get(framework)
        if view is None:
            view = views[framework] = self._arena.export(kv_obj.chunk_idx, kv_obj.num_tokens, framework)
        return view

    def _dlpack_producer(self, kv_obj: KVObj) -> Any:
        return self._arena.dlpack_producer(kv_obj.chunk_idx, kv_obj.num_tokens)

    def _copy_from(self, kv_obj: KVObj, src: Any) -> None:
        num_tokens = kv_obj.num_tokens
        check_array(src, self.layout.view_shape(num_tokens), self.layout, "copy_from source")
        self._arena.copy_in(kv_obj.chunk_idx, num_tokens, src)

    def _copy_to(self, kv_obj: KVObj, dst: Any) -> None:
        num_tokens = kv_obj.num_tokens
        check_array(dst, self.layout.view_shape(num_tokens), self.layout, "copy_to destination")
        self._arena.copy_out(kv_obj.chunk_idx, num_tokens, dst)

    def _clone(self, kv_obj: KVObj, framework: str | None) -> Any:
        framework = framework or self.backend
        if framework == "numpy":  # works for device memory too: the arena copies it out
            layout = self.layout
            dst = np.empty(layout.view_shape(kv_obj.num_tokens), dtype=layout.dtype.numpy_dtype)
            self._arena.copy_out(kv_obj.chunk_idx, kv_obj.num_tokens, dst)
            return dst
        return load_adapter(framework).clone(self._export(kv_obj, framework))


def wait_until_ready(arrays: Any) -> None:
    """Block until every array in ``arrays`` (one array, or a list/tuple of them) is computed.

    JAX arrays are waited for with ``block_until_ready``; CUDA torch tensors with a synchronize of
    their device; anything else is taken as ready.
    """
    items = arrays if isinstance(arrays, (list, tuple)) else (arrays,)
    for item in items:
        ready = getattr(item, "block_until_ready", None)
        if ready is not None:
            ready()
        elif getattr(item, "is_cuda", False):
            load_adapter("torch").synchronize(item)  # type: ignore[attr-defined]


class LocalCPUPool(LocalPool):
    """A pool in host memory, pinned when the backend sees an accelerator (``pin_memory=`` overrides)."""

    default_device = "cpu"

    def __init__(
        self,
        metadata: LMCacheMemPoolMetadata,
        *,
        backend: str | None = None,
        pin_memory: bool | None = None,
        thread_safe: bool = True,
        slot_alignment: int = MIN_SLOT_ALIGNMENT,
    ) -> None:
        super().__init__(
            metadata,
            backend=backend,
            device="cpu",
            pin_memory=pin_memory,
            thread_safe=thread_safe,
            slot_alignment=slot_alignment,
        )


class LocalGPUPool(LocalPool):
    """A pool in GPU memory (torch CUDA tensors or JAX GPU arrays).

    Raises :class:`~lmcache.errors.DeviceUnavailableError` at construction where the backend sees no
    accelerator. (LMCache kept this pool for unit tests; here it is a full pool.)
    """

    default_device = "gpu"

    def __init__(
        self,
        metadata: LMCacheMemPoolMetadata,
        *,
        backend: str | None = None,
        device: str = "gpu",
        thread_safe: bool = True,
        slot_alignment: int = MIN_SLOT_ALIGNMENT,
    ) -> None:
        if device == "cpu":
            raise ConfigError("LocalGPUPool lives on a GPU; use LocalCPUPool for host memory")
        super().__init__(
            metadata, backend=backend, device=device, thread_safe=thread_safe, slot_alignment=slot_alignment
        )


class LocalCPUBufferPool(LocalCPUPool):
    """A host staging pool whose ``allocate`` can wait for a slot to be freed.

    Waiting is woken by :meth:`free` through a condition variable (no polling); :meth:`close` wakes
    every waiter, which then raises :class:`~lmcache.errors.PoolClosedError`.
    """

    def __init__(self, metadata: LMCacheMemPoolMetadata, **options: Any) -> None:
        """Take the options of :class:`LocalCPUPool` (``backend``, ``pin_memory``, ...)."""
        super().__init__(metadata, **options)
        self._slot_freed = threading.Condition(threading.Lock())

    def allocate(self, kv_chunk: Any, timeout: float = 0.0) -> KVObj | None:
        """Allocate a slot for ``kv_chunk``, waiting up to ``timeout`` seconds for one to be freed.

        Returns:
            A KVObj viewing the slot, or None if no slot was free in time. This does not perform the
            actual memory movement.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ConfigError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if timeout == 0:
            return super().allocate(kv_chunk)
        num_tokens = self._tokens_of(kv_chunk)
        deadline = time.monotonic() + timeout
        allocator = self._allocator
        with self._slot_freed:
            while True:
                self._check_open()
                taken = allocator.acquire_many(1, count_failure=False)  # a wait that ends in a slot
                if taken is not None:  # is no failure
                    return self._handle(taken[0][0], num_tokens, taken[1])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    allocator.count_failure()
                    return None
                self._slot_freed.wait(remaining)

    def free(self, kv_obj: KVObj, *, wait_for: Any = None) -> None:
        """Free the slot of ``kv_obj`` and wake one waiting ``allocate``."""
        super().free(kv_obj, wait_for=wait_for)
        with self._slot_freed:
            self._slot_freed.notify()

    def free_batch(self, kv_objs: Iterable[KVObj], *, wait_for: Any = None) -> None:
        """Free several KVObjs (all checked first) and wake as many waiters."""
        objs = list(kv_objs)
        super().free_batch(objs, wait_for=wait_for)
        with self._slot_freed:
            self._slot_freed.notify(len(objs))

    def close(self) -> None:
        """Close the pool and wake every waiting ``allocate`` (they raise PoolClosedError)."""
        super().close()
        with self._slot_freed:
            self._slot_freed.notify_all()


__all__ = ["LocalCPUBufferPool", "LocalCPUPool", "LocalGPUPool", "LocalPool", "wait_until_ready"]
