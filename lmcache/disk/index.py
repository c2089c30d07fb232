"""The disk tier's index: which chunks its directory holds, their sizes, and which leaf goes next.

:class:`DiskIndex` is memory only (the directory is the truth; the index is rebuilt from it at start
and corrected when a file turns out missing or bad). It bounds the bytes on disk: before a write,
:meth:`DiskIndex.make_room` evicts least recently used *leaves* (chunks that no chunk on disk extends)
until the new chunk fits, and reserves its bytes. Every operation is O(1) per chunk.

Recency is kept among leaves only: a hit or a repeated write refreshes a leaf; a chunk that becomes a
leaf again (its last child was evicted or removed) starts at the cold end, as does an orphan (a chunk
written while its parent is not on disk: no prefix can reach it through this tier). So the chunks on
disk stay prefix-closed as far as writes arrive in prefix order, and a chunk is never evicted before a
chunk that extends it.
"""

from __future__ import annotations

import collections
import threading

from lmcache.errors import CacheInvariantError


class DiskEntry:
    """One chunk file. Only :class:`DiskIndex` changes its fields, under its lock."""

    __slots__ = ("children", "key", "name", "nbytes", "parent")

    def __init__(self, key: bytes, name: str, nbytes: int, parent: bytes | None) -> None:
        #: The tier key (``namespace-dir/key-hex``).
        self.key = key
        #: The file's name in its fan-out directory.
        self.name = name
        #: The file's size: header and payload.
        self.nbytes = nbytes
        #: The tier key of the chunk this one extends (None for a first chunk).
        self.parent = parent
        #: Indexed chunks that extend this one.
        self.children = 0


class DiskIndex:
    """The chunks of a disk tier, their sizes and parents, and LRU eviction among leaves.

    Args:
        capacity: the most bytes the indexed files and the writes in progress may take.

    Thread-safe: one lock, held for O(1) work per chunk.
    """

    def __init__(self, capacity: int) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._entries: dict[bytes, DiskEntry] = {}
        self._leaves: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # cold end first
        self._orphans: dict[bytes, int] = {}  # key not indexed -> indexed chunks naming it their parent
        self._used = 0  # bytes of indexed files
        self._reserved = 0  # bytes of writes in progress

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The most bytes on disk."""
        return self._capacity

    @property
    def used(self) -> int:
        """Bytes of the indexed files now (writes in progress not included)."""
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> DiskEntry | None:
        """The entry of ``key``, or None (a dict read: no lock needed)."""
        return self._entries.get(key)

    def keys(self) -> list[bytes]:
        """The indexed keys (a snapshot, in no particular order)."""
        with self._lock:
            return list(self._entries)

    def leaves(self) -> list[bytes]:
        """The leaves, coldest first (a snapshot: the order eviction takes them in)."""
        with self._lock:
            return list(self._leaves)

    # -- changes ---------------------------------------------------------------------------------------
    def add(
        self, key: bytes, name: str, nbytes: int, parent: bytes | None, *, cold: bool = False
    ) -> DiskEntry:
        """Index a chunk file (found on disk, or just written); return its entry.

        A new leaf goes to the hot end, or the cold end with ``cold``. A key already indexed keeps its
        place in the tree; its size and name are updated, and it is refreshed.
        """
        with self._lock:
            return self._add(key, name, nbytes, parent, cold)

    def commit(self, key: bytes, name: str, nbytes: int, parent: bytes | None) -> DiskEntry:
        """Index a chunk just written with bytes reserved by :meth:`make_room`: the reservation becomes
        the file's. An orphan (its parent not indexed) goes to the cold end."""
        with self._lock:
            self._reserved -= nbytes
            orphan = parent is not None and parent not in self._entries
            return self._add(key, name, nbytes, parent, orphan)

    def release(self, nbytes: int) -> None:
        """Give back a reservation of :meth:`make_room` (the write failed)."""
        with self._lock:
            self._reserved -= nbytes

    def touch(self, key: bytes) -> None:
        """Mark ``key`` used (a leaf moves to the hot end; others keep no recency)."""
        with self._lock:
            if key in self._leaves:
                self._leaves.move_to_end(key)

    def remove(self, key: bytes) -> DiskEntry | None:
        """Forget ``key`` (its file is gone, bad, or being evicted); return its entry, or None."""
        with self._lock:
            return self._remove(key)

    def make_room(self, nbytes: int, protect: bytes | None = None) -> tuple[bool, list[DiskEntry]]:
        """Evict leaves, least recently used first, until ``nbytes`` more fit; reserve them.

        ``protect`` (the parent of the chunk about to be written) is never evicted: the new chunk would
        be an orphan. Returns ``(fits, evicted)``: whether the bytes are reserved now, and the entries
        evicted (already forgotten; the caller deletes their files, even when it does not fit).
        """
        evicted: list[DiskEntry] = []
        with self._lock:
            if nbytes > self._capacity:
                return False, evicted
            while self._used + self._reserved + nbytes > self._capacity:
                victim = next((key for key in self._leaves if key != protect), None)  # skips one at most
                if victim is None:
                    return False, evicted
                entry = self._remove(victim)
                if entry is None:  # pragma: no cover - a leaf is always indexed
                    raise CacheInvariantError(f"disk leaf {victim!r} is not indexed")
                evicted.append(entry)
            self._reserved += nbytes
        return True, evicted

    # -- internals (under the lock) --------------------------------------------------------------------
    def _add(self, key: bytes, name: str, nbytes: int, parent: bytes | None, cold: bool) -> DiskEntry:
        entry = self._entries.get(key)
        if entry is not None:
            self._used += nbytes - entry.nbytes
            entry.nbytes, entry.name = nbytes, name
            if key in self._leaves:
                self._leaves.move_to_end(key)
            return entry
        entry = DiskEntry(key, name, nbytes, parent)
        entry.children = self._orphans.pop(key, 0)
        self._entries[key] = entry
        self._used += nbytes
        if parent is not None:
            above = self._entries.get(parent)
            if above is None:
                self._orphans[parent] = self._orphans.get(parent, 0) + 1
            else:
                if above.children == 0:
                    del self._leaves[parent]
                above.children += 1
        if entry.children == 0:
            self._leaves[key] = None
            if cold:
                self._leaves.move_to_end(key, last=False)
        return entry

    def _remove(self, key: bytes) -> DiskEntry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._used -= entry.nbytes
        if entry.children == 0:
            del self._leaves[key]
        else:
            self._orphans[key] = entry.children  # its children stay; they name a parent not indexed
        parent = entry.parent
        if parent is not None:
            above = self._entries.get(parent)
            if above is None:
                left = self._orphans[parent] - 1
                if left:
                    self._orphans[parent] = left
                else:
                    del self._orphans[parent]
            else:
                above.children -= 1
                if above.children == 0:
                    self._leaves[parent] = None
                    self._leaves.move_to_end(parent, last=False)  # not used since it had children
        return entry


__all__ = ["DiskEntry", "DiskIndex"]
