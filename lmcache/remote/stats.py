"""The remote tier's counters: :class:`RemoteStats` (a snapshot) and :class:`Counters` (the live ones).

Every part of the tier (reads, streams, the writer, connection health) adds to one :class:`Counters`
object (:class:`lmcache.tiers.counters.Counters` with the remote tier's names), which takes its own
lock for each change, so no part writes another's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache.tiers import counters as _counters

#: The names :meth:`Counters.add` accepts.
COUNTERS = _counters.COUNTERS


@dataclass(frozen=True)
class RemoteStats:
    """Counters of a :class:`~lmcache.remote.RedisTier`, since it was built.

    Attributes:
        hits: chunks fetched and validated.
        misses: chunks asked for and not on the server (or unreadable because it was unreachable).
        writes: chunks written.
        errors: failed operations (a connection refused, a timeout, a refused password, a server error).
        dropped: queued writes that were never written (queue full, failed write, closed tier).
        corrupt: values rejected by validation (never returned).
        pending: writes queued now, not yet written or dropped.
        connected: whether the last operation reached the server.
    """

    hits: int
    misses: int
    writes: int
    errors: int
    dropped: int
    corrupt: int
    pending: int
    connected: bool


class Counters(_counters.Counters):
    """The live counters of one remote tier, safe to add to from any thread."""

    def __init__(self) -> None:
        super().__init__(COUNTERS, tier="remote")

    def snapshot(self, *, pending: int, connected: bool) -> RemoteStats:
        """Return the counters (a consistent snapshot), with the writer's ``pending`` and the link's
        ``connected`` (which the writer and the connections own)."""
        return RemoteStats(**self.counts(), pending=pending, connected=connected)


__all__ = ["COUNTERS", "Counters", "RemoteStats"]
