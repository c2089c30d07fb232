"""The chunk cache: KV chunks of token prefixes kept in a pool, found again by prompt.

:class:`ChunkCache` owns the slots it takes from a :class:`~lmcache.storage_backend.mem_pool.LocalPool`
(numpy, torch or JAX backend, CPU or GPU). A prompt is cut into chunks of ``pool.chunk_size`` tokens;
each chunk has a key that names its whole prefix, so a cached chunk is reused only by prompts that start
with exactly the same tokens.

How it is built (and why each piece exists):

* Keys are chained ``blake2b`` digests over the namespace, the previous key and the chunk's token ids as
  little-endian int64, so they are the same in every process, on every machine, under any
  ``PYTHONHASHSEED`` and for every array type holding the same ids (Python's ``hash`` is none of these;
  LMCache issues #1139 and #2979).
* One dict maps key to entry; one ``OrderedDict`` holds the *evictable* entries (not pinned by a lease, a
  running ``store`` or a running ``retrieve``) from least to most recently used. Pins always cover a
  whole prefix (chunks ``0..k``), so an unpinned entry has no pinned descendant. A use refreshes its
  prefix tail-first, so every entry is more recent than its children; the least recent evictable entry
  is therefore a leaf, and eviction is one ``popitem``: O(1), no scan. Evicting leaves only keeps the
  cached set prefix-closed: every cached chunk's parent is cached, so ``lookup`` reaches every slot.
* The lock is held only for dict work and slot hand-out; hashing and byte copies run outside it. A chunk
  enters the dict only after its bytes are completely in its slot, so ``lookup``, ``retrieve`` and
  ``lease`` never see a half-written chunk.
* With a remote tier (``remote=``, :mod:`lmcache.remote`), ``store`` queues each newly stored chunk for
  the tier's writer, straight from its slot: the prefix up to the last new chunk stays pinned until its
  writes are sent or dropped (a whole prefix, so the ordering invariant holds). A local miss in
  ``lookup`` probes the server; in ``retrieve`` and ``lease`` it fetches the following chunks and stores
  the hits into local slots (evicting as usual) before answering.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from hashlib import blake2b
from typing import Any

import numpy as np

from lmcache.allocator import closed_error
from lmcache.arena import host_array_of
from lmcache.cache_keys import (
    KEY_BYTES,
    TokensTypeError,
    TokensValueError,
    id_bytes,
    root_key,
    token_ids,
)
from lmcache.cache_records import CacheEntry, CacheStats, Lease, ShapeOnly
from lmcache.checks import check_array, check_writable
from lmcache.errors import (
    CacheInvariantError,
    ChunkShapeError,
    ChunkTypeError,
    ConfigError,
    OverlapError,
)
from lmcache.paged import PagedRequest, check_scatter_target
from lmcache.registry import framework_of, load_adapter
from lmcache.remote import FetchStream, RedisTier
from lmcache.storage_backend.mem_pool.base_pool import KVObj
from lmcache.storage_backend.mem_pool.local_pool import LocalPool

_FRAMEWORKS = ("numpy", "torch", "jax")
_OUTPUT_ALIGNMENT = 256  # JAX aliases host memory only at 64-byte aligned addresses


class ChunkCache:
    """KV chunks of token prefixes in a pool, found again by prompt; LRU eviction of leaf chunks.

    Args:
        pool: any :class:`~lmcache.storage_backend.mem_pool.LocalPool` (numpy, torch or JAX backend, CPU
            or GPU). The cache owns the slots it allocates; slots that others allocate from the same pool
            are not the cache's, and when the pool has no free slot and the cache has nothing to evict,
            ``store`` stops.
        namespace: separates caches whose chunks must never mix (model, KV dtype, tensor-parallel rank):
            it seeds every key.
        remote: a remote tier to write through to and read through from: a URL
            (``"redis://host:port/db"``, ``"rediss://..."``) for a :class:`~lmcache.remote.RedisTier`
            with default options, or a tier object built with options (key prefix, TTL, timeouts, queue
            size). A tier made from a URL is closed by :meth:`close`; a tier object stays its creator's
            to close. Remote faults never raise: they are counted in ``stats()``.

    Invariants (checked by the test-suite's state machine):

    * The cached set is prefix-closed: every cached chunk's parent is cached.
    * An entry is pinned (not evictable) while a lease, a running ``store`` or a running ``retrieve``
      covers it; pins cover whole prefixes.
    * Among evictable entries, every entry is more recent than its children, so the least recent one is a
      leaf: eviction never scans.

    Thread-safe. Every method costs O(1) dict work per chunk plus hashing and copying.

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
        self, pool: LocalPool, *, namespace: str = "", remote: str | RedisTier | None = None
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
        #: The pool the chunks live in.
        self.pool = pool
        #: The string every key is seeded with.
        self.namespace = namespace
        self._root = root_key(namespace)
        self._layout = pool.layout
        self._chunk_size = pool.chunk_size
        self._host = pool.device == "cpu"
        self._lock = threading.Lock()
        self._entries: dict[bytes, CacheEntry] = {}
        # Evictable entries (pins == 0), least recently used first; see the class docstring.
        self._lru: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._like = [
            ShapeOnly(self._layout.view_shape(n), self._layout.dtype.numpy_dtype)
            for n in range(self._chunk_size + 1)
        ]
        self._leased = 0
        self._stored = 0
        self._evicted = 0
        self._cleared = 0
        self._hit_tokens = 0
        self._query_tokens = 0
        #: The remote tier, or None.
        self.remote = RedisTier(remote) if isinstance(remote, str) else remote
        self._owns_remote = isinstance(remote, str)

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

    def _iter_keys(self, ids: np.ndarray) -> Iterator[bytes]:
        """Yield the chunk keys of ``ids`` lazily (a miss stops the caller early, sparing the hashing)."""
        data = id_bytes(ids)
        step = self._chunk_size * 8
        key = self._root
        for offset in range(0, len(data), step):
            key = blake2b(data[offset : offset + step], digest_size=KEY_BYTES, key=key).digest()
            yield key

    def _cached_keys(self, ids: np.ndarray) -> list[bytes]:
        """Return the keys of the longest prefix cached now.

        Read without the lock: dict reads are atomic, and an entry is in the dict only once its bytes are
        in its slot. Hashes lazily, so a miss costs one chunk's hash (the loop is ``_iter_keys`` inlined:
        this is ``lookup``'s whole cost).
        """
        data = id_bytes(ids)
        step = self._chunk_size * 8
        entries = self._entries
        key = self._root
        found = []
        for offset in range(0, len(data), step):
            key = blake2b(data[offset : offset + step], digest_size=KEY_BYTES, key=key).digest()
            if key not in entries:
                break
            found.append(key)
        return found

    # -- queries -------------------------------------------------------------------------------------
    def lookup(self, tokens: Any) -> int:
        """Return how many leading tokens of ``tokens`` are covered by cached chunks.

        A pure query: contents and recency are unchanged (``hit_tokens`` and ``query_tokens`` count it).
        """
        ids = token_ids(tokens)
        cached = self._cached_keys(ids)
        hit = min(len(cached) * self._chunk_size, len(ids))
        if self.remote is not None and hit < len(ids):  # one round trip for the chunks that follow
            keys = list(self._iter_keys(ids))[len(cached) :]
            shapes = self._shapes(ids, len(cached), len(keys))
            found = self.remote.probe(self._remote_keys(keys), self._layout.dtype.name, shapes)
            run = found.index(False) if False in found else len(found)
            hit = min((len(cached) + run) * self._chunk_size, len(ids))
        with self._lock:
            self._hit_tokens += hit
            self._query_tokens += len(ids)
        return hit

    def stats(self) -> CacheStats:
        """Return a consistent snapshot of the counters (see :class:`CacheStats`)."""
        remote = {}
        if self.remote is not None:
            tier = self.remote.stats()
            remote = {
                "remote_hits": tier.hits,
                "remote_writes": tier.writes,
                "remote_errors": tier.errors,
                "remote_dropped": tier.dropped,
                "remote_corrupt": tier.corrupt,
            }
        with self._lock:
            return CacheStats(
                **remote,
                chunks=len(self._entries),
                leased=self._leased,
                pinned=len(self._entries) - len(self._lru),
                stored=self._stored,
                evicted=self._evicted,
                cleared=self._cleared,
                hit_tokens=self._hit_tokens,
                query_tokens=self._query_tokens,
            )

    def __len__(self) -> int:
        """Chunks cached now."""
        return len(self._entries)

    # -- store ---------------------------------------------------------------------------------------
    def store(self, tokens: Any, kv: Any) -> int:
        """Store the KV of ``tokens`` chunk by chunk; return the tokens cached afterwards (as ``lookup``).

        Args:
            tokens: the prompt's token ids (see :func:`token_ids`).
            kv: ``(L, 2, len(tokens), H, D)`` (``1`` in place of ``2`` for MLA pools) of the pool's
                dtype, from numpy, torch or JAX, on any device.

        Chunks already cached are not copied again; their recency is refreshed. Each missing chunk takes
        a slot (evicting the least recently used leaf when the pool is full) and is copied in. The store
        stops at the first chunk that gets no slot (nothing evictable): it never raises for a full pool.

        Raises:
            TokensTypeError, TokensValueError: bad tokens.
            ChunkShapeError, ChunkTypeError: ``kv`` is not an array of the right shape and dtype.
            Nothing is stored when any of these is raised.
        """
        ids = token_ids(tokens)
        source = self._check_kv(kv, len(ids))
        size = self._chunk_size
        return self._insert(
            list(self._iter_keys(ids)),
            len(ids),
            lambda i: partial(self._fill_from, source[:, :, i * size : (i + 1) * size]),
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
        request = PagedRequest(kv_caches, block_ids, layout, self._layout, host=self._host)
        request.check_table(len(ids))
        size, total = self._chunk_size, len(ids)

        def fill(start: int, obj: KVObj) -> bool:
            request.gather_into_slot(obj, start, obj.num_tokens, total)
            return True

        return self._insert(list(self._iter_keys(ids)), total, lambda i: partial(fill, i * size))

    def load_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> Any:
        """Copy the longest cached prefix of ``tokens`` into the request's blocks of a paged KV cache.

        Only the positions of the ``n`` loaded tokens are written: the rest of the last block and every
        other block keep their bytes. Arguments as :meth:`store_paged`; the block table needs only
        ``ceil(n / block_size)`` ids. With a remote tier, chunks are first fetched as for :meth:`retrieve`
        (only as many as the table's blocks can take).

        Returns:
            torch: ``n``, the tokens loaded (the cache is written in place). JAX: ``(new_kv_caches, n)``;
            the scatter donates the arrays passed in, so use the returned ones (on a miss, ``n == 0`` and
            ``kv_caches`` itself is returned).

        Raises:
            TokensTypeError, TokensValueError: bad tokens.
            ConfigError, ChunkTypeError, ChunkShapeError: as :meth:`store_paged`, raised before anything is
                read or written, with the cache and its statistics unchanged.
        """
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self._layout, host=self._host)
        check_scatter_target(kv_caches, request.spec, self.pool.overlaps)
        self._pull(ids, request.coverable_tokens(len(ids)))
        chain = self._pin_prefix(ids, None, lease=False, check=request.check_table)
        try:
            num_tokens = sum(entry.num_tokens for entry in chain)
            if not chain:
                return 0 if request.spec.framework == "torch" else (kv_caches, 0)
            result = request.scatter_chunks(
                [(start, entry.obj) for start, entry in self._spans(chain)], num_tokens
            )
        finally:
            with self._lock:
                self._unpin(chain)
        return result if request.spec.framework == "torch" else (result, num_tokens)

    def _insert(
        self,
        keys: list[bytes],
        total: int,
        filler: Callable[[int], Callable[[KVObj], bool] | None],
        *,
        write_through: bool = True,
    ) -> int:
        """Cache the chunks of ``keys`` (``total`` tokens); return the tokens cached afterwards.

        For each missing chunk ``index``, ``filler(index)`` (called without the lock) gives a function
        that writes the chunk into a slot and says whether it did, or None when there are no bytes for
        it. It stops at the first chunk without bytes, without a slot, or whose fill fails. New chunks
        are queued for the remote tier when ``write_through`` (not when they came from it).
        """
        chunk_size = self._chunk_size
        chain: list[CacheEntry] = []
        new: list[CacheEntry] = []
        hold: list[CacheEntry] = []
        lock, entries = self._lock, self._entries
        pool_full = False
        try:
            for index, key in enumerate(keys):
                start = index * chunk_size
                num_tokens = min(chunk_size, total - start)
                with lock:
                    entry = entries.get(key)
                    if entry is not None:  # cached already: pin it (refreshed at the end)
                        self._pin(entry)
                        chain.append(entry)
                        continue
                fill = filler(index)  # may read from the network: not under the lock
                if fill is None:
                    break
                with lock:
                    obj, pool_full = self._take_slot(num_tokens, pool_full)
                if obj is None:
                    break  # nothing left to evict
                try:
                    filled = fill(obj)
                except BaseException:
                    with lock:
                        self.pool.free(obj)
                    raise
                if not filled:
                    with lock:
                        self.pool.free(obj)
                    break
                with lock:
                    entry = entries.get(key)
                    if entry is not None:  # another thread stored the same chunk meanwhile
                        self.pool.free(obj)
                        self._pin(entry)
                        chain.append(entry)
                    else:
                        entry = CacheEntry(key, obj, chain[-1] if chain else None, num_tokens)
                        entry.pins = 1
                        if entry.parent is not None:
                            entry.parent.children += 1
                        new.append(entry)
                        chain.append(entry)  # in the chain (so unpinned) before it is published
                        entries[key] = entry
                        self._stored += 1
        finally:
            with lock:
                if new and write_through and self.remote is not None:
                    hold = chain[: chain.index(new[-1]) + 1]  # pinned as a whole prefix until sent
                    for entry in hold:
                        self._pin(entry)
                self._unpin(chain)
            if hold:
                self._write_through(hold, new)
        return sum(entry.num_tokens for entry in chain)

    def _check_kv(self, kv: Any, num_tokens: int) -> Any:
        """Check ``kv`` against the layout and return what to slice chunks from (numpy for host copies
        of JAX or generic DLPack sources)."""
        layout = self._layout
        shape = getattr(kv, "shape", None)
        if shape is not None and len(shape) == 5 and shape[2] != num_tokens:
            raise ChunkShapeError(
                f"kv has {shape[2]} tokens (dim 2 of shape {tuple(shape)}) but tokens has {num_tokens}; "
                "pass the KV of exactly these tokens"
            )
        framework = check_array(kv, layout.view_shape(num_tokens), layout, "kv")
        if framework == "torch" and self._host:
            # Host copies go through numpy: one copy loop for every framework, single-threaded, so the
            # bandwidth does not depend on torch's thread pool (which slows down on a busy machine).
            return host_array_of(kv, framework) if kv.device.type == "cpu" else kv
        if framework == "jax" and self._host:
            return host_array_of(kv, framework)  # JAX on the CPU: a view, not a copy
        return kv

    def _take_slot(self, num_tokens: int, pool_full: bool) -> tuple[KVObj | None, bool]:
        """Get a slot, evicting least recently used leaves until one is free (under the lock).

        ``pool_full`` says the pool had no free slot for this store's previous chunk: then eviction
        comes first, sparing a failed ``allocate`` per chunk (a slot freed meanwhile by someone else is
        still found once nothing is evictable). Returns the slot (None when the pool is full and nothing
        is evictable) and whether the pool was found full.
        """
        like = self._like[num_tokens]
        obj = None if pool_full else self.pool.allocate(like)
        while obj is None:
            if not self._lru:
                if not pool_full:
                    return None, True
                pool_full = False  # look once more for a slot freed by someone else
                obj = self.pool.allocate(like)
                continue
            pool_full = True
            victim = self._drop_front()
            self._evicted += 1
            # The slot gets a new generation either way, so a KVObj kept from a released lease goes
            # stale instead of reading the next chunk: reissued in one step for the same length.
            if victim.num_tokens == num_tokens:
                return self.pool.reissue(victim.obj), True
            self.pool.free(victim.obj)
            obj = self.pool.allocate(like)
        return obj, pool_full

    def _copy_in(self, obj: KVObj, piece: Any) -> None:
        if self._host and isinstance(piece, np.ndarray):
            np.copyto(obj.as_numpy(), piece, casting="no")
        else:
            obj.copy_from(piece)

    def _fill_from(self, piece: Any, obj: KVObj) -> bool:
        self._copy_in(obj, piece)
        return True

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
            ConfigError: ``framework`` is not a backend name, or differs from ``out``'s.
        """
        ids = token_ids(tokens)
        limit = self._check_out(out, framework) if out is not None else None
        if out is None:
            framework = self._check_framework(framework)
        self._pull(ids, limit)
        chain = self._pin_prefix(ids, limit, lease=False)
        try:
            num_tokens = sum(entry.num_tokens for entry in chain)
            if not chain:
                return None, 0
            if out is not None:
                result = out
                host = (
                    None
                    if isinstance(out, np.ndarray) or out.device.type != "cpu"
                    else host_array_of(out, "torch")
                )
                if self._host and host is not None:  # a CPU tensor: write through numpy
                    out = host
                for start, entry in self._spans(chain):
                    self._copy_out(entry.obj, out[:, :, start : start + entry.num_tokens])
            else:
                result = self._gather(chain, num_tokens, framework)  # type: ignore[arg-type]
        finally:
            with self._lock:
                self._unpin(chain)
        return result, num_tokens

    def lease(self, tokens: Any) -> Lease:
        """Pin the chunks of the longest cached prefix of ``tokens`` and return them as a :class:`Lease`.

        Use it as a context manager, or call ``release()``. A miss gives an empty lease.
        """
        ids = token_ids(tokens)
        self._pull(ids, None)
        return Lease(self._pin_prefix(ids, None, lease=True), self._release_chain)

    def _pin_prefix(
        self, ids: np.ndarray, limit: int | None, *, lease: bool, check: Callable[[int], None] | None = None
    ) -> list[CacheEntry]:
        """Pin (and count) the longest cached prefix of ``ids``; raise if it is longer than ``limit`` or
        ``check(num_tokens)`` raises (both before anything is pinned or counted)."""
        candidates = self._cached_keys(ids)
        chain: list[CacheEntry] = []
        with self._lock:
            entries = self._entries
            for key in candidates:  # the prefix may have shrunk since the unlocked walk
                entry = entries.get(key)
                if entry is None:
                    break
                chain.append(entry)
            num_tokens = sum(entry.num_tokens for entry in chain)
            if limit is not None and num_tokens > limit:
                raise ChunkShapeError(
                    f"out holds {limit} tokens (dim 2) but {num_tokens} cached tokens match; pass an out "
                    f"with at least {num_tokens} tokens"
                )
            if check is not None:
                check(num_tokens)
            for entry in chain:
                self._pin(entry)
                if lease:
                    if entry.leases == 0:
                        self._leased += 1
                    entry.leases += 1
            self._hit_tokens += num_tokens
            self._query_tokens += len(ids)
        return chain

    def _release_chain(self, chain: list[CacheEntry]) -> None:
        """Take back one lease of each chunk of ``chain`` (a :class:`Lease` calls this once)."""
        with self._lock:
            if any(entry.leases < 1 or entry.pins < 1 for entry in chain):
                raise CacheInvariantError("a lease was released more often than taken; nothing was unpinned")
            for entry in chain:
                entry.leases -= 1
                if entry.leases == 0:
                    self._leased -= 1
            self._unpin(chain)

    def _check_framework(self, framework: str | None) -> str:
        if framework is None:
            return self.pool.backend
        if framework not in _FRAMEWORKS:
            raise ConfigError(f"framework must be one of {', '.join(_FRAMEWORKS)}, got {framework!r}")
        if framework != "numpy":
            load_adapter(framework)  # a missing framework raises here, before anything is pinned
        return framework

    def _check_out(self, out: Any, framework: str | None) -> int:
        """Check ``out`` (all but its token count, which depends on the hit) and return its tokens."""
        kind = framework_of(out)
        if kind not in ("numpy", "torch"):
            raise ChunkTypeError(
                f"out must be a writable numpy array or torch tensor, got a {type(out).__name__}; JAX "
                "arrays are immutable: use framework='jax' to get a new one"
            )
        if framework is not None and framework != kind:
            raise ConfigError(f"out is a {kind} array but framework={framework!r}; pass one or the other")
        shape = tuple(out.shape)
        if len(shape) != 5:
            raise ChunkShapeError(f"out must have 5 dims (L, 2, T, H, D), got shape {shape}")
        check_array(out, self._layout.view_shape(shape[2]), self._layout, "out")
        if kind == "numpy" and not out.flags.writeable:
            raise ChunkTypeError("out is a read-only numpy array; pass a writable one")
        if kind == "torch" and out.requires_grad:
            raise ChunkTypeError("out requires grad; pass a tensor that does not (or out.detach())")
        check_writable(out, kind, "out")
        if self.pool.overlaps(out):
            raise OverlapError(
                "out overlaps the cache's pool (a view of its arena or of a chunk): retrieving into it would "
                "overwrite cached chunks; pass an array with memory of its own"
            )
        return int(shape[2])

    def _spans(self, chain: list[CacheEntry]) -> Iterator[tuple[int, CacheEntry]]:
        start = 0
        for entry in chain:
            yield start, entry
            start += entry.num_tokens

    def _copy_out(self, obj: KVObj, dst: Any) -> None:
        if isinstance(dst, np.ndarray):
            if self._host:
                np.copyto(dst, obj.as_numpy(), casting="no")
                return
            if not dst.flags.c_contiguous:  # device arenas copy into contiguous host memory only
                np.copyto(dst, obj.clone("numpy"), casting="no")
                return
        obj.copy_to(dst)

    def _gather(self, chain: list[CacheEntry], num_tokens: int, framework: str) -> Any:
        """Copy the chain into a new contiguous array of ``framework`` (host or the pool's device)."""
        layout = self._layout
        shape = layout.view_shape(num_tokens)
        if not self._host and framework != "numpy":
            views = [getattr(entry.obj, f"as_{framework}")() for entry in chain]
            # Done on return: the slots are unpinned then.
            return load_adapter(framework).concat_tokens(views)
        spec = layout.dtype
        nbytes = layout.num_elems(num_tokens) * spec.itemsize
        raw = np.empty(nbytes + _OUTPUT_ALIGNMENT, dtype=np.uint8)
        start = (-raw.ctypes.data) % _OUTPUT_ALIGNMENT
        bits = raw[start : start + nbytes].view(spec.bits_dtype).reshape(shape)
        typed = bits.view(spec.numpy_dtype)
        for offset, entry in self._spans(chain):
            self._copy_out(entry.obj, typed[:, :, offset : offset + entry.num_tokens])
        if framework == "numpy":
            return typed
        return load_adapter(framework).from_host(bits, spec)

    # -- the remote tier ------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued remote write was sent or dropped; False if ``timeout`` passed first.

        True at once without a remote tier. Never raises for a remote fault.
        """
        return True if self.remote is None else self.remote.flush(timeout)

    def close(self) -> None:
        """Stop the remote tier's writer if this cache made the tier (from a URL); it returns promptly
        even when the server is gone. The cache keeps working locally afterwards."""
        if self.remote is not None and self._owns_remote:
            self.remote.close()

    def _remote_keys(self, keys: list[bytes]) -> list[bytes]:
        tier = self.remote
        return [] if tier is None else [tier.key(self.namespace, key) for key in keys]

    def _shapes(self, ids: np.ndarray, first: int, count: int) -> list[tuple[int, int, int, int, int]]:
        """The view shapes of chunks ``first .. first + count - 1`` of ``ids``."""
        size, total = self._chunk_size, len(ids)
        return [self._layout.view_shape(min(size, total - i * size)) for i in range(first, first + count)]

    def _write_through(self, hold: list[CacheEntry], new: list[CacheEntry]) -> None:
        """Queue ``new`` for the remote writer; unpin ``hold`` (their prefix) once all are sent or dropped.

        Called without the lock: the tier may call ``on_done`` at once (a full queue drops a write).
        """
        tier = self.remote
        if tier is None:
            return
        left = [len(new)]

        def on_done(sent: bool) -> None:
            with self._lock:
                left[0] -= 1
                if left[0] == 0:
                    self._unpin(hold)

        dtype = self._layout.dtype.name
        submitted = 0
        try:
            for entry in new:
                obj = entry.obj
                payload = obj.as_numpy() if self._host else obj.clone("numpy")  # device slots: a host copy
                tier.submit(tier.key(self.namespace, entry.key), payload, dtype, payload.shape, on_done)
                submitted += 1
        finally:
            for _ in range(len(new) - submitted):  # never submitted (an error mid-loop): not pending
                on_done(False)

    def _pull(self, ids: np.ndarray, limit: int | None) -> None:
        """Fetch the chunks that follow the local prefix of ``ids`` from the remote tier into local slots.

        Each batch of up to the tier's ``batch_bytes`` is one pipelined round trip whose payloads are read
        from the socket straight into the new slots. It stops at the first miss or rejected value, at
        ``limit`` tokens (an ``out`` of that size), or when no slot can be had.
        """
        tier = self.remote
        if tier is None:
            return
        local = len(self._cached_keys(ids))
        size, total = self._chunk_size, len(ids)
        if limit is not None and limit < total:
            total = limit - limit % size  # only chunks that fit in ``out``: more would make retrieve raise
        keys = list(self._iter_keys(ids[:total]))
        per_batch = max(1, tier.batch_bytes // self._layout.chunk_bytes)
        start = local
        while start < len(keys):
            end = min(len(keys), start + per_batch)
            shapes = self._shapes(ids[:total], start, end - start)
            with tier.stream(self._remote_keys(keys[start:end]), self._layout.dtype.name, shapes) as stream:

                def filler(index: int, stream: FetchStream = stream, first: int = start) -> Any:
                    if index < first or not stream.hit(index - first):
                        return None  # a local chunk evicted meanwhile, or not on the server
                    return partial(self._fill_remote, stream)

                wanted = min(total, end * size)
                if self._insert(keys[:end], wanted, filler, write_through=False) < wanted:
                    return
            start = end

    def _fill_remote(self, stream: FetchStream, obj: KVObj) -> bool:
        """Read a chunk from ``stream`` into ``obj``'s slot (a host copy first for device pools)."""
        if self._host:
            return stream.read_into(obj.as_numpy())
        spec = self._layout.dtype
        host = np.empty(self._layout.view_shape(obj.num_tokens), dtype=spec.numpy_dtype)
        if not stream.read_into(host):
            return False
        obj.copy_from(host)
        return True

    # -- eviction ------------------------------------------------------------------------------------
    def clear(self) -> int:
        """Drop every chunk that is not pinned (leased, or in use by a running call); return how many."""
        if self.pool.closed:  # every free would raise: refuse before anything is dropped
            raise closed_error()
        with self._lock:
            count = 0
            while self._lru:
                self.pool.free(self._drop_front().obj)
                count += 1
            self._cleared += count
        return count

    def _pin(self, entry: CacheEntry) -> None:
        """Pin ``entry`` (under the lock): it leaves the recency list while pinned."""
        if entry.pins == 0:
            del self._lru[entry.key]
        entry.pins += 1

    def _unpin(self, chain: list[CacheEntry]) -> None:
        """Unpin a prefix tail-first (under the lock): entries whose last pin goes become the most
        recent, each parent after its children."""
        lru = self._lru
        for entry in reversed(chain):
            entry.pins -= 1
            if entry.pins == 0:
                lru[entry.key] = entry

    def _drop_front(self) -> CacheEntry:
        """Remove the least recently used evictable entry, a leaf by the ordering invariant, and return
        it; its slot is the caller's to free or reuse (under the lock)."""
        key, entry = self._lru.popitem(last=False)
        if entry.children:
            self._lru[key] = entry
            self._lru.move_to_end(key, last=False)
            raise CacheInvariantError(
                f"the least recently used chunk has {entry.children} cached children; eviction refused"
            )
        del self._entries[key]
        if entry.parent is not None:
            entry.parent.children -= 1
        return entry

    def __repr__(self) -> str:
        return f"ChunkCache({len(self._entries)} chunks, namespace={self.namespace!r}, pool={self.pool!r})"


__all__ = [
    "KEY_BYTES",
    "CacheInvariantError",
    "CacheStats",
    "ChunkCache",
    "Lease",
    "TokensTypeError",
    "TokensValueError",
    "token_ids",
]
