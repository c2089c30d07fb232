"""One client connection on the server: its requests, served by the server's
:class:`~lmcache.chunk_cache.ChunkCache`, and what it holds (reservations and pins).

A client names what it holds only by the ids this session gave it, per connection: it never names a
slot. A request that is malformed or names an id this connection was not given raises
:class:`~lmcache.errors.ProtocolError` (the server then closes this connection, which releases all it
held); a valid request that would exceed a per-connection limit is answered ``REFUSED``. When the
connection ends for any reason, :meth:`Session.close` aborts every open reservation (its slots go back,
and nothing half-written was ever visible) and releases every pin.
"""

from __future__ import annotations

import itertools
import logging

from lmcache.cache_records import CacheEntry, Lease
from lmcache.chunk_cache import ChunkCache, PendingStore
from lmcache.errors import MemPoolError, ProtocolError
from lmcache.shared import protocol
from lmcache.shared.protocol import NO_LIMIT, Op, Reply

logger = logging.getLogger("lmcache.shared")

#: Open reservations (stores begun, not committed) one connection may hold.
MAX_RESERVATIONS = 1024
#: Leases and pins one connection may hold.
MAX_LEASES = 1 << 16

Answer = tuple[int, bytes] | None


class _PrefixTooLongError(Exception):
    """A PIN's cached prefix is longer than its limit (raised under the index's lock: nothing pinned)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__(num_tokens)
        self.num_tokens = num_tokens


class Session:
    """The reservations and pins of one connection, and the serving of its requests.

    Args:
        cache: the server's cache.
        max_reservations, max_leases: what one connection may hold at once.

    Not thread-safe: the connection's own thread drives it.
    """

    def __init__(
        self, cache: ChunkCache, *, max_reservations: int = MAX_RESERVATIONS, max_leases: int = MAX_LEASES
    ) -> None:
        self._cache = cache
        self._chunk_size = cache.pool.chunk_size
        self._max_reservations = max_reservations
        self._max_leases = max_leases
        self._reservations: dict[int, PendingStore] = {}
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)

    @property
    def held(self) -> tuple[int, int]:
        """``(open reservations, held leases and pins)``."""
        return len(self._reservations), len(self._leases)

    def serve(self, op: int, body: bytes) -> Answer:
        """Serve one request; return the reply's ``(opcode, body)``, or None (RELEASE has no reply).

        Raises:
            ProtocolError: an unknown opcode, a malformed body, or an id this connection was not given.
            MemPoolError: the cache could not serve a valid request (the server answers FAILED).
        """
        if op == Op.LOOKUP:
            num_tokens, keys, _ = protocol.parse_prompt(body, self._chunk_size, with_limit=False)
            return Reply.COUNT, protocol.count_body(self._cache.lookup_keys(keys, num_tokens))
        if op in (Op.BEGIN_STORE, Op.STORE):
            return self._begin_store(body, commit_at_once=op == Op.STORE)
        if op == Op.COMMIT:
            return self._commit(body)
        if op in (Op.LEASE, Op.PIN):
            return self._pin(body, lease=op == Op.LEASE)
        if op == Op.RELEASE:
            ident, _ = protocol.parse_id(body, with_count=False)
            lease = self._leases.pop(ident, None)
            if lease is None:
                raise ProtocolError(f"release of lease {ident}, which this connection does not hold")
            lease.release()
            return None
        if op == Op.ABORT:
            ident, _ = protocol.parse_id(body, with_count=False)
            pending = self._reservations.pop(ident, None)
            if pending is None:
                raise ProtocolError(f"abort of reservation {ident}, which this connection does not hold")
            pending.abort()
            return None
        if op == Op.STATS:
            protocol.parse_empty(body)
            return Reply.STATS, protocol.stats_body(self._cache.stats())
        if op == Op.CLEAR:
            protocol.parse_empty(body)
            return Reply.COUNT, protocol.count_body(self._cache.clear())
        raise ProtocolError(f"unknown request opcode {op}")

    def close(self) -> None:
        """Abort every open reservation and release every pin (the connection is gone)."""
        reservations, self._reservations = self._reservations, {}
        leases, self._leases = self._leases, {}
        held: list[PendingStore | Lease] = [*reservations.values(), *leases.values()]
        for item in held:
            try:
                if isinstance(item, PendingStore):
                    item.abort()
                else:
                    item.release()
            except MemPoolError as exc:  # the server is stopping and closed its pool: nothing to give back
                logger.debug("could not give back %r: %s", item, exc)

    # -- requests ----------------------------------------------------------------------------------------
    def _begin_store(self, body: bytes, *, commit_at_once: bool) -> Answer:
        """BEGIN_STORE, or STORE: a store that is committed here when it has nothing to fill (all
        cached, or no slot to be had), saving the client a round trip."""
        num_tokens, keys, _ = protocol.parse_prompt(body, self._chunk_size, with_limit=False)
        if len(self._reservations) >= self._max_reservations:
            return self._refuse(f"{self._max_reservations} stores are open on this connection already")
        pending = self._cache.begin_store(keys, num_tokens)
        slots = [obj.chunk_idx for obj in pending.slots]
        if commit_at_once and not slots:
            return Reply.COUNT, protocol.count_body(_tokens(pending.commit()))
        ident = next(self._ids)
        self._reservations[ident] = pending
        return Reply.RESERVED, protocol.reserved_body(ident, pending.cached, slots)

    def _commit(self, body: bytes) -> Answer:
        ident, count = protocol.parse_id(body, with_count=True)
        pending = self._reservations.get(ident)
        if pending is None:
            raise ProtocolError(f"commit of reservation {ident}, which this connection does not hold")
        if count > len(pending.slots):
            raise ProtocolError(f"commit of {count} chunks in a reservation of {len(pending.slots)}")
        del self._reservations[ident]
        return Reply.COUNT, protocol.count_body(_tokens(pending.commit(count)))

    def _pin(self, body: bytes, *, lease: bool) -> Answer:
        num_tokens, keys, limit = protocol.parse_prompt(body, self._chunk_size, with_limit=not lease)
        if len(self._leases) >= self._max_leases:
            return self._refuse(f"{self._max_leases} leases are held on this connection already")
        if lease:
            held = self._cache.lease_keys(keys, num_tokens)
        else:

            def within_limit(cached_tokens: int) -> None:
                if cached_tokens > limit:
                    raise _PrefixTooLongError(cached_tokens)

            try:
                held = self._cache.pin_keys(
                    keys, num_tokens, within=None if limit == NO_LIMIT else limit, check=within_limit
                )
            except _PrefixTooLongError as exc:
                return Reply.TOO_LONG, protocol.count_body(exc.num_tokens)
        chunks = [(obj.chunk_idx, obj.num_tokens) for obj in held.chunks]
        ident = 0  # a miss holds nothing: nothing to release
        if chunks:
            ident = next(self._ids)
            self._leases[ident] = held
        return Reply.PINNED, protocol.pinned_body(ident, chunks)

    @staticmethod
    def _refuse(reason: str) -> Answer:
        return Reply.REFUSED, protocol.message_body(reason)


def _tokens(prefix: list[CacheEntry]) -> int:
    return sum(entry.num_tokens for entry in prefix)


__all__ = ["MAX_LEASES", "MAX_RESERVATIONS", "Session"]
