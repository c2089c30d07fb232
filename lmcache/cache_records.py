"""The chunk cache's records: its statistics, one cached chunk, and a lease on a cached prefix.

Plain records and a small handle: :class:`~lmcache.chunk_cache.ChunkCache` owns every field of a
:class:`CacheEntry` (it changes them under its lock), and a :class:`Lease` changes only its own state,
handing its chain back through the callback the cache gave it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmcache.errors import NotPicklableError
from lmcache.loans import ChunkLoan
from lmcache.storage_backend.mem_pool.base_pool import KVObj


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of a :class:`ChunkCache`'s counters.

    Attributes:
        chunks: chunks cached now.
        leased: chunks pinned by at least one lease now.
        pinned: chunks pinned now by leases or by running ``store`` / ``retrieve`` calls.
        stored: chunks copied in, ever.
        evicted: chunks dropped to make room, ever.
        cleared: chunks dropped by :meth:`ChunkCache.clear` or :meth:`ChunkCache.discard_keys`, ever.
        hit_tokens: tokens found, over ``lookup``, ``retrieve`` and ``lease`` calls.
        query_tokens: tokens asked for, over ``lookup``, ``retrieve`` and ``lease`` calls.
        remote_hits: chunks fetched from the remote tier (0 without one; the tier's counters, shared by
            every cache that uses the same tier object).
        remote_writes: chunks written to the remote tier.
        remote_errors: failed remote operations (server down, slow, refusing credentials).
        remote_dropped: remote writes dropped (queue full, failed write, closed tier).
        remote_corrupt: remote values rejected (wrong format, dtype, shape, length or checksum).
        disk_hits: chunks read from the disk tier (0 without one; the tier's counters, shared by every
            cache that uses the same tier object).
        disk_writes: chunks written to the disk tier.
        disk_errors: failed disk operations (disk full, read-only or vanished directory, I/O errors).
        disk_dropped: disk writes dropped (queue full, failed write, chunk too big, closed tier).
        disk_corrupt: disk files rejected (torn, truncated, flipped, foreign, a link or a directory)
            and removed.
    """

    chunks: int
    leased: int
    pinned: int
    stored: int
    evicted: int
    cleared: int
    hit_tokens: int
    query_tokens: int
    remote_hits: int = 0
    remote_writes: int = 0
    remote_errors: int = 0
    remote_dropped: int = 0
    remote_corrupt: int = 0
    disk_hits: int = 0
    disk_writes: int = 0
    disk_errors: int = 0
    disk_dropped: int = 0
    disk_corrupt: int = 0

    @property
    def hit_rate(self) -> float:
        """``hit_tokens / query_tokens`` (0.0 before any query)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class CacheEntry:
    """One cached chunk. Only :class:`~lmcache.prefix_index.PrefixIndex` changes its fields, under its
    lock; others read ``key``, ``obj`` and ``num_tokens``."""

    __slots__ = ("children", "key", "leases", "num_tokens", "obj", "parent", "parked", "pins")

    def __init__(self, key: bytes, obj: KVObj, parent: CacheEntry | None, num_tokens: int) -> None:
        self.key = key
        #: The pool slot holding the chunk's bytes (the cache owns it).
        self.obj = obj
        #: The entry of the previous chunk of the prefix; None for a first chunk.
        self.parent = parent
        #: Cached chunks that extend this one.
        self.children = 0
        #: Pins by leases, running stores and running retrieves; evictable only at 0.
        self.pins = 0
        #: Pins by leases alone (for ``stats().leased``).
        self.leases = 0
        #: Chosen as a victim while it had cached children: held until its last child leaves.
        self.parked = False
        self.num_tokens = num_tokens


class ShapeOnly:
    """What ``pool.allocate`` reads from a chunk: its shape and dtype, with no memory behind it."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = shape
        self.dtype = dtype


class Lease:
    """Chunks of a cached prefix, pinned until :meth:`release` (or the end of a ``with`` block).

    Attributes:
        chunks: the prefix's chunks in order, as :class:`KVObj` handles lent by the cache (zero-copy views
            of its slots; ``as_torch()``, ``as_jax()``, ``as_numpy()`` work). They are read-only
            (``copy_from`` raises :class:`~lmcache.errors.ReadOnlyHandleError`, numpy views are not
            writeable) and the pool refuses to free them: the cache owns the slots.
        num_tokens: tokens the chunks hold (0 on a miss).

    A leased chunk is never evicted, cleared or overwritten. Leases count: two leases of one chunk need
    two releases. Release every lease; one that is garbage collected unreleased is released then.
    ``release()`` empties ``chunks`` and ends their loan: from then on every use of a KVObj kept from it
    raises :class:`~lmcache.errors.StaleHandleError`. Arrays taken from it earlier are plain views of
    memory that may hold another chunk by then: drop them. A lease can be neither copied nor pickled.
    """

    __slots__ = (
        "__weakref__",
        "_chain",
        "_finalizer",
        "_flip",
        "_loan",
        "_on_release",
        "chunks",
        "num_tokens",
    )

    def __init__(
        self,
        chain: list[CacheEntry],
        on_release: Callable[[list[CacheEntry]], None],
        on_drop: Callable[[list[CacheEntry]], None] | None = None,
    ) -> None:
        """Hold ``chain`` (pinned by the cache); ``on_release(chain)`` unpins it, once. A lease collected
        unreleased calls ``on_drop(chain)`` instead (default ``on_release``), from the garbage collector:
        it must not take a lock the collecting thread may hold."""
        self._chain: list[CacheEntry] | None = chain
        self._on_release = on_release
        self._flip = threading.Lock()  # release() from two threads: exactly one unpins
        self._loan = ChunkLoan([entry.obj for entry in chain], writable=False, purpose="lease")
        self.chunks: list[KVObj] = list(self._loan.handles)
        self.num_tokens: int = sum(entry.num_tokens for entry in chain)
        # A lease dropped without release() gives its pins back when it is collected.
        self._finalizer = (
            weakref.finalize(self, _release_dropped, self._loan, chain, on_release) if chain else None
        )

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._chain is None

    def release(self) -> None:
        """Unpin the chunks and mark them recently used; calling it again does nothing."""
        with self._flip:
            chain, self._chain = self._chain, None
            if chain is None:
                return
            self.chunks = []  # their slots may hold other chunks from now on
            if self._finalizer is not None:
                self._finalizer.detach()
        self._loan.end()
        self._on_release(chain)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(
            "a Lease holds pins on cached chunks and cannot be pickled or copied: a copy would release "
            "them a second time. Take another lease (cache.lease(tokens)) for another holder"
        )

    def __repr__(self) -> str:
        state = "released" if self._chain is None else "held"
        return f"Lease({len(self.chunks)} chunks, {self.num_tokens} tokens, {state})"


def _release_dropped(
    loan: ChunkLoan, chain: list[CacheEntry], on_release: Callable[[list[CacheEntry]], None]
) -> None:
    """What a lease collected without release() does: end the loan and give the pins back."""
    loan.end()
    on_release(chain)


__all__ = ["CacheEntry", "CacheStats", "Lease", "ShapeOnly"]
