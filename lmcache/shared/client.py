"""The shared cache's client: :class:`SharedChunkCache`, the :class:`~lmcache.chunk_cache.ChunkCache` API
over a cache server's shared memory.

The client hashes prompts itself (:func:`~lmcache.cache_keys.chunk_keys`: the same keys as an in-process
cache of the same namespace), asks the server for slots and pins in small messages, and moves the bytes
itself, through its own mapping of the server's arena, with the same checks and copies as the in-process
cache (:class:`~lmcache.cache_copies.ChunkCopies`, :class:`~lmcache.paged.PagedRequest`).

A store is two round trips (reserve the missing chunks' slots; commit once the bytes are in), one when
every chunk is cached already; a lookup and a lease are one; a retrieve is one plus a release that needs
no reply.

Faults of the server never raise: a call that cannot be served in ``timeout`` answers as a miss
(``lookup`` 0, ``store`` 0, ``retrieve`` ``(None, 0)``, an empty lease, ``clear`` 0), counts in
``stats().errors``, and the client tries the server again after a capped backoff, picking up a restarted
server on the same path. Bad arguments raise as they do in-process, server or not.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache import forksafe
from lmcache.cache_copies import ChunkCopies, out_too_short, spans
from lmcache.cache_keys import check_keys, chunk_keys, chunk_tokens, root_key, token_ids
from lmcache.cache_records import CacheEntry, CacheStats, Lease
from lmcache.errors import (
    CacheInvariantError,
    ConfigError,
    MemPoolError,
    NotPicklableError,
    ProtocolError,
    ServerUnavailableError,
)
from lmcache.paged import PagedRequest, check_scatter_target
from lmcache.shared import access, protocol
from lmcache.shared.link import Link
from lmcache.shared.protocol import NO_LIMIT, Op, Reply
from lmcache.storage_backend.mem_pool.base_pool import KVObj

logger = logging.getLogger("lmcache.shared")


@dataclass(frozen=True)
class SharedCacheStats(CacheStats):
    """The server's counters (every client's, as :class:`~lmcache.chunk_cache.CacheStats`; zero while
    the server is unreachable) and this client's own.

    Attributes:
        errors: calls of this client the server did not serve (down, too slow, refusing); each
            answered as a miss.
        reconnects: connections this client opened after its first (a restarted server, a lost
            connection).
        connected: whether the last call reached the server.
    """

    errors: int = 0
    reconnects: int = 0
    connected: bool = False


class _TooLongError(Exception):
    """The server found more cached tokens than a pin's limit (nothing was pinned)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__(num_tokens)
        self.num_tokens = num_tokens


class _Backoff:
    """When to try the server again after a failure: waits double from ``initial`` up to ``cap``."""

    def __init__(self, initial: float, cap: float) -> None:
        self._initial, self._cap = initial, cap
        self._delay = 0.0
        self._until = 0.0

    def waiting(self) -> bool:
        return time.monotonic() < self._until

    def failed(self) -> None:
        self._delay = min(self._cap, max(self._initial, self._delay * 2))
        self._until = time.monotonic() + self._delay

    def succeeded(self) -> None:
        self._delay = self._until = 0.0


class _Hold:
    """Slots the server granted this client on one link: a lease's or a pin's chunks, or a reservation's
    slots. Ended once, by :meth:`end`."""

    def __init__(self, cache: SharedChunkCache, link: Link | None, ident: int, handles: list[KVObj]) -> None:
        self._cache = cache
        self.link = link
        self.ident = ident
        self.handles = handles
        self.num_tokens = sum(obj.num_tokens for obj in handles)

    def detach(self) -> Link | None:
        """Drop the handles; return the link they were granted on if it still stands (else None)."""
        link, self.link = self.link, None
        if link is None:
            return None
        link.slots.drop(self.handles)
        return None if link.closed else link

    def end(self, op: Op) -> None:
        """Drop the handles and tell the server (``op``: RELEASE or ABORT), if the link still stands."""
        link = self.detach()
        if link is not None and self.ident:
            self._cache._tell(link, op, protocol.id_body(self.ident))


