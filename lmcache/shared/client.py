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

import math
import os
import threading
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
    NotPicklableError,
    ProtocolError,
    ServerUnavailableError,
)
from lmcache.paged import PagedRequest, check_scatter_target
from lmcache.shared import access, protocol
from lmcache.shared.channel import Channel, expect_count
from lmcache.shared.grants import Grant, SharedPendingStore
from lmcache.shared.link import Link
from lmcache.shared.protocol import NO_LIMIT, Op, Reply
from lmcache.storage_backend.mem_pool.base_pool import KVObj


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
        self._root = root_key(namespace)
        options = {"backend": backend, "pin_memory": pin_memory, "server_uid": server_uid}
        try:
            self._channel = Channel(
                path, timeout=self.timeout, backoff_max=float(backoff_max), options=options
            )
        except (OSError, ProtocolError) as exc:
            raise ServerUnavailableError(
                f"no lmcache cache server answered at {path} ({exc}); start one with: python -m lmcache "
                f"serve --socket {path} --kv-shape L,2,T,H,D --dtype NAME --size-gib N"
            ) from exc
        slots = self._channel.slots
        self._copies = (slots, ChunkCopies(slots))
        #: The server's slot layout (chunk shape, dtype, stride).
        self.layout = slots.layout
        #: Tokens in a full chunk.
        self.chunk_size = self.layout.chunk_size
        #: The framework of this client's views.
        self.backend = slots.backend
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
        hit = self._channel.call(Op.LOOKUP, protocol.prompt_body(num_tokens, keys), expect_count(num_tokens))
        return 0 if hit is None else int(hit)

    def stats(self) -> SharedCacheStats:
        """The server's counters (zero when it cannot be reached) and this client's own."""
        fields = self._channel.call(Op.STATS, b"", _stats)
        if fields is None:
            fields = dict.fromkeys(CacheStats.__dataclass_fields__, 0)
        channel = self._channel
        return SharedCacheStats(
            **fields, errors=channel.errors, reconnects=channel.reconnects, connected=channel.connected
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
        copies, size = self._copies_now(), self.chunk_size
        source = copies.check_kv(kv, len(ids))
        pending = self._begin(Op.STORE, self.keys(ids), len(ids))
        return pending.fill(lambda index: copies.filler(source, index * size))

    def store_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> int:
        """Store the KV of ``tokens`` from a paged KV cache (as ``ChunkCache.store_paged``)."""
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self.layout, host=True)
        request.check_table(len(ids))
        size, total = self.chunk_size, len(ids)

        def filler(index: int) -> Callable[[KVObj], None]:
            return lambda obj: request.gather_into_slot(obj, index * size, obj.num_tokens, total)

        return self._begin(Op.STORE, self.keys(ids), total).fill(filler)

    def begin_store(self, keys: Sequence[bytes], num_tokens: int) -> SharedPendingStore:
        """Reserve slots for the missing chunks of a prompt given by its keys, for a caller that copies
        the bytes itself (as ``ChunkCache.begin_store``; its ``commit`` returns the tokens cached)."""
        check_keys(keys, num_tokens, self.chunk_size)
        return self._begin(Op.BEGIN_STORE, list(keys), num_tokens)

    def _begin(self, op: Op, keys: list[bytes], num_tokens: int) -> SharedPendingStore:
        """BEGIN_STORE, or STORE (committed by the server at once when there is nothing to fill)."""
        tokens = self.chunk_tokens(num_tokens)

        def reserved(link: Link, reply: int, body: bytes) -> SharedPendingStore:
            if reply == Reply.COUNT and op == Op.STORE:  # nothing to fill: committed already
                cached_tokens = expect_count(num_tokens)(link, reply, body)
                chunks = -(-cached_tokens // self.chunk_size)
                return SharedPendingStore(self._channel, None, chunks, cached_tokens)
            if reply != Reply.RESERVED:
                raise ProtocolError(f"a reservation answered with opcode {reply}")
            ident, cached, slots = protocol.parse_reserved(body)
            if cached + len(slots) > len(keys) or not ident or any(s >= link.slots.num_slots for s in slots):
                raise ProtocolError(f"a reservation of {len(slots)} slots after {cached} cached chunks")
            handles = link.slots.issue(zip(slots, tokens[cached:], strict=False))
            return SharedPendingStore(self._channel, Grant(self._channel, link, ident, handles), cached)

        pending = self._channel.call(op, protocol.prompt_body(num_tokens, keys), reserved)
        return pending if pending is not None else SharedPendingStore(self._channel, None, 0)

    # -- retrieve and lease -----------------------------------------------------------------------------
    def retrieve(self, tokens: Any, *, out: Any = None, framework: str | None = None) -> tuple[Any, int]:
        """Copy the longest cached prefix of ``tokens`` into one contiguous array, or into ``out`` (as
        ``ChunkCache.retrieve``); ``(None, 0)`` on a miss or when the server cannot be reached.

        Raises:
            ChunkShapeError, ChunkTypeError, OverlapError, ConfigError: as ``ChunkCache.retrieve``
                (``out`` overlapping this client's mapping of the arena included).
        """
        ids = token_ids(tokens)
        copies = self._copies_now()
        limit = copies.check_out(out, framework) if out is not None else None
        if out is None:
            framework = copies.check_framework(framework)
        try:
            grant = self._pin(Op.PIN, self.keys(ids), len(ids), limit)
        except _TooLongError as exc:
            raise out_too_short(limit or 0, exc.num_tokens) from None
        if grant is None or grant.link is None or not grant.handles:
            return None, 0
        try:
            with grant.link.in_use() as usable:
                if not usable:
                    return None, 0
                if out is not None:
                    copies.into_out(grant.handles, out)
                    return out, grant.num_tokens
                return copies.gather(grant.handles, grant.num_tokens, framework), grant.num_tokens  # type: ignore[arg-type]
        finally:
            grant.end(Op.RELEASE)

    def load_paged(self, tokens: Any, kv_caches: Any, block_ids: Any, *, layout: str) -> Any:
        """Copy the longest cached prefix of ``tokens`` into a paged KV cache (as
        ``ChunkCache.load_paged``: torch returns ``n``, JAX ``(new_kv_caches, n)``); a miss, also when
        the server cannot be reached, loads nothing."""
        ids = token_ids(tokens)
        request = PagedRequest(kv_caches, block_ids, layout, self.layout, host=True)
        check_scatter_target(kv_caches, request.spec, self._channel.slots.overlaps)
        torch = request.spec.framework == "torch"
        try:
            grant = self._pin(Op.PIN, self.keys(ids), len(ids), request.coverable_tokens(len(ids)))
        except _TooLongError as exc:
            request.check_table(exc.num_tokens)  # raises: the table cannot take that many tokens
            raise CacheInvariantError(
                f"the server found {exc.num_tokens} tokens beyond the block table's reach, but the table "
                "takes them"
            ) from None
        if grant is None or grant.link is None or not grant.handles:
            return 0 if torch else (kv_caches, 0)
        try:
            with grant.link.in_use() as usable:
                if not usable:
                    return 0 if torch else (kv_caches, 0)
                request.check_table(grant.num_tokens)
                chunks = [(start, obj) for start, obj in spans(grant.handles)]
                result = request.scatter_chunks(chunks, grant.num_tokens)
        finally:
            grant.end(Op.RELEASE)
        return result if torch else (result, grant.num_tokens)

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
        grant = self._pin(Op.LEASE, keys, num_tokens, None)
        if grant is None or grant.link is None or not grant.handles:
            return Lease([], _nothing)
        channel, link = self._channel, grant.link

        def release(_chain: list[CacheEntry]) -> None:
            channel.untrack(grant)
            grant.end(Op.RELEASE)

        chain = [
            CacheEntry(key, obj, None, obj.num_tokens) for key, obj in zip(keys, grant.handles, strict=False)
        ]

        def release_dropped(chain: list[CacheEntry]) -> None:  # from the garbage collector: not here
            threading.Thread(target=release, args=(chain,), name="lmcache-lease-release", daemon=True).start()

        lease = Lease(chain, release, release_dropped)
        channel.track(grant, link, lease)  # released with the connection, if that goes first
        return lease

    def _pin(self, op: Op, keys: list[bytes], num_tokens: int, limit: int | None) -> Grant | None:
        """Ask for a lease (``op`` LEASE) or a read pin (PIN, at most ``limit`` tokens); None when the
        server could not be reached.

        Raises:
            _TooLongError: more than ``limit`` tokens are cached (nothing was pinned).
        """
        tokens = self.chunk_tokens(num_tokens)

        def pinned(link: Link, reply: int, body: bytes) -> Grant:
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
            return Grant(self._channel, link, ident, link.slots.issue(chunks))

        body = protocol.prompt_body(num_tokens, keys, None if op == Op.LEASE else _limit(limit))
        grant: Grant | None = self._channel.call(op, body, pinned)
        return grant

    # -- the rest of the API ----------------------------------------------------------------------------
    def clear(self) -> int:
        """Drop every chunk on the server that is not pinned (by any client); return how many (0 when
        the server cannot be reached)."""
        dropped = self._channel.call(Op.CLEAR, b"", expect_count(None))
        return 0 if dropped is None else int(dropped)

    @property
    def arena(self) -> Any:
        """The whole mapped arena as one native ``(num_slots, slot_elems)`` array of this client's
        framework (as ``LocalPool.arena``), no copy; after a reconnect, the new server's."""
        return self._channel.slots.whole()

    @property
    def pinned(self) -> bool:
        """Whether this client's mapping is page-locked."""
        return self._channel.slots.pinned

    @property
    def server_id(self) -> bytes:
        """The id of the server instance this client is connected to (new at each server start)."""
        return self._channel.server_id

    def close(self) -> None:
        """Close the connection: the server releases this client's leases and reservations, and later
        calls answer as misses. Calling it again does nothing."""
        self._channel.close()

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
        channel = self._channel
        state = "closed" if channel.closed else ("connected" if channel.link is not None else "reconnecting")
        return f"SharedChunkCache({self.socket_path!r}, {state}, backend={self.backend!r})"

    def reset_locks_after_fork(self) -> None:
        """In a forked child: let go of the parent's connection without closing it (the child connects
        on its own at its first call); see :mod:`lmcache.forksafe`."""
        self._channel.reset_after_fork()

    def _copies_now(self) -> ChunkCopies:
        """The copies for the current mapping (a reconnect maps a new one)."""
        slots, copies = self._copies
        if slots is not self._channel.slots:
            slots = self._channel.slots
            copies = ChunkCopies(slots)
            self._copies = (slots, copies)
        return copies


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
