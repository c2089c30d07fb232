"""Pools in local memory: host RAM (optionally pinned) or one GPU, for any backend."""

from __future__ import annotations

import math
import operator
import threading
import time
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

from lmcache import forksafe
from lmcache.allocator import ChunkAllocator, PoolStats, closed_error
from lmcache.arena import Arena
from lmcache.arena_owner import ArenaOwner
from lmcache.checks import ChunkChecker
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import (
    ChunkTypeError,
    ConfigError,
    ForeignHandleError,
    NotPicklableError,
)
from lmcache.layout import MIN_SLOT_ALIGNMENT, SlotLayout
from lmcache.memory import MemoryExtent
from lmcache.registry import detect_framework, load_adapter, resolve_backend
from lmcache.storage_backend.mem_pool.base_pool import BasePool, KVBatch, KVObj


class LocalPool(BasePool, ArenaOwner):
    """A pool of ``max_chunk_num`` equal slots in one arena, for chunks of up to ``chunk_size`` tokens.

    The pool composes three parts, each owning its state: a :class:`~lmcache.allocator.ChunkAllocator`
    (which slots are free, who owns the others), an arena (the memory and its views, from the backend's
    adapter) and a :class:`~lmcache.checks.ChunkChecker` (what an argument may be). It also serves its
    handles (:class:`~lmcache.storage_backend.mem_pool.base_pool.ChunkOwner`, through
    :class:`~lmcache.arena_owner.ArenaOwner`): every use of a KVObj is checked against the allocator, and
    every view it gets is its own.

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
        slot_alignment: slot stride multiple in bytes (a power of two from 256 to 1 GiB).
        memory: host memory for the arena instead of a new allocation (a CPU pool only): a writable,
            page-aligned 1-D ``uint8`` numpy array of at least ``max_chunk_num * size_per_chunk``
            bytes, such as a mapping shared with other processes (:mod:`lmcache.shared` serves one
            cache from such a pool). The pool views it in place and never frees it; pinning applies
            to it as to a new arena.

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
        memory: Any = None,
    ) -> None:
        if not isinstance(metadata, LMCacheMemPoolMetadata):
            raise ConfigError(f"metadata must be an LMCacheMemPoolMetadata, got {type(metadata).__name__}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise ConfigError(f"pin_memory must be True, False or None, got {pin_memory!r}")
        if not isinstance(thread_safe, bool):
            raise ConfigError(f"thread_safe must be True or False, got {thread_safe!r}")
        self.metadata = metadata
        self._slot_alignment = slot_alignment
        #: Slot geometry (stride, alignment, view shapes); what engines registering memory need.
        self.layout = SlotLayout.from_metadata(metadata, slot_alignment)
        #: Tokens in a full chunk.
        self.chunk_size = self.layout.chunk_size
        #: Bytes per slot (a full chunk rounded up to the slot alignment); ``KVObj.size``.
        self.size_per_chunk = self.layout.slot_bytes
        #: The number of slots, ``floor(budget / size_per_chunk)``.
        self.max_chunk_num = self.init_max_chunk_num(metadata)
        #: The framework of ``KVObj.data`` and ``arena``.
        self.backend = resolve_backend(backend, metadata)
        device = self._resolve_device(device)
        if memory is not None and device != "cpu":
            raise ConfigError(f"memory= gives host memory to a CPU pool, not to a {device} pool")
        adapter = load_adapter(self.backend)
        self._arena: Arena = adapter.create_arena(
            self.layout, self.max_chunk_num, device=device, pin_memory=pin_memory, memory=memory
        )
        #: Where the arena lives (``"cpu"``, ``"cuda:0"``).
        self.device: str = self._arena.device
        self._allocator = ChunkAllocator(self.max_chunk_num, thread_safe=thread_safe)
        self._checker = ChunkChecker(self.layout, self.backend)
        # Bound once: the hot path calls them without attribute lookups.
        self._acquire_one = self._allocator.acquire_one
        self._release_one = self._allocator.release_one
        self._is_live = self._allocator.is_live
        self._shapes = self._checker.shapes  # read only here; the checker fills it
        base = self._arena.base_address
        self._extent = MemoryExtent(self.device, base, base + self.max_chunk_num * self.size_per_chunk, False)

    # -- the LMCache v0 API ------------------------------------------------------------------------
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
                f"{metadata.dtype.name} at slot_alignment {layout.slot_alignment}); raise "
                "max_local_cache_size or shrink the chunk"
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
            ChunkTypeError: ``kv_chunk`` has no shape, or its dims are not ints.
            ChunkShapeError: a dim or the dtype does not match; the pool is unchanged.
            PoolClosedError: the pool was closed.
        """
        # Fast path: an int token count, the dtype object seen before, and a shape equal to the cached
        # view shape; anything else goes through the checker, which validates fully and says why.
        try:
            shape = kv_chunk.shape
            num_tokens = shape[2]
            fast = (
                num_tokens.__class__ is int
                and kv_chunk.dtype is self._checker.fast_dtype
                and shape == self._shapes.get(num_tokens)
            )
        except (AttributeError, TypeError, IndexError, ValueError):
            fast = False
        if not fast:
            num_tokens = self._checker.check_chunk(kv_chunk)
        taken = self._acquire_one()
        if taken is None:
            return None
        return KVObj._issue(self, taken[0], num_tokens, taken[1])

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
        if kv_obj.__class__ is KVObj and wait_for is None:  # the hot path: one read of the handle
            identity = kv_obj._identity_in(self)
            if identity is not None:
                self._release_one(*identity)
                return
        if kv_obj.__class__ is not KVObj and not isinstance(kv_obj, KVObj):
            raise ForeignHandleError(f"free() takes a KVObj, got {type(kv_obj).__name__}")
        if kv_obj.pool is not self:
            raise self._foreign(kv_obj)
        if wait_for is not None:
            if not self._is_live(kv_obj.chunk_idx, kv_obj.generation):
                raise self._allocator.handle_error(kv_obj.chunk_idx, kv_obj.generation)
            wait_until_ready(wait_for)
        self._release_one(kv_obj.chunk_idx, kv_obj.generation)

    # -- beyond the LMCache v0 API -----------------------------------------------------------------
    def reissue(self, kv_obj: KVObj) -> KVObj:
        """Free ``kv_obj``'s slot and allocate it again in one step; return the new handle.

        For layers that recycle a slot for new contents of the same length (a cache evicting a chunk for
        the next one): ``kv_obj`` becomes stale, as after ``free``, so whoever still holds it can no
        longer reach the slot; counted as one free and one allocation. Cheaper than ``free`` then
        ``allocate``, and the slot cannot go to another owner in between.

        Raises:
            DoubleFreeError, StaleHandleError, ForeignHandleError: as :meth:`free`; nothing changes.
        """
        if kv_obj.__class__ is not KVObj and not isinstance(kv_obj, KVObj):
            raise ForeignHandleError(f"reissue() takes a KVObj, got {type(kv_obj).__name__}")
        if kv_obj.pool is not self:
            raise self._foreign(kv_obj)
        ticket = self._allocator.reissue_one(kv_obj.chunk_idx, kv_obj.generation)
        return KVObj._issue(self, kv_obj.chunk_idx, kv_obj.num_tokens, ticket)

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
            tokens = [self._checker.check_chunk(chunks[0])] * len(chunks)
        else:
            checked: dict[int, int] = {}  # id(chunk) -> tokens
            tokens = []
            for chunk in chunks:
                n = checked.get(id(chunk))
                if n is None:
                    n = checked[id(chunk)] = self._checker.check_chunk(chunk)
                tokens.append(n)
        taken = self._allocator.acquire_many(len(tokens))
        if taken is None:
            return None
        slots, first_ticket = taken
        return KVBatch._issue(self, slots, tokens, first_ticket)

    def free_batch(self, kv_objs: Iterable[KVObj], *, wait_for: Any = None) -> None:
        """Free several KVObjs (or a whole :class:`KVBatch`); every handle is checked before any is
        freed, so an error frees none."""
        self._free_many(kv_objs, wait_for)

    def _free_many(self, kv_objs: Iterable[KVObj], wait_for: Any) -> int:
        """Free a batch or an iterable of KVObjs (all checked first); return how many were freed."""
        if isinstance(kv_objs, KVBatch):
            if kv_objs.pool is not self:
                raise ForeignHandleError("free_batch() was given a KVBatch of another pool")
            slots: Sequence[int] = kv_objs.chunk_idx
            generations: Sequence[int] = kv_objs.generations
        else:
            if isinstance(kv_objs, (str, bytes)) or not isinstance(kv_objs, Iterable):
                raise ForeignHandleError(f"free_batch() takes KVObjs, got {type(kv_objs).__name__}")
            objs = list(kv_objs)
            for obj in objs:
                if obj.__class__ is not KVObj and not isinstance(obj, KVObj):
                    raise ForeignHandleError(f"free_batch() takes KVObjs, got a {type(obj).__name__}")
                if obj.pool is not self:
                    raise self._foreign(obj)
            slots = [obj.chunk_idx for obj in objs]
            generations = [obj.generation for obj in objs]
        if wait_for is not None:
            for slot, generation in zip(slots, generations, strict=True):
                if not self._is_live(slot, generation):
                    raise self._allocator.handle_error(slot, generation)
            wait_until_ready(wait_for)
        self._allocator.release_many(slots, generations)
        return len(slots)

    def put(self, kv_chunk: Any) -> KVObj | None:
        """Allocate a slot for ``kv_chunk`` and copy it in; None (nothing copied) when the pool is full.

        ``kv_chunk`` may come from any framework and device, or be any DLPack producer. It is checked
        completely before a slot is taken, so a bad chunk leaves the pool unchanged. Returns when the
        bytes are in the slot.
        """
        framework, src, num_tokens = self._checker.source(kv_chunk, None, "kv_chunk")
        taken = self._acquire_one()
        if taken is None:
            return None
        slot, ticket = taken
        try:
            self._arena.copy_in(slot, num_tokens, src, framework)
        except BaseException:
            self._release_one(slot, ticket)
            raise
        return KVObj._issue(self, slot, num_tokens, ticket)

    def stats(self) -> PoolStats:
        """Return a consistent snapshot of the pool's counters (see :class:`~lmcache.allocator.PoolStats`)."""
        return self._allocator.stats(self.size_per_chunk)

    @property
    def arena(self) -> Any:
        """The whole arena as one native array of shape ``(max_chunk_num, slot_elems)``, no copy.

        Row ``i`` is slot ``i``; a chunk of ``n`` tokens is its first ``n * layout.token_elems``
        elements, reshaped to ``layout.view_shape(n)``. Jitted JAX code can take the arena plus chunk
        indices and gather inside ``jit`` (see :func:`lmcache_jax.gather_chunks`). Each access returns
        an array object of your own (changing it does not change the pool's).
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
        if chunk_idx.__class__ is not int or not 0 <= chunk_idx < self.max_chunk_num:
            raise ConfigError(f"chunk_idx must be an int in 0..{self.max_chunk_num - 1}, got {chunk_idx!r}")
        return self._arena.base_address + chunk_idx * self.size_per_chunk

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._allocator.closed

    @property
    def thread_safe(self) -> bool:
        """Whether every call takes the pool's lock (``thread_safe=False`` promised a single owner)."""
        return self._allocator.lock is not None

    def close(self) -> None:
        """Stop handing out and taking back slots; release pinning. Outstanding views stay valid memory.

        Calls after ``close`` raise :class:`~lmcache.errors.PoolClosedError`; closing twice is a no-op.
        """
        if self._allocator.closed:
            return
        self._allocator.close()
        self._arena.close()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(
            "a pool owns its arena's memory and cannot be pickled; build a pool in each process from the "
            "same LMCacheMemPoolMetadata (which pickles), and move chunks as bytes (kv_obj.clone('numpy'))"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, device={self.device!r}, "
            f"kv_shape={self.layout.kv_shape}, dtype={self.layout.dtype.name}, "
            f"max_chunk_num={self.max_chunk_num}{', closed' if self.closed else ''})"
        )

    # -- what handles need (ChunkOwner) ------------------------------------------------------------
    def check_handle(self, slot: int, generation: int) -> None:
        """Raise why the handle ``(slot, generation)`` does not own its slot; return if it does."""
        if not self._is_live(slot, generation):
            raise self._allocator.handle_error(slot, generation, freeing=False)

    def handle_is_live(self, slot: int, generation: int) -> bool:
        """Whether the handle ``(slot, generation)`` owns its slot now."""
        return self._is_live(slot, generation)

    def _first_view(self, slot: int, generation: int, num_tokens: int) -> Any:
        """The view of a live handle's chunk (:meth:`check_handle`, then the arena's view), for
        ``KVObj.data``'s first access: allocate's hot path, so both are inlined."""
        if not self._is_live(slot, generation):
            raise self._allocator.handle_error(slot, generation, freeing=False)
        return self._arena.view(slot, num_tokens)

    # The views and copies of handles are ArenaOwner's; each first asks _live_slot, so no caller
    # without the live handle of a slot can reach the slot's memory.
    def _live_slot(self, handle: KVObj) -> int:
        """Return the slot of ``handle`` after checking that it is this pool's and owns its slot."""
        try:  # the common case first: every handle's first .data comes here (allocate's hot path)
            slot = handle.chunk_idx
            if handle.pool is self and self._is_live(slot, handle.generation):
                return slot
        except AttributeError:  # not a KVObj: refused below
            pass
        if handle.__class__ is not KVObj and not isinstance(handle, KVObj):
            raise ForeignHandleError(f"expected a KVObj of this pool, got {type(handle).__name__}")
        if handle.pool is not self:
            raise self._foreign(handle)
        slot = handle.chunk_idx
        if not self._is_live(slot, handle.generation):
            raise self._allocator.handle_error(slot, handle.generation, freeing=False)
        return slot

    # -- internals ---------------------------------------------------------------------------------
    def _resolve_device(self, device: str | None) -> str:
        if device is None:
            return self.default_device
        if not isinstance(device, str) or not device:
            raise ConfigError(f"device must be 'cpu', 'gpu' or a name like 'cuda:0', got {device!r}")
        if device.partition(":")[0].lower() == "cpu":  # "cpu:0" is host memory too
            return "cpu"
        return device

    def _foreign(self, kv_obj: KVObj) -> ForeignHandleError:
        if kv_obj.pool is None:
            return ForeignHandleError(
                f"KVObj(chunk_idx={kv_obj.chunk_idx}) was built by hand; free only KVObjs that "
                "this pool's allocate() returned"
            )
        return ForeignHandleError(
            f"KVObj(chunk_idx={kv_obj.chunk_idx}) belongs to another pool ({kv_obj.pool!r}); "
            "free it with the pool that allocated it"
        )

    def _check_open(self) -> None:
        if self._allocator.closed:
            raise closed_error()


