"""The disk tier: :class:`DiskTier`, one file per chunk in a directory that survives restarts.

It puts together the directory's :class:`~lmcache.disk.files.Layout`, the
:class:`~lmcache.disk.index.DiskIndex`, the :class:`~lmcache.disk.store.ChunkFiles` that keeps the two
in step (the write queue's sink and the streams' host), the write queue
(:class:`~lmcache.tiers.writer.WriteQueue`) and the counters.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmcache.disk.files import Layout, namespace_dir
from lmcache.disk.index import DiskIndex
from lmcache.disk.store import ChunkFiles
from lmcache.disk.stream import DiskStream
from lmcache.errors import ConfigError
from lmcache.tiers.counters import COUNTERS, Counters
from lmcache.tiers.format import HEADER, check_shape, payload_bytes, xxh3
from lmcache.tiers.writer import Write, WriteQueue, checked_write

logger = logging.getLogger("lmcache.disk")

#: How to install what the disk tier needs, for the messages of missing-package errors.
DISK_HINT = "pip install 'lmcache-mempool[disk]'"
#: The disk tier's counters: every tier's, and ``evicted``.
DISK_COUNTERS = (*COUNTERS, "evicted")


@dataclass(frozen=True)
class DiskStats:
    """Counters of a :class:`DiskTier`, since it was built.

    Attributes:
        hits: chunks read and validated.
        misses: chunks asked for and not on disk.
        writes: chunks written (or found written already when their turn came).
        errors: failed filesystem operations (disk full, read-only, vanished directory, I/O error).
        dropped: writes that were never written (queue full, failed write, too big, closed tier).
        corrupt: files rejected (torn, truncated, flipped, foreign, a link or a directory), and removed.
        evicted: files removed to stay within ``size_gib``.
        pending: writes queued now, not yet written or dropped.
        chunks: chunk files indexed now.
        bytes: their bytes (headers included).
    """

    hits: int
    misses: int
    writes: int
    errors: int
    dropped: int
    corrupt: int
    evicted: int
    pending: int
    chunks: int
    bytes: int


@lru_cache(maxsize=256)
def _space(namespace: str) -> str:
    return namespace_dir(namespace)


class DiskTier:
    """A directory of chunk files below the cache's slots: written behind, read into slots, kept across
    restarts, bounded by ``size_gib``.

    Writes (:meth:`submit`) are queued for one writer thread: the queue holds at most ``queue_size``
    writes, and a write that arrives when it is full drops the oldest one (counted in ``dropped``); the
    caller never waits on the disk. Each chunk is one file, written to a temporary name and renamed
    once complete: a reader, or a tier built after a crash, sees a whole chunk or none. Before each
    write the tier evicts its own least recently used leaves until the chunk fits in ``size_gib``.

    A new tier on a directory finds every chunk file in it at construction (one listing per directory
    and one ``lstat`` per file, no payload read) and removes the temporary files of writers that died.

    Faults never raise into the caller: a full disk, a read-only or vanished directory, an I/O error
    count in ``errors`` (and drop the write); a file that fails its checks (truncated, flipped, of
    another key, namespace, dtype or shape, a link, a directory) counts in ``corrupt``, is removed, and
    is a miss. Nothing outside the directory is ever read or removed.

    Args:
        path: the directory (created if missing). One directory serves any number of namespaces (one
            subdirectory each) and processes; the bound holds for the files this tier knows of.
        size_gib: the most GiB of chunk files (headers included) the tier keeps.
        fsync: False (default): a chunk survives the crash of the process at any moment, but a power
            loss may lose recent chunks (they then fail their checksum: a miss, never wrong bytes).
            True: each file is fsynced before its rename and its directory after it, before the write
            counts as done, so a written chunk survives a power loss.
        queue_size: the most writes waiting for the writer thread (their chunks stay pinned in the
            cache until written).
        batch_bytes: the most bytes the cache reads through one :meth:`stream`.

    Raises:
        ConfigError: a bad option, or ``path`` exists and is not a directory.
        BackendUnavailableError: ``xxhash`` is not installed.
    """

    #: The tier's kind: its counters appear in a cache's stats as ``disk_hits`` and so on.
    name = "disk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size_gib: float = 16.0,
        fsync: bool = False,
        queue_size: int = 256,
        batch_bytes: int = 256 << 20,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(f"path must be a directory path (str or os.PathLike), got {path!r}")
        if (
            isinstance(size_gib, bool)
            or not isinstance(size_gib, (int, float))
            or not 0 < size_gib < math.inf
        ):
            raise ConfigError(f"size_gib must be a positive number of GiB, got {size_gib!r}")
        if not isinstance(fsync, bool):
            raise ConfigError(f"fsync must be True or False, got {fsync!r}")
        for label, count in (("queue_size", queue_size), ("batch_bytes", batch_bytes)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{label} must be a positive int, got {count!r}")
        root = os.path.realpath(os.fspath(path))
        if os.path.lexists(root) and not os.path.isdir(root):
            raise ConfigError(f"disk tier path {root!r} exists and is not a directory; pass a directory")
        xxh3("the disk tier", DISK_HINT)  # xxhash missing: BackendUnavailableError now, not at a write
        self._layout = Layout(root)
        self._size_gib = float(size_gib)
        self._fsync = fsync
        self._queue_size = queue_size
        self._batch_bytes = batch_bytes
        self._counters = Counters(DISK_COUNTERS, tier="disk")
        self._index = DiskIndex(int(size_gib * 2**30))
        self._files = ChunkFiles(self._layout, self._index, self._counters, fsync=fsync)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:  # read-only or unreachable: the tier runs empty and counts its errors
            self._files.failed("create the directory", exc)
        self._files.restore()
        self._queue = WriteQueue(
            self._files,
            self._counters,
            queue_size=queue_size,
            batch_bytes=0,  # one chunk per batch: each is its own file
            logger=logger,
            drop_queued_on_failure=False,  # a failed write says little about the next (eviction frees room)
        )

    # -- properties ------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The directory, resolved (``os.path.realpath``) when the tier was built."""
        return self._layout.root

    @property
    def size_gib(self) -> float:
        """The most GiB of chunk files kept; fixed when the tier is built."""
        return self._size_gib

    @property
    def fsync(self) -> bool:
        """Whether each write is fsynced (file and directory) before it counts as done."""
        return self._fsync

    @property
    def queue_size(self) -> int:
        """The most writes waiting for the writer; fixed when the tier is built."""
        return self._queue_size

    @property
    def batch_bytes(self) -> int:
        """The most bytes the cache reads through one stream; fixed when the tier is built."""
        return self._batch_bytes

    @property
    def layout(self) -> Layout:
        """The directory's layout (paths, checked)."""
        return self._layout

    def __len__(self) -> int:
        """Chunk files indexed now."""
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        """Whether the tier key ``key`` is indexed now (its file may still turn out missing or bad)."""
        return key in self._index

    def keys(self) -> list[bytes]:
        """The tier keys indexed now, in no particular order (a snapshot)."""
        return self._index.keys()

    def file_path(self, key: bytes) -> str:
        """The path of the indexed chunk ``key``'s file (for diagnostics and benchmarks).

        Raises:
            ConfigError: ``key`` is not indexed (or not a key of this tier).
        """
        path = self._files.file_path(key)
        if path is None:
            raise ConfigError(f"disk chunk {key!r} is not on disk (not indexed)")
        return path

    # -- keys ------------------------------------------------------------------------------------------
    def key(self, namespace: str, chunk_key: bytes) -> bytes:
        """The tier key of a chunk: its namespace's directory, ``/``, the chunk key in hex."""
        return f"{_space(namespace)}/{chunk_key.hex()}".encode("ascii")

    # -- writes ----------------------------------------------------------------------------------------
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
        """Queue a write of ``payload`` (a C-contiguous buffer of ``dtype`` and ``shape``) under ``key``.

        Returns at once; the payload's memory must stay unchanged until ``on_done(written)`` is called
        (by the writer thread, or here when the write is refused, displaces an older one, or is not
        needed: a chunk already on disk, its file still there by one ``lstat``, is refreshed, not
        written again). ``parent`` is the tier key of
        the chunk this one extends: eviction takes only leaves, and never the parent of the chunk being
        written.

        Raises:
            ConfigError: a key that is not this tier's, or a payload that does not match ``dtype`` and
                ``shape`` (nothing is queued).
        """
        write = self._checked(key, payload, dtype, shape, on_done, parent)
        if self._files.still_on_disk(key):
            self._index.touch(key)
            if on_done is not None:
                on_done(True)
            return
        self._queue.submit(write)

    def write(
        self, key: bytes, payload: Any, dtype: str, shape: Sequence[int], *, parent: bytes | None = None
    ) -> bool:
        """Write one chunk now, from the calling thread (bypassing the queue, always writing); True when
        it was written. A failure is counted and returns False; nothing raises but invalid arguments."""
        written = self._files.store(self._checked(key, payload, dtype, shape, None, parent), again=True)
        if written:
            self._counters.add("writes")
        return written

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was written or dropped; False if ``timeout`` seconds passed first."""
        return self._queue.flush(timeout)

    def _checked(
        self,
        key: bytes,
        payload: Any,
        dtype: str,
        shape: Sequence[int],
        on_done: Callable[[bool], None] | None,
        parent: bytes | None,
    ) -> Write:
        space, _ = self._layout.split(key)
        if parent is not None and self._layout.split(parent)[0] != space:
            raise ConfigError(f"parent {parent!r} is in another namespace than {key!r}")
        return checked_write(key, payload, dtype, shape, on_done, parent)

    # -- reads -----------------------------------------------------------------------------------------
    def probe(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each key's file is indexed with the size of a chunk of its shape; no file is opened.

        A key not indexed is looked for on disk (a chunk another process wrote: one listing of its
        fan-out directory, or one ``lstat`` when the directory has not changed since it was listed)
        until the first key found nowhere; the keys after it answer False without a look. A True
        promises nothing: the file may be evicted or fail its checksum before it is read.
        """
        if len(keys) != len(shapes):
            raise ConfigError(f"probe got {len(keys)} keys but {len(shapes)} shapes")
        want = [HEADER.size + payload_bytes(dtype, check_shape(s)) for s in shapes]
        flags = []
        look = True
        for key, size in zip(keys, want, strict=True):
            self._layout.split(key)
            entry = self._files.locate(key, learn=look)
            found = entry is not None and entry.nbytes == size
            look = look and found
            flags.append(found)
        return flags

    def stream(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> DiskStream:
        """Start reading ``keys`` (expected ``shapes``): :meth:`DiskStream.hit`, then
        :meth:`DiskStream.read_into` a slot. Use it as a context manager."""
        if len(keys) != len(shapes):
            raise ConfigError(f"stream got {len(keys)} keys but {len(shapes)} shapes")
        for key in keys:
            self._layout.split(key)
        return DiskStream(self._files, list(keys), dtype, [check_shape(s) for s in shapes])

    # -- lifecycle -------------------------------------------------------------------------------------
    def stats(self) -> DiskStats:
        """The counters, with the writes pending now and the files indexed."""

        def build(pending: int) -> DiskStats:
            return DiskStats(
                **self._counters.counts(), pending=pending, chunks=len(self._index), bytes=self._index.used
            )

        return self._queue.snapshot(build)

    def close(self, timeout: float = 1.0) -> None:
        """Write what is queued for at most ``timeout`` seconds, then stop the writer and drop the rest.
        The files stay: a new tier on the directory finds them. Idempotent."""
        deadline = time.monotonic() + timeout
        if not self._queue.closed:
            self._queue.flush(timeout)
        self._queue.stop()
        self._queue.join(deadline - time.monotonic())

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DiskTier({self._layout.root!r}, size_gib={self._size_gib:g}, fsync={self._fsync}, "
            f"{len(self._index)} chunks)"
        )


__all__ = ["DISK_COUNTERS", "DISK_HINT", "DiskStats", "DiskTier"]
