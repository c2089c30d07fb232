"""A client's connection to the cache server over time: the current :class:`~lmcache.shared.link.Link`,
reconnects with a capped backoff, and calls that answer None (counted) when the server cannot serve
them.

:class:`Channel` is what keeps a server's faults out of the client's calls. A call that finds no link
(the server is down, or the backoff after a failure has not passed) answers None at once; one that
times out keeps the link (its late reply is undone) and starts a backoff; one whose link fails drops the
link, revoking every handle made on it and releasing every lease granted on it. The next call after the
backoff connects again, to whatever server listens at the path by then; one with another chunk layout
is not used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lmcache.cache_records import Lease
from lmcache.errors import MemPoolError, ProtocolError
from lmcache.shared import protocol
from lmcache.shared.link import Link
from lmcache.shared.protocol import Op, Reply
from lmcache.shared.slots import MappedSlots

logger = logging.getLogger("lmcache.shared")

#: Makes a call's result from its reply: ``parse(link, opcode, body)``; raises ProtocolError if bad.
Parse = Callable[[Link, int, bytes], Any]
#: The first wait before trying a failed server again (the waits double up to ``backoff_max``).
BACKOFF_INITIAL = 0.05


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


class Channel:
    """The client's connection to the server at ``path``, kept up across failures.

    Args:
        path: the server's socket.
        timeout: seconds a call waits for its reply.
        backoff_max: the longest wait between two attempts to reach a failed server.
        options: ``backend``, ``pin_memory``, ``server_uid`` for :meth:`Link.open`.

    Raises:
        OSError, ProtocolError: the first connection failed (the caller says why to its caller).

    Thread-safe: one lock serializes the calls (copies into and out of slots run outside it, inside
    :meth:`Link.in_use`).
    """

    def __init__(self, path: str, *, timeout: float, backoff_max: float, options: dict[str, Any]) -> None:
        self._path = path
        self._timeout = timeout
        self._options = options
        self._lock = threading.RLock()
        self._backoff = _Backoff(min(BACKOFF_INITIAL, backoff_max), backoff_max)
        self._leases: dict[object, tuple[Link, Lease]] = {}
        link = Link.open(path, timeout=timeout, **options)
        welcome = link.welcome
        self._geometry = (welcome.kv_shape, welcome.dtype, welcome.slot_alignment)
        self._link: Link | None = link
        #: The mapping of the latest server (kept after its link went: its views stay valid memory).
        self.slots: MappedSlots = link.slots
        #: The latest server's id.
        self.server_id = welcome.server_id
        #: Calls the server did not serve (each answered None).
        self.errors = 0
        #: Connections opened after the first.
        self.reconnects = 0
        #: Whether the last call reached the server.
        self.connected = True
        self._closed = False

    # -- calls -------------------------------------------------------------------------------------------
    def call(self, op: Op, body: bytes, parse: Parse, *, on: Link | None = None) -> Any:
        """One round trip; ``parse`` makes the result. None, counted, when the server could not serve
        it. ``on``: the link a reservation was granted on (None: the current one, reconnecting when
        due; a link that is gone answers None)."""
        with self._lock:
            link = self._usable() if on is None else (on if on is self._link and not on.closed else None)
            if link is None:
                self.errors += not self._closed
                return None
            try:
                reply, reply_body = link.call(op, body, time.monotonic() + self._timeout)
                self._backoff.succeeded()
                self.connected = True
                if reply in (Reply.REFUSED, Reply.FAILED):
                    reason = reply_body.decode("utf-8", "replace")
                    logger.warning("the cache server did not serve a request: %s", reason)
                    self.errors += 1
                    return None
                return parse(link, reply, reply_body)
            except TimeoutError:
                logger.info("the cache server at %s did not answer in %.3g s", self._path, self._timeout)
                self._fail(None)
            except (OSError, ProtocolError) as exc:
                logger.info("lost the cache server at %s: %s", self._path, exc)
                self._fail(link)
            return None

    def tell(self, link: Link, op: Op, ident: int) -> None:
        """Send RELEASE or ABORT of ``ident`` on ``link`` (no reply), if it is still the current link."""
        with self._lock:
            if link is not self._link or link.closed:
                return
            try:
                link.send(op, protocol.id_body(ident))
            except OSError as exc:
                logger.info("lost the cache server at %s: %s", self._path, exc)
                self._fail(link)

    # -- leases --------------------------------------------------------------------------------------------
    def track(self, key: object, link: Link, lease: Lease) -> bool:
        """Remember a lease granted on ``link`` (released if the link goes); False, and the lease is
        released at once, when the link went meanwhile."""
        with self._lock:
            if link is not self._link or link.closed:
                lease.release()
                return False
            self._leases[key] = (link, lease)
            return True

    def untrack(self, key: object) -> None:
        """Forget a lease (it was released)."""
        with self._lock:
            self._leases.pop(key, None)

    # -- the connection ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (the server releases all it held); later calls answer None, not
        counted as errors. Calling it again does nothing."""
        with self._lock:
            self._closed = True
            self.connected = False
            if self._link is not None:
                self._drop(self._link)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def link(self) -> Link | None:
        """The current link, if any."""
        return self._link

    def reset_after_fork(self) -> None:
        """In a forked child: a new lock, and let go of the parent's connection without closing it (the
        child connects on its own at its first call)."""
        self._lock = threading.RLock()
        link, self._link = self._link, None
        if link is not None:
            link.abandon()
        self._leases = {}
        self._backoff.succeeded()

    def _usable(self) -> Link | None:
        """The current link; a new one when there is none and the backoff allows; None otherwise."""
        if self._closed or self._backoff.waiting():
            return None
        if self._link is not None:
            return self._link
        try:
            link = Link.open(self._path, timeout=self._timeout, **self._options)
        except (OSError, ProtocolError, MemPoolError) as exc:
            logger.debug("the cache server at %s is not back yet: %s", self._path, exc)
            self._backoff.failed()
            return None
        welcome = link.welcome
        if (welcome.kv_shape, welcome.dtype, welcome.slot_alignment) != self._geometry:
            logger.warning(
                "the cache server at %s now holds chunks of %s %s, not %s: not used",
                self._path,
                welcome.kv_shape,
                welcome.dtype,
                self._geometry,
            )
            link.close()
            self._backoff.failed()
            return None
        self._link, self.slots, self.server_id = link, link.slots, welcome.server_id
        self.reconnects += 1
        return link

    def _fail(self, link: Link | None) -> None:
        """Count a failure, back off, and (``link`` given) drop that connection."""
        self.errors += 1
        self.connected = False
        self._backoff.failed()
        if link is not None:
            self._drop(link)

    def _drop(self, link: Link) -> None:
        """Close ``link`` (waiting for running copies) and release every lease granted on it."""
        if self._link is link:
            self._link = None
        leases = [lease for granted, lease in self._leases.values() if granted is link]
        link.close()
        for lease in leases:
            lease.release()


def expect_count(most: int | None) -> Parse:
    """A parser of a COUNT reply whose value may not exceed ``most`` (None: any)."""

    def count(link: Link, reply: int, body: bytes) -> int:
        if reply != Reply.COUNT:
            raise ProtocolError(f"expected a count, got opcode {reply}")
        value = protocol.parse_count(body)
        if most is not None and value > most:
            raise ProtocolError(f"a count of {value} for a prompt of {most} tokens")
        return value

    return count


__all__ = ["BACKOFF_INITIAL", "Channel", "Parse", "expect_count"]
