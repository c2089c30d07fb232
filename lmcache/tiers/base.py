"""What a tier below the chunk cache's slots is: a store of chunk values the cache writes behind to,
probes, and fetches into local slots.

Two implementations: :class:`~lmcache.remote.RedisTier` (``remote``, a Redis / Valkey server shared by
machines) and :class:`~lmcache.disk.DiskTier` (``disk``, a directory that survives restarts). Both store
the value format of :mod:`lmcache.tiers.format` (a header with an ``xxh3`` checksum over key, header and
payload, then the chunk's bytes), never raise into the cache for a fault of their own (they count it),
and write behind from a background thread with a bounded queue. The cache's side of the contract, the
glue, is :class:`~lmcache.tiers.chain.TierChain`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class TierStream(Protocol):
    """The values of some keys, read in order: :meth:`hit` says whether the next wanted key holds a value
    of the expected dtype and shape, :meth:`read_into` reads and checks its payload."""

    def hit(self, index: int) -> bool:
        """Whether ``keys[index]`` holds a valid header (earlier unread values are skipped); the stream
        ends (every later call is False) at the first miss, rejected value or failure."""
        ...

    def read_into(self, destination: Any) -> bool:
        """Read the payload announced by :meth:`hit` into ``destination`` (a C-contiguous host buffer of
        exactly the chunk's bytes) and check it; on False its contents are garbage."""
        ...

    def close(self) -> None:
        """End the stream and release what it holds (connections, files)."""
        ...

    def __enter__(self) -> TierStream: ...

    def __exit__(self, *exc: object) -> None: ...


class TierStats(Protocol):
    """The counters every tier reports (since it was built)."""

    @property
    def hits(self) -> int:
        """Chunks fetched and validated."""
        ...

    @property
    def writes(self) -> int:
        """Chunks written."""
        ...

    @property
    def errors(self) -> int:
        """Failed operations (the store unreachable, full, read-only ...)."""
        ...

    @property
    def dropped(self) -> int:
        """Writes dropped (queue full, failed write, closed tier)."""
        ...

    @property
    def corrupt(self) -> int:
        """Values rejected by validation (never returned)."""
        ...


class Tier(Protocol):
    """A store of chunk values below the cache's slots (write-behind, probe, fetch into a slot)."""

    #: The tier's kind: its counters appear in ``CacheStats`` as ``<name>_hits`` and so on.
    name: str

    @property
    def batch_bytes(self) -> int:
        """The most bytes the cache should ask for in one :meth:`stream`."""
        ...

    def key(self, namespace: str, chunk_key: bytes) -> bytes:
        """The tier's key of a chunk of ``namespace``."""
        ...

    def submit(
        self,
        key: bytes,
        payload: Any,
        dtype: str,
        shape: Sequence[int],
        on_done: Callable[[bool], None] | None = None,
        *,
        parent: bytes | None = None,
    ) -> None:
        """Queue a write of ``payload`` (C-contiguous, unchanged until ``on_done(sent)`` is called);
        returns at once. ``parent`` is the tier key of the chunk this one extends (None for a first
        chunk): a tier that evicts leaves of its own needs it."""
        ...

    def probe(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each key seems to hold a value of its shape (cheap; a True promises nothing)."""
        ...

    def stream(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> TierStream:
        """Start reading ``keys`` (expected ``shapes``), for :meth:`TierStream.hit` and ``read_into``."""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was written or dropped; False if ``timeout`` passed first."""
        ...

    def close(self) -> None:
        """Stop the writer (dropping what is still queued after a short flush); idempotent."""
        ...

    def stats(self) -> TierStats:
        """The tier's counters."""
        ...


#: The counters of every tier, in the order ``CacheStats`` lists them.
TIER_COUNTERS = ("hits", "writes", "errors", "dropped", "corrupt")

__all__ = ["TIER_COUNTERS", "Tier", "TierStats", "TierStream"]