def wait_until_ready(arrays: Any) -> None:
    """Block until every array in ``arrays`` (one array, or a list/tuple of them) is computed.

    JAX arrays are waited for with ``block_until_ready``; CUDA torch tensors with a synchronize of
    their device; anything else is taken as ready.
    """
    items = arrays if isinstance(arrays, (list, tuple)) else (arrays,)
    for item in items:
        framework = detect_framework(item)
        if framework is not None:
            load_adapter(framework).wait(item)


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
        memory: Any = None,
    ) -> None:
        super().__init__(
            metadata,
            backend=backend,
            device="cpu",
            pin_memory=pin_memory,
            thread_safe=thread_safe,
            slot_alignment=slot_alignment,
            memory=memory,
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
        forksafe.register(self)

    def allocate(self, kv_chunk: Any, timeout: float | None = 0.0) -> KVObj | None:
        """Allocate a slot for ``kv_chunk``, waiting up to ``timeout`` seconds for one to be freed.

        Args:
            kv_chunk: as for :meth:`LocalPool.allocate`.
            timeout: seconds to wait; 0 does not wait; None or ``float("inf")`` waits until a slot is
                freed or the pool is closed (as ``queue.Queue.get`` does).

        Returns:
            A KVObj viewing the slot, or None if no slot was free in time. This does not perform the
            actual memory movement.
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise ConfigError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        if timeout == 0:
            return super().allocate(kv_chunk)
        num_tokens = self._checker.check_chunk(kv_chunk)
        deadline = None if timeout is None or math.isinf(timeout) else time.monotonic() + timeout
        allocator = self._allocator
        with self._slot_freed:
            while True:
                taken = allocator.acquire_many(1, count_failure=False)  # a wait that ends in a slot
                if taken is not None:  # is no failure
                    return KVObj._issue(self, taken[0][0], num_tokens, taken[1])
                if deadline is None:
                    self._slot_freed.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    allocator.count_failure()
                    return None
                self._slot_freed.wait(min(remaining, threading.TIMEOUT_MAX))

    def free(self, kv_obj: KVObj, *, wait_for: Any = None) -> None:
        """Free the slot of ``kv_obj`` and wake one waiting ``allocate``."""
        super().free(kv_obj, wait_for=wait_for)
        with self._slot_freed:
            self._slot_freed.notify()

    def free_batch(self, kv_objs: Iterable[KVObj], *, wait_for: Any = None) -> None:
        """Free several KVObjs or a :class:`KVBatch` (all checked first) and wake as many waiters."""
        freed = self._free_many(kv_objs, wait_for)
        with self._slot_freed:
            self._slot_freed.notify(freed)

    def close(self) -> None:
        """Close the pool and wake every waiting ``allocate`` (they raise PoolClosedError)."""
        super().close()
        with self._slot_freed:
            self._slot_freed.notify_all()

    def reset_locks_after_fork(self) -> None:
        """Give a forked child a new condition variable (see :mod:`lmcache.forksafe`)."""
        self._slot_freed = threading.Condition(threading.Lock())


__all__ = ["LocalCPUBufferPool", "LocalCPUPool", "LocalGPUPool", "LocalPool", "wait_until_ready"]
