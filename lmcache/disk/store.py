"""The chunk files of one disk tier: :class:`ChunkFiles` keeps its index in step with its directory.

It writes a chunk's file (evicting leaves for room first), finds files other processes wrote, forgets
files found gone, removes bad ones, and rebuilds the index from the directory when the tier is built.
It is the :class:`~lmcache.tiers.writer.WriteSink` of the tier's write queue and the
:class:`~lmcache.disk.stream.DiskHost` of its streams; :class:`~lmcache.disk.DiskTier` puts it together
with them. It changes the index and the counters only through their own methods (each takes its own
lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable

from lmcache.disk.files import Found, Layout, chunk_name, write_all
from lmcache.disk.index import DiskEntry, DiskIndex
from lmcache.tiers.counters import Counters
from lmcache.tiers.format import HEADER, finish_header, start_header
from lmcache.tiers.writer import Write

logger = logging.getLogger("lmcache.disk")

#: Bytes hashed and then written at a time: the hash leaves them in the CPU's cache for the kernel's
#: copy. For 32 MiB chunks, interleaved, best of 15 (2-CPU VM, 2026-12-02): 512 KiB pieces 0.86x of
#: a plain write, 256 KiB, 1 MiB and 2 MiB 0.80-0.81x.
WRITE_PIECE_BYTES = 512 << 10
#: A directory whose modification time is this much older than a listing of it is settled: a later
#: change gets a later time (file times tick in milliseconds).
SETTLED_NS = 1_000_000_000


class ChunkFiles:
    """A tier's directory and its index, kept in step.

    Args:
        layout: the directory's layout.
        index: the tier's index (the bound is its capacity).
        counters: the tier's counters.
        fsync: fsync each file before its rename and its directory after.
    """

    def __init__(self, layout: Layout, index: DiskIndex, counters: Counters, *, fsync: bool) -> None:
        self._layout = layout
        self._index = index
        self._counters = counters
        self._fsync = fsync
        # fan-out directory -> its mtime when a listing of it found it settled (changed over a second
        # before): while its mtime is unchanged, a key not indexed is not there either.
        self._settled: dict[str, int] = {}

    @property
    def layout(self) -> Layout:
        """The directory's layout."""
        return self._layout

    def file_path(self, key: bytes) -> str | None:
        """The path of the indexed chunk ``key``'s file; None when it is not indexed."""
        entry = self._index.get(key)
        if entry is None:
            return None
        space, hex_key = self._layout.split(key)
        return f"{self._layout.directory(space, hex_key)}/{entry.name}"

    # -- writes ----------------------------------------------------------------------------------------
    def store(self, write: Write, *, again: bool = False) -> bool:
        """Write one chunk file (evicting leaves for room first); True when it is on disk. Without
        ``again``, a chunk whose file is still there is not written again."""
        key, parent = write.key, write.parent
        if not again and self.still_on_disk(key):
            return True  # written meanwhile (the same chunk queued twice)
        space, hex_key = self._layout.split(key)
        name = chunk_name(hex_key, None if parent is None else self._layout.split(parent)[1])
        nbytes = HEADER.size + write.payload.nbytes
        fits, evicted = self._index.make_room(nbytes, protect=parent)
        self.delete(evicted)
        if not fits:
            logger.debug(
                "disk chunk %s of %d bytes does not fit in %d bytes", hex_key, nbytes, self._index.capacity
            )
            return False
        try:
            self._layout.write(space, hex_key, name, _filler(write), self._fsync)
        except OSError as exc:
            self._index.release(nbytes)
            self.failed("write", exc)
            return False
        self._index.commit(key, name, nbytes, parent)
        return True

    def still_on_disk(self, key: bytes) -> bool:
        """Whether ``key`` is indexed and its file is still there with its size (one ``lstat``; another
        process may have evicted or removed it). A file found gone is forgotten."""
        entry = self._index.get(key)
        path = self.file_path(key)
        if entry is None or path is None:
            return False
        try:
            info = os.lstat(path)
        except OSError:
            self._index.remove(key)
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size == entry.nbytes

    def delete(self, evicted: list[DiskEntry]) -> None:
        """Remove evicted chunks' files (already forgotten by the index)."""
        for entry in evicted:
            space, hex_key = self._layout.split(entry.key)
            try:
                self._layout.remove(space, hex_key, entry.name)
            except OSError as exc:
                self.failed("evict", exc)
        if evicted:
            self._counters.add("evicted", len(evicted))

    # -- what the write queue needs (WriteSink) ---------------------------------------------------------
    def backoff_left(self) -> float:
        """0.0: a disk is always worth trying (a failed write costs little and says little)."""
        return 0.0

    def send(self, batch: list[Write]) -> bool:
        """Write the queued chunk(s) of ``batch``; True when every one is on disk."""
        return all([self.store(write) for write in batch])

    def cut_off(self) -> bool:
        """A file write cannot be cut off: False (``close`` returns anyway; the thread is a daemon)."""
        return False

    # -- what a DiskStream needs (DiskHost) -------------------------------------------------------------
    def locate(self, key: bytes, *, learn: bool) -> DiskEntry | None:
        """The entry of ``key``; with ``learn``, a key not indexed is looked for in its fan-out
        directory (written by another process since this tier was built) and indexed if found.

        The look is one listing of the directory, or just its ``lstat`` when the directory has not
        changed since a listing that found it settled (a miss of a cold prompt costs one system call).
        """
        entry = self._index.get(key)
        if entry is not None or not learn:
            return entry
        space, hex_key = self._layout.split(key)
        directory = self._layout.directory(space, hex_key)
        try:
            changed = os.lstat(directory).st_mtime_ns
        except OSError:
            return None  # no such directory (yet): nothing there
        if self._settled.get(directory) == changed:
            return None  # not changed since a listing that found it settled: one lstat per miss
        listed = time.time_ns()
        scan = self._layout.scan_key(space, hex_key)
        # File times tick coarsely (a few ms): trust an unchanged time only from a listing made well
        # after the last change, so a change in the same tick as the listing still shows as new.
        if listed - changed > SETTLED_NS:
            self._settled[directory] = changed
        else:
            self._settled.pop(directory, None)
        self._counters.add("errors", scan.errors)
        self.remove_bad(scan.bad)
        for found in scan.found:
            entry = self._index.add(found.key, found.name, found.nbytes, found.parent)
        return entry

    def count(self, name: str) -> None:
        """Add one to the counter ``name``."""
        self._counters.add(name)

    def used(self, key: bytes, fd: int) -> None:
        """Refresh ``key``: in the index, and its file's modification time (the order a restarted tier
        evicts in); a file this process may not touch keeps its time."""
        self._index.touch(key)
        with contextlib.suppress(OSError):
            os.utime(fd)

    def vanished(self, key: bytes) -> None:
        """Forget ``key`` (its file is gone): a miss."""
        self._index.remove(key)
        self._counters.add("misses")

    def reject(self, key: bytes, entry: DiskEntry, info: os.stat_result | None, reason: str) -> None:
        """Count, forget and remove a bad file (only if it is still the file that was checked)."""
        logger.warning("disk chunk file %s rejected: %s", entry.name, reason)
        self._counters.add("corrupt")
        self._index.remove(key)
        space, hex_key = self._layout.split(key)
        try:
            self._layout.remove(space, hex_key, entry.name, same_as=info)
        except OSError as exc:
            self.failed("remove a bad file", exc)

    def failed(self, operation: str, exc: OSError) -> None:
        """Count a failed filesystem operation (logged at warning level)."""
        self._counters.add("errors")
        logger.warning("disk tier %s failed to %s: %s", self._layout.root, operation, exc)

    # -- start -----------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Index every chunk file in the directory (no payload read), oldest first, orphans coldest;
        then evict down to the bound (it may have been lowered since)."""
        start = time.perf_counter()
        scan = self._layout.scan()
        self._counters.add("errors", scan.errors)
        self.remove_bad(scan.bad)
        keys = {found.key for found in scan.found}
        orphans = [f for f in scan.found if f.parent is not None and f.parent not in keys]
        rest = [f for f in scan.found if f.parent is None or f.parent in keys]
        for found in sorted(orphans, key=_age) + sorted(rest, key=_age):
            self._index.add(found.key, found.name, found.nbytes, found.parent)
        _, evicted = self._index.make_room(0)
        self.delete(evicted)
        logger.info(
            "disk tier %s: %d chunks (%d bytes) found in %.1f ms; %d stale temporary files removed",
            self._layout.root,
            len(self._index),
            self._index.used,
            (time.perf_counter() - start) * 1e3,
            scan.temps_removed,
        )

    def remove_bad(self, paths: list[str]) -> None:
        """Remove paths named like chunk files that are no regular file (links, directories)."""
        for path in paths:
            directory, name = os.path.split(path)
            space = os.path.basename(os.path.dirname(directory))
            hex_key = name.partition(".")[0]
            logger.warning("disk chunk path %s rejected: not a regular file", path)
            self._counters.add("corrupt")
            try:
                self._layout.remove(space, hex_key, name)
            except OSError as exc:
                self.failed("remove a bad file", exc)


def _filler(write: Write) -> Callable[[int], None]:
    """What writes ``write``'s file into an open temporary file: the payload piece by piece, each piece
    hashed right before it is written (still in the CPU's cache for the kernel's copy), then the header
    with the checksum at offset 0."""

    def fill(fd: int) -> None:
        blank, hasher = start_header(write.key, write.dtype, write.shape)
        payload, update = write.payload, hasher.update
        for start in range(0, payload.nbytes, WRITE_PIECE_BYTES):
            piece = payload[start : start + WRITE_PIECE_BYTES]
            update(piece)
            write_all(fd, piece, HEADER.size + start)
        write_all(fd, finish_header(blank, hasher), 0)

    return fill


def _age(found: Found) -> int:
    return found.mtime_ns


__all__ = ["SETTLED_NS", "WRITE_PIECE_BYTES", "ChunkFiles"]