class SharedPendingStore:
    """Slots reserved on the server for the missing chunks of one prompt: what
    :meth:`SharedChunkCache.begin_store` returns (as :meth:`~lmcache.chunk_cache.ChunkCache.begin_store`).

    Fill each of :attr:`slots` (KVObj handles over the mapping), then :meth:`commit`. A ``with`` block
    left without a commit aborts: nothing half-written is ever visible, and a client that dies holding
    one loses it the same way.
    """

    def __init__(self, cache: SharedChunkCache, hold: _Hold | None, cached: int, tokens: int = 0) -> None:
        self._cache = cache
        self._hold = hold
        #: How many leading chunks were cached already.
        self.cached = cached
        self._tokens = tokens  # the answer, when the server committed at once (nothing to fill)

    @property
    def slots(self) -> list[KVObj]:
        """The slots to fill, in chunk order (empty once committed or aborted)."""
        return list(self._hold.handles) if self._hold is not None else []

    def commit(self, count: int | None = None) -> int:
        """Publish the first ``count`` filled slots (default: all); return the tokens cached now (0 if
        the server could not be reached)."""
        hold, self._hold = self._hold, None
        if hold is None:
            tokens, self._tokens = self._tokens, 0
            return tokens
        keep = len(hold.handles) if count is None else max(0, min(count, len(hold.handles)))
        link = hold.detach()
        if link is None:
            return 0
        return self._cache._commit(link, hold.ident, keep)

    def abort(self) -> None:
        """Give every slot back; calling it again (or after a commit) does nothing."""
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.end(Op.ABORT)

    def fill(self, filler: Callable[[int], Callable[[KVObj], object]]) -> int:
        """Fill every slot with ``filler(chunk_index)(slot)``, then commit; return the tokens cached.

        When a fill raises, the slots filled before it are committed and the error goes on (as in
        :meth:`~lmcache.chunk_cache.ChunkCache.store`). A connection lost meanwhile answers 0.
        """
        hold = self._hold
        if hold is None or hold.link is None:
            return self.commit()
        filled = 0
        try:
            with hold.link.in_use() as usable:
                if not usable:
                    self.abort()
                    return 0
                for index, obj in enumerate(hold.handles, self.cached):
                    filler(index)(obj)
                    filled += 1
        except BaseException:
            self.commit(filled)
            raise
        return self.commit()

    def __enter__(self) -> SharedPendingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(
            "a pending store holds slots on the server; it can be neither copied nor pickled"
        )

    def __repr__(self) -> str:
        return f"SharedPendingStore({self.cached} cached, {len(self.slots)} slots)"


Parse = Callable[[Link, int, bytes], Any]


