"""The live counters of a tier (:class:`Counters`), safe to add to from any thread.

Every part of a tier (reads, streams, the writer, its store's health) adds to one :class:`Counters`
object, which takes its own lock for each change, so no part writes another's state. Each tier turns
:meth:`Counters.counts` into its own stats record (:class:`~lmcache.remote.RemoteStats`,
:class:`~lmcache.disk.DiskStats`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from lmcache.errors import ConfigError

#: The counters every tier keeps (a tier may keep more).
COUNTERS = ("hits", "misses", "writes", "errors", "dropped", "corrupt")


class Counters:
    """The live counters of one tier, safe to add to from any thread.

    Args:
        names: the counters kept (each starts at 0).
        tier: the tier's kind, for the message of an unknown name (``"remote"``, ``"disk"``).
    """

    def __init__(self, names: Sequence[str] = COUNTERS, *, tier: str = "tier") -> None:
        self._lock = threading.Lock()
        self._names = tuple(names)
        self._tier = tier
        self._counts = dict.fromkeys(self._names, 0)  # changed only by add(), under _lock

    def add(self, name: str, count: int = 1) -> None:
        """Add ``count`` to the counter ``name``.

        Raises:
            ConfigError: ``name`` is not a counter (nothing is changed).
        """
        if name not in self._counts:
            raise ConfigError(f"no {self._tier} counter {name!r}; use one of {list(self._names)}")
        with self._lock:
            self._counts[name] += count

    def counts(self) -> dict[str, int]:
        """Every counter, as one consistent snapshot."""
        with self._lock:
            return dict(self._counts)


__all__ = ["COUNTERS", "Counters"]
