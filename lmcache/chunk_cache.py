"""The chunk cache: KV chunks of token prefixes kept in a pool, found again by prompt.

:class:`ChunkCache` owns the slots it takes from a :class:`~lmcache.storage_backend.mem_pool.LocalPool`
(numpy, torch or JAX backend, CPU or GPU). A prompt is cut into chunks of ``pool.chunk_size`` tokens;
each chunk has a key that names its whole prefix, so a cached chunk is reused only by prompts that start
with exactly the same tokens.

It is a facade over four parts, each owning one thing:

* keys (:mod:`lmcache.cache_keys`): chained ``blake2b`` digests of the token ids, the same in every
  process, machine and array type;
* the prefix index (:class:`~lmcache.prefix_index.PrefixIndex`): which chunks are cached in which slots,
  pins and leases, and eviction of leaves under a policy (:mod:`lmcache.policies`);
* copies (:class:`~lmcache.cache_copies.ChunkCopies`): prompts of any framework to and from slots;
* tiers (:class:`~lmcache.tiers.chain.TierChain`): a disk directory (:mod:`lmcache.disk`) and a remote
  server (:mod:`lmcache.remote`) below the slots, written behind and read through, in that order.

Hashing and byte copies run outside the index's lock; a chunk is published only once its bytes are in
its slot, so ``lookup``, ``retrieve`` and ``lease`` never see a half-written chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from lmcache.allocator import closed_error
from lmcache.cache_copies import ChunkCopies, out_too_short, spans
from lmcache.cache_keys import (
    KEY_BYTES,
    TokensTypeError,
    TokensValueError,
    check_keys,
    chunk_keys,
    chunk_tokens,
    root_key,
    token_ids,
)
from lmcache.cache_records import CacheEntry, CacheStats, Lease
from lmcache.disk import DiskTier
from lmcache.errors import CacheInvariantError, ConfigError
from lmcache.loans import ChunkLoan
from lmcache.paged import PagedRequest, check_scatter_target
from lmcache.policies import EvictionPolicy, make_policy
from lmcache.prefix_index import PrefixIndex, Reservation
from lmcache.remote import RedisTier
from lmcache.storage_backend.mem_pool.base_pool import KVObj
from lmcache.storage_backend.mem_pool.local_pool import LocalPool
from lmcache.tiers.base import Tier
from lmcache.tiers.chain import TierChain


class ChunkCache:
    """KV chunks of token prefixes in a pool, found again by prompt; leaf eviction under a policy.

    Args:
        pool: any :class:`~lmcache.storage_backend.mem_pool.LocalPool` (numpy, torch or JAX backend, CPU
            or GPU). The cache owns the slots it allocates; slots that others allocate from the same pool
            are not the cache's, and when the pool has no free slot and the cache has nothing to evict,
            ``store`` stops.
        namespace: separates caches whose chunks must never mix (model, KV dtype, tensor-parallel rank):
            it seeds every key.
        policy: the eviction policy: a name from :data:`lmcache.policies.POLICIES`, ``"default"`` (or
            None) for :data:`~lmcache.policies.DEFAULT_POLICY`, or a policy object. Every policy evicts
            only leaves and never a pinned chunk.
        remote: a remote tier to write through to and read through from: a URL
            (``"redis://host:port/db"``, ``"rediss://..."``) for a :class:`~lmcache.remote.RedisTier`
            with default options, or a tier object built with options (key prefix, TTL, timeouts, queue
            size). A tier made from a URL is closed by :meth:`close`; a tier object stays its creator's
            to close. Remote faults never raise: they are counted in ``stats()``.
        disk: a disk tier below the slots, read before the remote one: a directory path for a
            :class:`~lmcache.disk.DiskTier` with default options (16 GiB, no fsync), or a tier object
            built with options (``size_gib``, ``fsync``, queue size). Chunks are written behind to one
            file each and found again by a cache built on the same directory and namespace after a
            restart. A tier made from a path is closed by :meth:`close`; a tier object stays its
            creator's. Disk faults never raise: they are counted in ``stats()``.

    Invariants (checked by the test-suite's state machines):

    * The cached set is prefix-closed: every cached chunk's parent is cached.
    * An entry is pinned (not evictable) while a lease, a running ``store`` or a running ``retrieve``
      covers it; pins cover whole prefixes.

    Thread-safe. Every method costs O(1) index work per chunk plus hashing and copying.

    Example:
        >>> import numpy as np
        >>> from lmcache.chunk_cache import ChunkCache
        >>> from lmcache.config import LMCacheMemPoolMetadata
        >>> from lmcache.storage_backend.mem_pool import LocalCPUPool
        >>> pool = LocalCPUPool(LMCacheMemPoolMetadata((2, 2, 4, 1, 8), "float32", 0.001), backend="numpy")
        >>> cache = ChunkCache(pool)
        >>> tokens = list(range(10))                         # 2 full chunks of 4 tokens, 1 of 2
        >>> kv = np.random.default_rng(0).random((2, 2, 10, 1, 8), dtype=np.float32)
        >>> cache.store(tokens, kv)
        10
        >>> cache.lookup(tokens[:6] + [99])                  # the first chunk matches
        4
        >>> out, n = cache.retrieve(tokens)
        >>> n, bool((out == kv).all())
        (10, True)
    """

    def __init__(
        self,
        pool: LocalPool,
        *,
        namespace: str = "",
        policy: str | EvictionPolicy | None = None,
        remote: str | RedisTier | None = None,
        disk: str | os.PathLike[str] | DiskTier | None = None,
    ) -> None:
        if not isinstance(pool, LocalPool):
            raise ConfigError(f"ChunkCache needs a LocalPool (or a subclass), got {type(pool).__name__}")
        if not isinstance(namespace, str):
            raise ConfigError(f"namespace must be a str, got {type(namespace).__name__}")
        if remote is not None and not isinstance(remote, (str, RedisTier)):
            raise ConfigError(
                f"remote must be a URL such as 'redis://127.0.0.1:6379/0' or a RedisTier, got "
                f"{type(remote).__name__}"
            )
        if disk is not None and not isinstance(disk, (str, os.PathLike, DiskTier)):
            raise ConfigError(f"disk must be a directory path or a DiskTier, got {type(disk).__name__}")
        #: The pool the chunks live in.
        self.pool = pool
        #: The string every key is seeded with.
        self.namespace = namespace
        self._root = root_key(namespace)
        self._layout = pool.layout
        self._chunk_size = pool.chunk_size
        self._copies = ChunkCopies(pool)
        self._index = PrefixIndex(pool, pool.layout, make_policy(policy, pool.max_chunk_num))
        tiers: list[tuple[Tier, bool]] = []  # in read order: disk, then remote
        #: The disk tier, or None.
        self.disk = disk if isinstance(disk, DiskTier) or disk is None else DiskTier(disk)
        if self.disk is not None:
            tiers.append((self.disk, not isinstance(disk, DiskTier)))
        #: The remote tier, or None.
        try:
            self.remote = RedisTier(remote) if isinstance(remote, str) else remote
        except BaseException:
            if self.disk is not None and not isinstance(disk, DiskTier):
                self.disk.close()  # made here: not left running when the cache fails to build
            raise
        if self.remote is not None:
            tiers.append((self.remote, isinstance(remote, str)))
        self._tiers = TierChain(tiers, self._index, self._copies, self._layout, namespace)

    def cached_keys(self) -> list[bytes]:
        """The keys of every chunk cached now, in no particular order (a snapshot, for observation)."""
        return self._index.keys()

    def __contains__(self, key: object) -> bool:
        """Whether the chunk ``key`` (one of :meth:`keys`) is cached now, in a slot."""
        return key in self._index

    @property
    def policy(self) -> EvictionPolicy:
        """The eviction policy."""
        return self._index.policy

    # -- keys ----------------------------------------------------------------------------------------
    def keys(self, tokens: Any) -> list[bytes]:
        """Return the key of each chunk of ``tokens`` (``KEY_BYTES`` bytes each; the last chunk may be
        partial).

        ``key_i = blake2b(ids of chunk i as little-endian int64, key=key_{i-1}, digest_size=16)`` with
        ``key_{-1} = blake2b(domain + namespace)``: a key names its whole prefix, and is the same for
        every process, machine, ``PYTHONHASHSEED`` and array type.

        Raises:
            TokensTypeError, TokensValueError: ``tokens`` are not a 1-D sequence of integer ids.
        """
        return list(self._iter_keys(token_ids(tokens)))

    def chunk_tokens(self, num_tokens: int) -> list[int]:
        """The token count of each chunk of a prompt of ``num_tokens`` tokens (the last may be partial)."""
        return chunk_tokens(num_tokens, self._chunk_size)

    def _iter_keys(self, ids: np.ndarray) -> Iterator[bytes]:
        """Yield the chunk keys of ``ids`` lazily (a miss stops the caller early, sparing the hashing)."""
        return chunk_keys(ids, self._chunk_size, self._root)

    # -- queries -------------------------------------------------------------------------------------
    def lookup(self, tokens: Any) -> int:
        """Return how many leading tokens of ``tokens`` are covered by cached chunks (in slots, or in a
        tier below them).

        A pure query: contents and recency are unchanged (``hit_tokens`` and ``query_tokens`` count it).
        """
        ids = token_ids(tokens)
        cached = self._index.cached_prefix(self._iter_keys(ids))
        hit = min(len(cached) * self._chunk_size, len(ids))
        if self._tiers and hit < len(ids):  # one round trip per tier for the chunks that follow
            found = self._tiers.probe(list(self._iter_keys(ids)), self.chunk_tokens(len(ids)), len(cached))
            hit = min(found * self._chunk_size, len(ids))
        self._index.count_query(hit, len(ids))
        return hit

    def lookup_keys(self, keys: Sequence[bytes], num_tokens: int) -> int:
        """:meth:`lookup` of a prompt of ``num_tokens`` tokens given by its chunk keys (for callers that
        hash themselves: the shared cache's clients, engine adapters)."""
        keys = self._check_keys(keys, num_tokens)
        tokens = self.chunk_tokens(num_tokens)
        found = len(self._index.cached_prefix(keys, tokens))
        if self._tiers and found < len(keys):
            found = self._tiers.probe(keys, tokens, found)
        hit = min(found * self._chunk_size, num_tokens)
        self._index.count_query(hit, num_tokens)
        return hit

    def stats(self) -> CacheStats:
        """Return a consistent snapshot of the counters (see :class:`CacheStats`)."""
        return self._index.stats(**self._tiers.counters())

    def __len__(self) -> int:
        """Chunks cached now."""
        return len(self._index)

    # -- store ---------------------------------------------------------------------------------------
    def store(self, tokens: Any, kv: Any) -> int:
        """Store the KV of ``tokens`` chunk by chunk; return the tokens cached afterwards (as ``lookup``).

        Args:
            tokens: the prompt's token ids (see :func:`token_ids`).
            kv: ``(L, 2, len(tokens), H, D)`` (``1`` in place of ``2`` for MLA pools) of the pool's
                dtype, from numpy, torch or JAX, on any device.

        Chunks already cached are not copied again; their recency is refreshed. Each missing chunk takes
        a slot (evicting a leaf when the pool is full) and is copied in. The store stops at the first
        chunk that gets no slot (nothing evictable): it never raises for a full pool.

        Raises:
            TokensTypeError, TokensValueError: bad tokens.
            ChunkShapeError, ChunkTypeError: ``kv`` is not an array of the right shape and dtype.
            Nothing is stored when any of these is raised.
        """
        ids = token_ids(tokens)
        source = self._copies.check_kv(kv, len(ids))
        size = self._chunk_size
        return self._insert(
            list(self._iter_keys(ids)), len(ids), lambda i: self._copies.filler(source, i * size)
        )

    def store_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> int:
        """Store the KV of ``tokens`` from a paged KV cache; the same semantics and result as :meth:`store`.

        Token ``t`` is read from block ``block_ids[t // block_size]``, offset ``t % block_size``; each
        missing chunk is gathered straight into its slot (torch: one ``index_select`` per chunk, or per
        chunk and layer for ``"vllm"``; JAX: one jitted gather for all missing tokens). See
        :mod:`lmcache.paged` for the layouts.

        Args:
            tokens: the prompt's token ids.
            kv_caches: the paged cache: a list of per-layer tensors ``(2, B, S, H, D)`` (``"vllm"``), one
                torch or JAX array ``(L, 2, B, S, H, D)`` (``"stacked"``), or a list of per-layer JAX
                arrays ``(B, S, 2 * H, D)`` (``"interleaved"``); ``1`` in place of ``2`` for MLA.
            block_ids: the request's block ids, at least ``ceil(len(tokens) / S)`` of them (more are
                ignored), distinct and in ``0..B-1``, in any order.
            layout: ``"vllm"``, ``"stacked"`` or ``"interleaved"``.

        Raises:
            TokensTypeError, TokensValueError: bad tokens.
            ConfigError: an unknown layout.
            ChunkTypeError, ChunkShapeError: the cache does not fit the layout or the pool, or the block
                table breaks a rule. Nothing is read or stored when any of these is raised.
        """
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self._layout, host=self._copies.host)
        request.check_table(len(ids))
        size, total = self._chunk_size, len(ids)

        def filler(index: int) -> Callable[[KVObj], bool]:
            def fill(obj: KVObj) -> bool:
                request.gather_into_slot(obj, index * size, obj.num_tokens, total)
                return True

            return fill

        return self._insert(list(self._iter_keys(ids)), total, filler)

    def begin_store(self, keys: Sequence[bytes], num_tokens: int) -> PendingStore:
        """Reserve slots for the chunks of a prompt of ``num_tokens`` tokens given by its keys, for a
        caller that copies the bytes itself (the shared cache's server, engine adapters).

        Cached chunks are pinned; each missing one gets a slot (evicting leaves), up to the first that
        gets none. Fill every slot of :attr:`PendingStore.slots`, then :meth:`PendingStore.commit`.

        Raises:
            ConfigError: ``keys`` do not fit ``num_tokens`` (one per chunk, 16 bytes each), or do not
                chain (not ``keys(tokens)`` of one prompt); nothing is pinned or taken then.
            PoolClosedError: the pool was closed; nothing is pinned or taken.
        """
        keys = self._check_keys(keys, num_tokens)
        reservation = self._index.reservation()
        reservation.extend(keys, self.chunk_tokens(num_tokens))
        return PendingStore(reservation, self._tiers, lend=True)

    def load_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> Any:
        """Copy the longest cached prefix of ``tokens`` into the request's blocks of a paged KV cache.

        Only the positions of the ``n`` loaded tokens are written: the rest of the last block and every
        other block keep their bytes. Arguments as :meth:`store_paged`; the block table needs only
        ``ceil(n / block_size)`` ids. With a tier below the slots, chunks are first fetched as for
        :meth:`retrieve` (only as many as the table's blocks can take).

        Returns:
            torch: ``n``, the tokens loaded (the cache is written in place). JAX: ``(new_kv_caches, n)``;
            the scatter donates the arrays passed in, so use the returned ones (on a miss, ``n == 0`` and
            ``kv_caches`` itself is returned).

        Raises:
            TokensTypeError, TokensValueError: bad tokens.
            ConfigError, ChunkTypeError, ChunkShapeError: as :meth:`store_paged`, raised before anything is
                read or written, with the cache and its statistics unchanged.
            OverlapError: two layers share memory, or a layer overlaps the cache's pool.
        """
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self._layout, host=self._copies.host)
        check_scatter_target(kv_caches, request.spec, self.pool.overlaps)
        self._pull(ids, request.coverable_tokens(len(ids)))
        chain = self._pin_prefix(ids, None, lease=False, check=request.check_table)
        try:
            num_tokens = sum(entry.num_tokens for entry in chain)
            if not chain:
                return 0 if request.spec.framework == "torch" else (kv_caches, 0)
            result = request.scatter_chunks([(start, entry.obj) for start, entry in spans(chain)], num_tokens)
        finally:
            self._index.unpin(chain)
        return result if request.spec.framework == "torch" else (result, num_tokens)

    def _insert(self, keys: list[bytes], total: int, filler: Callable[[int], Callable[[KVObj], bool]]) -> int:
        """Cache the chunks of ``keys`` (``total`` tokens); return the tokens cached afterwards.

        Chunk by chunk: a cached one is pinned; a missing one gets a slot, ``filler(index)`` gives the
        function that writes it (called without the lock), and it is published at once. New chunks are
        written behind to the tiers. When a fill raises, the chunks published before it stay.
        """
        reservation = self._index.reservation()
        pending = PendingStore(reservation, self._tiers)
        with pending:
            tokens = self.chunk_tokens(total)
            for index in range(reservation.pin(keys), len(keys)):
                if not reservation.extend(keys[index : index + 1], tokens[index : index + 1]):
                    break  # no slot: nothing left to evict
                if reservation.slots:  # not cached meanwhile by another store
                    filler(index)(reservation.slots[0])
                    reservation.publish()  # visible from now on; pinned until the commit
            prefix = pending.commit()
        return sum(entry.num_tokens for entry in prefix)

    # -- retrieve and lease --------------------------------------------------------------------------
    def retrieve(self, tokens: Any, *, out: Any = None, framework: str | None = None) -> tuple[Any, int]:
        """Copy the longest cached prefix of ``tokens`` into one contiguous array.

        Args:
            tokens: the prompt's token ids.
            out: optional writable numpy array or torch tensor (any device) of shape
                ``(L, 2, T, H, D)`` with ``T >= n`` and the pool's dtype; ``out[:, :, :n]`` is written.
            framework: ``"numpy"``, ``"torch"`` or ``"jax"`` for a new array (default: the pool's
                backend). On a CPU pool, the result is made in host memory; on a GPU pool, on its device.

        Returns:
            ``(array, n)``: a new ``(L, 2, n, H, D)`` array (or ``out``) and the tokens copied;
            ``(None, 0)`` on a miss, with ``out`` untouched.

        Raises:
            ChunkShapeError: ``out`` has the wrong shape or dtype, or fewer than ``n`` tokens; raised
                before anything is copied, and the cache is unchanged.
            ChunkTypeError: ``out`` is not a writable numpy array or torch tensor.
            OverlapError: ``out`` overlaps the cache's pool, or its elements overlap each other.
            ConfigError: ``framework`` is not a backend name, or differs from ``out``'s.
        """
        ids = token_ids(tokens)
        limit = self._copies.check_out(out, framework) if out is not None else None
        if out is None:
            framework = self._copies.check_framework(framework)
        self._pull(ids, limit)
        chain = self._pin_prefix(ids, limit, lease=False)
        try:
            num_tokens = sum(entry.num_tokens for entry in chain)
            if not chain:
                return None, 0
            objs = [entry.obj for entry in chain]
            if out is not None:
                self._copies.into_out(objs, out)
                result = out
            else:
                result = self._copies.gather(objs, num_tokens, framework)  # type: ignore[arg-type]
        finally:
            self._index.unpin(chain)
        return result, num_tokens

    def lease(self, tokens: Any) -> Lease:
        """Pin the chunks of the longest cached prefix of ``tokens`` and return them as a :class:`Lease`.

        Use it as a context manager, or call ``release()``. A miss gives an empty lease.
        """
        ids = token_ids(tokens)
        self._pull(ids, None)
        return self._lease(self._pin_prefix(ids, None, lease=True))

    def lease_keys(self, keys: Sequence[bytes], num_tokens: int) -> Lease:
        """:meth:`lease` of a prompt of ``num_tokens`` tokens given by its chunk keys.

        Raises:
            ConfigError: ``keys`` do not fit ``num_tokens``, or do not chain; nothing is pinned.
        """
        keys = self._check_keys(keys, num_tokens)
        tokens = self.chunk_tokens(num_tokens)
        self._pull_keys(keys, num_tokens, None)
        cached = self._index.cached_prefix(keys, tokens)
        return self._lease(self._index.pin_prefix(cached, num_tokens, lease=True, tokens=tokens))

    def _lease(self, chain: list[CacheEntry]) -> Lease:
        lease = Lease(chain, self._index.release_lease, self._index.release_later)
        if chain and self.pool.closed:  # its chunks could not be read: refuse, as retrieve does
            lease.release()
            raise closed_error()
        return lease

    def pin_keys(
        self,
        keys: Sequence[bytes],
        num_tokens: int,
        *,
        within: int | None = None,
        check: Callable[[int], None] | None = None,
    ) -> Lease:
        """Pin the longest cached prefix of a prompt given by its chunk keys for one read, as
        :meth:`retrieve` and :meth:`load_paged` do, for callers that copy the chunks themselves (the
        shared cache's server).

        Unlike :meth:`lease_keys`, the pin is no lease (``stats().leased`` does not count it); the
        query is counted as a retrieve's. ``release()`` unpins the chunks and marks them used.

        Args:
            keys, num_tokens: the prompt, as for :meth:`lookup_keys`.
            within: fetch from the tiers only chunks within this many tokens (the tokens an ``out`` or
                a block table can take); None: all.
            check: called with the cached prefix's token count under the index's lock before anything
                is pinned or counted; if it raises (an ``out`` too short), nothing is.

        Raises:
            ConfigError: ``keys`` do not fit ``num_tokens``, or do not chain; nothing is pinned.
        """
        keys = self._check_keys(keys, num_tokens)
        tokens = self.chunk_tokens(num_tokens)
        self._pull_keys(keys, num_tokens, within)
        cached = self._index.cached_prefix(keys, tokens)
        chain = self._index.pin_prefix(cached, num_tokens, lease=False, tokens=tokens, check=check)
        return Lease(chain, self._index.unpin, self._index.unpin_later)

    def _pin_prefix(
        self, ids: np.ndarray, limit: int | None, *, lease: bool, check: Callable[[int], None] | None = None
    ) -> list[CacheEntry]:
        """Pin (and count) the longest cached prefix of ``ids``; raise if it is longer than ``limit`` or
        ``check(num_tokens)`` raises (both before anything is pinned or counted)."""

        def check_all(num_tokens: int) -> None:
            if limit is not None and num_tokens > limit:
                raise out_too_short(limit, num_tokens)
            if check is not None:
                check(num_tokens)

        cached = self._index.cached_prefix(self._iter_keys(ids))
        tokens = self.chunk_tokens(len(ids))
        return self._index.pin_prefix(cached, len(ids), lease=lease, tokens=tokens, check=check_all)

    def _pull(self, ids: np.ndarray, limit: int | None) -> None:
        """Fetch the chunks that follow the local prefix of ``ids`` from the tiers into local slots (only
        chunks that fit in ``limit`` tokens: an ``out`` of that size)."""
        if self._tiers:
            total = self._pull_tokens(len(ids), limit)
            self._tiers.pull(list(self._iter_keys(ids[:total])), self.chunk_tokens(total))

    def _pull_keys(self, keys: Sequence[bytes], num_tokens: int, limit: int | None) -> None:
        """:meth:`_pull` of a prompt given by its keys."""
        if self._tiers:
            total = self._pull_tokens(num_tokens, limit)
            self._tiers.pull(keys[: -(-total // self._chunk_size)], self.chunk_tokens(total))

    def _pull_tokens(self, num_tokens: int, limit: int | None) -> int:
        """How many leading tokens of a prompt a pull fetches: all, or the whole chunks within ``limit``
        (more would make the read raise)."""
        if limit is not None and limit < num_tokens:
            return limit - limit % self._chunk_size
        return num_tokens

    def _check_keys(self, keys: Sequence[bytes], num_tokens: int) -> list[bytes]:
        return check_keys(keys, num_tokens, self._chunk_size)

    # -- tiers and lifecycle ----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued tier write was sent or dropped; False if ``timeout`` passed first.

        True at once without a tier. Never raises for a tier fault.
        """
        return self._tiers.flush(timeout)

    def close(self) -> None:
        """Stop the writers of the tiers this cache made (from a URL or a path), after writing what
        they hold queued for up to a second each; it returns promptly even when their store is gone.
        The cache keeps working locally afterwards."""
        self._tiers.close()

    def clear(self) -> int:
        """Drop every chunk that is not pinned (leased, or in use by a running call); return how many.

        Raises:
            PoolClosedError: the pool was closed; nothing is dropped.
        """
        return self._index.clear()

    def discard_keys(self, keys: Sequence[bytes]) -> list[bytes]:
        """Drop the chunks ``keys`` (each one of :meth:`keys`' results, any order) from the slots; return
        those dropped. Only unpinned leaves go (see :meth:`PrefixIndex.discard
        <lmcache.prefix_index.PrefixIndex.discard>`): for callers that keep one-chunk entries and delete
        them by key (engine adapters whose engine evicts). ``stats().cleared`` counts them. Copies in the
        disk or remote tier stay there (a later lookup may find them again).

        Raises:
            ConfigError: a key is not ``KEY_BYTES`` bytes; nothing is dropped.
            PoolClosedError: the pool was closed; nothing is dropped.
        """
        if isinstance(keys, (bytes, bytearray, str)):
            raise ConfigError("keys must be a sequence of chunk keys (cache.keys(tokens)), not one key")
        keys = list(keys)
        bad = [key for key in keys if not isinstance(key, bytes) or len(key) != KEY_BYTES]
        if bad:
            raise ConfigError(f"every key must be {KEY_BYTES} bytes (one of ChunkCache.keys), got {bad[0]!r}")
        return self._index.discard(keys)

    def __repr__(self) -> str:
        return (
            f"ChunkCache({len(self._index)} chunks, namespace={self.namespace!r}, "
            f"policy={getattr(self.policy, 'name', type(self.policy).__name__)!r}, pool={self.pool!r})"
        )


class PendingStore:
    """Slots reserved for the missing chunks of one prompt, filled by the caller, then committed: what
    :meth:`ChunkCache.begin_store` returns.

    :attr:`slots` are the missing chunks' slots in order, as handles lent to the caller: write each
    chunk's bytes into its slot (``copy_from``, or through ``data`` / ``as_torch()`` views), then
    :meth:`commit` publishes the first ``count`` (default: all), writes them behind to the cache's tiers,
    and gives the rest back. From then on the lent handles are stale (the pool never accepts them:
    the cache owns the slots). Leaving a ``with`` block without a commit (an exception, a dead
    client), or dropping the object, gives every slot back: nothing half-written is ever visible. It can
    be neither copied nor pickled.
    """

    __slots__ = ("_loan", "_tiers", "reservation")

    def __init__(self, reservation: Reservation, tiers: TierChain, *, lend: bool = False) -> None:
        #: The reservation in the prefix index.
        self.reservation = reservation
        self._tiers = tiers
        self._loan = ChunkLoan(reservation.slots, writable=True, purpose="pending store") if lend else None

    @property
    def slots(self) -> list[KVObj]:
        """The slots to fill, in chunk order (after the cached chunks, which are pinned meanwhile)."""
        return list(self._loan.handles) if self._loan is not None else self.reservation.slots

    @property
    def cached(self) -> int:
        """How many leading chunks were cached already (pinned, not copied again)."""
        return len(self.reservation.pinned)

    def commit(self, count: int | None = None) -> list[CacheEntry]:
        """Publish the first ``count`` filled slots (default: all) and return the prefix now cached.

        Raises:
            ConfigError: ``count`` is not None or an int >= 0 (nothing changes).
        """
        prefix, new = self.reservation.commit(count, hold=bool(self._tiers))
        if self._loan is not None:
            self._loan.end()
        if self._tiers:
            self._tiers.write_behind(prefix[: prefix.index(new[-1]) + 1] if new else [], new)
        return prefix

    def abort(self) -> None:
        """Give every slot back; calling it again (or after a commit) does nothing."""
        if self._loan is not None:
            self._loan.end()
        self.reservation.abort()

    def __enter__(self) -> PendingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.reservation.__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"PendingStore({self.cached} cached, {len(self.slots)} slots)"


__all__ = [
    "KEY_BYTES",
    "CacheInvariantError",
    "CacheStats",
    "ChunkCache",
    "Lease",
    "PendingStore",
    "TokensTypeError",
    "TokensValueError",
    "token_ids",
]