class SharedChunkCache:
    """The :class:`~lmcache.chunk_cache.ChunkCache` API over a cache server's shared memory.

    Build it with :func:`lmcache.shared.connect`. Processes of any framework (numpy, torch, JAX) share
    one server: chunks stored by one are found, leased and retrieved by every other whose namespace
    matches. Thread-safe; copies run outside the client's lock.

    Args:
        socket_path: the server's socket.
        backend: the framework of this client's views (``lease.chunks[i].data``, :attr:`arena`, the
            default of ``retrieve``): ``"numpy"``, ``"torch"`` or ``"jax"``; default
            ``$LMCACHE_BACKEND``, else numpy.
        namespace: seeds every key, as for ``ChunkCache``: caches of different models, dtypes or
            tensor-parallel ranks on one server must differ in it (they share its capacity).
        timeout: seconds a call waits for the server before it answers as a miss.
        pin_memory: page-lock this client's mapping (torch with CUDA: ``cudaHostRegister`` of exactly
            the arena's bytes); None: when the backend sees a GPU (torch), never (JAX cannot pin memory
            it did not allocate; ``jax.device_put`` moves chunks).
        server_uid: the user the server must run as (default: this process's user, or root).
        backoff_max: the longest wait between two attempts to reach a server that failed.

    Raises:
        ServerUnavailableError: no server answered at ``socket_path`` (the first connection must
            succeed: it tells the client the chunk layout). Later failures never raise.
        ConfigError: a bad argument.
        BackendUnavailableError: ``backend``'s framework is not installed.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        backend: str | None = None,
        namespace: str = "",
        timeout: float = 5.0,
        pin_memory: bool | None = None,
        server_uid: int | None = None,
        backoff_max: float = 1.0,
    ) -> None:
        path = access.socket_path(socket_path)
        if not isinstance(namespace, str):
            raise ConfigError(f"namespace must be a str, got {type(namespace).__name__}")
        for name, value in (("timeout", timeout), ("backoff_max", backoff_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise ConfigError(f"pin_memory must be True, False or None, got {pin_memory!r}")
        #: The server's socket.
        self.socket_path = path
        #: The string every key is seeded with.
        self.namespace = namespace
        #: Seconds a call waits for the server.
        self.timeout = float(timeout)
        self._options = {"backend": backend, "pin_memory": pin_memory, "server_uid": server_uid}
        self._root = root_key(namespace)
        self._lock = threading.RLock()
        self._backoff = _Backoff(min(0.05, backoff_max), float(backoff_max))
        self._errors = self._reconnects = 0
        self._connected = self._closed = False
        self._leases: dict[_Hold, Lease] = {}
        try:
            link = self._open()
        except (OSError, ProtocolError) as exc:
            raise ServerUnavailableError(
                f"no lmcache cache server answered at {path} ({exc}); start one with: python -m lmcache "
                f"serve --socket {path} --kv-shape L,2,T,H,D --dtype NAME --size-gib N"
            ) from exc
        welcome = link.welcome
        self._geometry = (welcome.kv_shape, welcome.dtype, welcome.slot_alignment)
        self._link: Link | None = None
        self._install(link)
        self._reconnects = 0
        #: The server's slot layout (chunk shape, dtype, stride).
        self.layout = link.slots.layout
        #: Tokens in a full chunk.
        self.chunk_size = self.layout.chunk_size
        #: The framework of this client's views.
        self.backend = link.slots.backend
        forksafe.register(self)

    # -- keys -------------------------------------------------------------------------------------------
    def keys(self, tokens: Any) -> list[bytes]:
        """The key of each chunk of ``tokens``: the same as ``ChunkCache.keys`` of the same namespace."""
        return list(chunk_keys(token_ids(tokens), self.chunk_size, self._root))

    def chunk_tokens(self, num_tokens: int) -> list[int]:
        """The token count of each chunk of a prompt of ``num_tokens`` tokens (the last may be partial)."""
        return chunk_tokens(num_tokens, self.chunk_size)

    # -- queries ----------------------------------------------------------------------------------------
    def lookup(self, tokens: Any) -> int:
        """How many leading tokens of ``tokens`` are cached on the server (one round trip); 0 when it
        cannot be reached."""
        ids = token_ids(tokens)
        return self._lookup(self.keys(ids), len(ids))

    def lookup_keys(self, keys: Sequence[bytes], num_tokens: int) -> int:
        """:meth:`lookup` of a prompt given by its chunk keys."""
        check_keys(keys, num_tokens, self.chunk_size)
        return self._lookup(list(keys), num_tokens)

    def _lookup(self, keys: list[bytes], num_tokens: int) -> int:
        hit = self._call(Op.LOOKUP, protocol.prompt_body(num_tokens, keys), _count_within(num_tokens))
        return 0 if hit is None else int(hit)

    def stats(self) -> SharedCacheStats:
        """The server's counters (zero when it cannot be reached) and this client's own."""
        fields = self._call(Op.STATS, b"", _stats)
        if fields is None:
            fields = dict.fromkeys(CacheStats.__dataclass_fields__, 0)
        with self._lock:
            return SharedCacheStats(
                **fields, errors=self._errors, reconnects=self._reconnects, connected=self._connected
            )

    def __len__(self) -> int:
        """Chunks cached on the server now (0 when it cannot be reached)."""
        return self.stats().chunks

    # -- store ------------------------------------------------------------------------------------------
    def store(self, tokens: Any, kv: Any) -> int:
        """Store the KV of ``tokens`` (as ``ChunkCache.store``); return the tokens cached afterwards (0
        when the server cannot be reached).

        Raises:
            TokensTypeError, TokensValueError, ChunkShapeError, ChunkTypeError: as ``ChunkCache.store``,
                before anything is sent.
        """
        ids = token_ids(tokens)
        copies, size = self._copies, self.chunk_size
        source = copies.check_kv(kv, len(ids))
        pending = self._begin(self.keys(ids), len(ids))
        return pending.fill(lambda index: copies.filler(source, index * size))

    def store_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> int:
        """Store the KV of ``tokens`` from a paged KV cache (as ``ChunkCache.store_paged``)."""
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self.layout, host=True)
        request.check_table(len(ids))
        size, total = self.chunk_size, len(ids)

        def filler(index: int) -> Callable[[KVObj], None]:
            return lambda obj: request.gather_into_slot(obj, index * size, obj.num_tokens, total)

        return self._begin(self.keys(ids), total).fill(filler)

    def begin_store(self, keys: Sequence[bytes], num_tokens: int) -> SharedPendingStore:
        """Reserve slots for the missing chunks of a prompt given by its keys, for a caller that copies
        the bytes itself (as ``ChunkCache.begin_store``; its ``commit`` returns the tokens cached)."""
        check_keys(keys, num_tokens, self.chunk_size)
        return self._begin(list(keys), num_tokens)

    def _begin(self, keys: list[bytes], num_tokens: int) -> SharedPendingStore:
        tokens = self.chunk_tokens(num_tokens)

        def reserved(link: Link, reply: int, body: bytes) -> SharedPendingStore:
            if reply == Reply.COUNT:  # nothing to fill (all cached, or no slot): committed already
                cached_tokens = _count_within(num_tokens)(link, reply, body)
                return SharedPendingStore(self, None, -(-cached_tokens // self.chunk_size), cached_tokens)
            if reply != Reply.RESERVED:
                raise ProtocolError(f"a reservation answered with opcode {reply}")
            ident, cached, slots = protocol.parse_reserved(body)
            if cached + len(slots) > len(keys) or not slots or any(s >= link.slots.num_slots for s in slots):
                raise ProtocolError(f"a reservation of {len(slots)} slots after {cached} cached chunks")
            handles = link.slots.issue(zip(slots, tokens[cached:], strict=False))
            return SharedPendingStore(self, _Hold(self, link, ident, handles), cached)

        pending = self._call(Op.BEGIN_STORE, protocol.prompt_body(num_tokens, keys), reserved)
        return pending if pending is not None else SharedPendingStore(self, None, 0)

    def _commit(self, link: Link, ident: int, count: int) -> int:
        """Commit ``count`` filled slots of reservation ``ident`` on ``link``; the tokens cached after."""
        tokens = self._call(Op.COMMIT, protocol.id_body(ident, count), _count_within(None), on=link)
        return 0 if tokens is None else int(tokens)

    # -- retrieve and lease -----------------------------------------------------------------------------
    def retrieve(self, tokens: Any, *, out: Any = None, framework: str | None = None) -> tuple[Any, int]:
        """Copy the longest cached prefix of ``tokens`` into one contiguous array, or into ``out`` (as
        ``ChunkCache.retrieve``); ``(None, 0)`` on a miss or when the server cannot be reached.

        Raises:
            ChunkShapeError, ChunkTypeError, OverlapError, ConfigError: as ``ChunkCache.retrieve``
                (``out`` overlapping this client's mapping of the arena included).
        """
        ids = token_ids(tokens)
        copies = self._copies
        limit = copies.check_out(out, framework) if out is not None else None
        if out is None:
            framework = copies.check_framework(framework)
        try:
            hold = self._pin(Op.PIN, self.keys(ids), len(ids), limit)
        except _TooLongError as exc:
            raise out_too_short(limit or 0, exc.num_tokens) from None
        if hold is None or hold.link is None or not hold.handles:
            return None, 0
        try:
            with hold.link.in_use() as usable:
                if not usable:
                    return None, 0
                if out is not None:
                    copies.into_out(hold.handles, out)
                    return out, hold.num_tokens
                return copies.gather(hold.handles, hold.num_tokens, framework), hold.num_tokens  # type: ignore[arg-type]
        finally:
            hold.end(Op.RELEASE)

    def load_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> Any:
        """Copy the longest cached prefix of ``tokens`` into a paged KV cache (as
        ``ChunkCache.load_paged``: torch returns ``n``, JAX ``(new_kv_caches, n)``); a miss, also when
        the server cannot be reached, loads nothing."""
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self.layout, host=True)
        check_scatter_target(kv_caches, request.spec, self._slots.overlaps)
        torch = request.spec.framework == "torch"
        try:
            hold = self._pin(Op.PIN, self.keys(ids), len(ids), request.coverable_tokens(len(ids)))
        except _TooLongError as exc:
            request.check_table(exc.num_tokens)  # raises: the table cannot take that many tokens
            raise CacheInvariantError(
                f"the server found {exc.num_tokens} tokens beyond the block table's reach, but the table "
                "takes them"
            ) from None
        if hold is None or hold.link is None or not hold.handles:
            return 0 if torch else (kv_caches, 0)
        try:
            with hold.link.in_use() as usable:
                if not usable:
                    return 0 if torch else (kv_caches, 0)
                request.check_table(hold.num_tokens)
                chunks = [(start, obj) for start, obj in spans(hold.handles)]
                result = request.scatter_chunks(chunks, hold.num_tokens)
        finally:
            hold.end(Op.RELEASE)
        return result if torch else (result, hold.num_tokens)

    def lease(self, tokens: Any) -> Lease:
        """Pin the chunks of the longest cached prefix of ``tokens`` for this connection and return them
        as a :class:`~lmcache.chunk_cache.Lease` of KVObj views of the mapping (zero-copy in numpy,
        torch and JAX). An empty lease on a miss or when the server cannot be reached.

        A lease lasts as long as this client's connection: when the connection is lost (the server
        died), the lease is released and its KVObjs raise :class:`~lmcache.errors.StaleHandleError`.
        """
        ids = token_ids(tokens)
        return self._lease(self.keys(ids), len(ids))

    def lease_keys(self, keys: Sequence[bytes], num_tokens: int) -> Lease:
        """:meth:`lease` of a prompt given by its chunk keys."""
        check_keys(keys, num_tokens, self.chunk_size)
        return self._lease(list(keys), num_tokens)

    def _lease(self, keys: list[bytes], num_tokens: int) -> Lease:
        hold = self._pin(Op.LEASE, keys, num_tokens, None)
        if hold is None or not hold.handles:
            return Lease([], _nothing)

        def release(_chain: list[CacheEntry]) -> None:
            with self._lock:
                self._leases.pop(hold, None)
            hold.end(Op.RELEASE)

        chain = [
            CacheEntry(key, obj, None, obj.num_tokens) for key, obj in zip(keys, hold.handles, strict=False)
        ]

        def release_dropped(chain: list[CacheEntry]) -> None:  # from the garbage collector: not here
            threading.Thread(target=release, args=(chain,), name="lmcache-lease-release", daemon=True).start()

        lease = Lease(chain, release, release_dropped)
        with self._lock:
            if hold.link is None or hold.link.closed:  # the connection went meanwhile
                lease.release()
            else:
                self._leases[hold] = lease
        return lease

    def _pin(self, op: Op, keys: list[bytes], num_tokens: int, limit: int | None) -> _Hold | None:
        """Ask for a lease (``op`` LEASE) or a read pin (PIN, at most ``limit`` tokens); None when the
        server could not be reached.

        Raises:
            _TooLongError: more than ``limit`` tokens are cached (nothing was pinned).
        """
        tokens = self.chunk_tokens(num_tokens)

        def pinned(link: Link, reply: int, body: bytes) -> _Hold:
            if reply == Reply.TOO_LONG and limit is not None:
                cached = protocol.parse_count(body)
                if not limit < cached <= num_tokens:
                    raise ProtocolError(f"a pin of at most {limit} tokens found {cached} too many")
                raise _TooLongError(cached)
            if reply != Reply.PINNED:
                raise ProtocolError(f"a pin answered with opcode {reply}")
            ident, chunks = protocol.parse_pinned(body)
            if len(chunks) > len(keys) or (ident == 0) != (not chunks):
                raise ProtocolError(f"a pin of {len(keys)} chunks answered {len(chunks)} (id {ident})")
            for (slot, count), expected in zip(chunks, tokens, strict=False):
                if slot >= link.slots.num_slots or count != expected:
                    raise ProtocolError(f"a pinned chunk of {count} tokens in slot {slot}")
            return _Hold(self, link, ident, link.slots.issue(chunks))

        body = protocol.prompt_body(num_tokens, keys, None if op == Op.LEASE else _limit(limit))
        hold: _Hold | None = self._call(op, body, pinned)
        return hold

    # -- the rest of the API ----------------------------------------------------------------------------
    def clear(self) -> int:
        """Drop every chunk on the server that is not pinned (by any client); return how many (0 when
        the server cannot be reached)."""
        dropped = self._call(Op.CLEAR, b"", _count_within(None))
        return 0 if dropped is None else int(dropped)

    @property
    def arena(self) -> Any:
        """The whole mapped arena as one native ``(num_slots, slot_elems)`` array of this client's
        framework (as ``LocalPool.arena``), no copy; after a reconnect, the new server's."""
        return self._slots.whole()

    @property
    def pinned(self) -> bool:
        """Whether this client's mapping is page-locked."""
        return self._slots.pinned

    @property
    def server_id(self) -> bytes:
        """The id of the server instance this client is connected to (new at each server start)."""
        return self._server_id

    def close(self) -> None:
        """Close the connection: the server releases this client's leases and reservations, and later
        calls answer as misses. Calling it again does nothing."""
        with self._lock:
            self._closed = True
            self._connected = False
            if self._link is not None:
                self._drop(self._link)

    def __enter__(self) -> SharedChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(
            "a SharedChunkCache is a connection and cannot be pickled; call lmcache.shared.connect() in "
            "each process"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._link is not None else "reconnecting")
        return f"SharedChunkCache({self.socket_path!r}, {state}, backend={self.backend!r})"

    def reset_locks_after_fork(self) -> None:
        """In a forked child: new locks, and let go of the parent's connection without closing it (the
        child connects on its own at its first call)."""
        self._lock = threading.RLock()
        link, self._link = self._link, None
        if link is not None:
            link.abandon()
        self._leases = {}
        self._backoff.succeeded()

    # -- the connection ---------------------------------------------------------------------------------
    def _call(self, op: Op, body: bytes, parse: Parse, *, on: Link | None = None) -> Any:
        """One round trip; ``parse(link, reply, body)`` makes the result (raising ProtocolError for a bad
        reply). None, counted as an error, when the server could not serve it. ``on``: the link a
        reservation was granted on (None: the current one, reconnecting when due)."""
        with self._lock:
            link = self._usable() if on is None else (on if on is self._link and not on.closed else None)
            if link is None:
                self._errors += 1
                return None
            try:
                reply, reply_body = link.call(op, body, time.monotonic() + self.timeout)
                self._backoff.succeeded()
                self._connected = True
                if reply in (Reply.REFUSED, Reply.FAILED):
                    logger.warning(
                        "the cache server did not serve a request: %s", reply_body.decode("utf-8", "replace")
                    )
                    self._errors += 1
                    return None
                return parse(link, reply, reply_body)
            except TimeoutError:
                logger.info("the cache server at %s did not answer in %.3g s", self.socket_path, self.timeout)
                self._fail(None)
            except (OSError, ProtocolError) as exc:
                logger.info("lost the cache server at %s: %s", self.socket_path, exc)
                self._fail(link)
            return None

    def _tell(self, link: Link, op: Op, body: bytes) -> None:
        """Send a request without a reply (RELEASE, ABORT) on ``link``, if it is still the current one."""
        with self._lock:
            if link is not self._link or link.closed:
                return
            try:
                link.send(op, body)
            except OSError as exc:
                logger.info("lost the cache server at %s: %s", self.socket_path, exc)
                self._fail(link)

    def _usable(self) -> Link | None:
        """The current link; a new one when there is none and the backoff allows; None otherwise."""
        if self._closed or self._backoff.waiting():
            return None
        if self._link is not None:
            return self._link
        try:
            link = self._open()
        except (OSError, ProtocolError, MemPoolError) as exc:
            logger.debug("the cache server at %s is not back yet: %s", self.socket_path, exc)
            self._backoff.failed()
            return None
        welcome = link.welcome
        if (welcome.kv_shape, welcome.dtype, welcome.slot_alignment) != self._geometry:
            logger.warning(
                "the cache server at %s now holds chunks of %s %s, not %s: not used",
                self.socket_path,
                welcome.kv_shape,
                welcome.dtype,
                self._geometry,
            )
            link.close()
            self._backoff.failed()
            return None
        self._install(link)
        return link

    def _open(self) -> Link:
        return Link.open(self.socket_path, timeout=self.timeout, **self._options)  # type: ignore[arg-type]

    def _install(self, link: Link) -> None:
        self._link = link
        self._slots = link.slots
        self._copies = ChunkCopies(link.slots)
        self._server_id = link.welcome.server_id
        self._reconnects += 1

    def _fail(self, link: Link | None) -> None:
        """Count a failure, back off, and (``link`` given) drop that connection."""
        self._errors += 1
        self._connected = False
        self._backoff.failed()
        if link is not None:
            self._drop(link)

    def _drop(self, link: Link) -> None:
        """Close ``link`` (waiting for running copies) and release every lease granted on it."""
        if self._link is link:
            self._link = None
        leases = [lease for hold, lease in self._leases.items() if hold.link is link]
        link.close()
        for lease in leases:
            lease.release()


def _count_within(most: int | None) -> Parse:
    """A parser of a COUNT reply whose value may not exceed ``most``."""

    def count(link: Link, reply: int, body: bytes) -> int:
        if reply != Reply.COUNT:
            raise ProtocolError(f"expected a count, got opcode {reply}")
        value = protocol.parse_count(body)
        if most is not None and value > most:
            raise ProtocolError(f"a count of {value} for a prompt of {most} tokens")
        return value

    return count


def _stats(link: Link, reply: int, body: bytes) -> dict[str, int]:
    if reply != Reply.STATS:
        raise ProtocolError(f"expected stats, got opcode {reply}")
    return protocol.parse_stats(body)


def _limit(limit: int | None) -> int:
    return NO_LIMIT if limit is None else limit


def _nothing(chain: list[CacheEntry]) -> None:
    """The release of an empty lease."""


def connect(
    socket_path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    namespace: str = "",
    timeout: float = 5.0,
    pin_memory: bool | None = None,
    server_uid: int | None = None,
) -> SharedChunkCache:
    """Connect to the cache server at ``socket_path``: see :class:`SharedChunkCache` for the arguments.

    Raises:
        ServerUnavailableError: no server answered there.
    """
    return SharedChunkCache(
        socket_path,
        backend=backend,
        namespace=namespace,
        timeout=timeout,
        pin_memory=pin_memory,
        server_uid=server_uid,
    )


__all__ = ["SharedCacheStats", "SharedChunkCache", "SharedPendingStore", "connect"]
