"""Reading chunk files straight into slots: :class:`DiskStream`.

For the key at ``index``, :meth:`DiskStream.hit` opens its file (never through a symbolic link) and
checks the header against the dtype and shape the reader expects and against the file's size; then
:meth:`DiskStream.read_into` reads the payload with ``preadv`` straight into the caller's buffer (a pool
slot), hashing each 256 KiB piece right after it lands, while it is still in the CPU's cache, and
checks the checksum. A stream touches its tier only through :class:`DiskHost`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from typing import Any, Protocol

from lmcache.disk.files import Layout
from lmcache.disk.index import DiskEntry
from lmcache.errors import ConfigError, RemoteValueError
from lmcache.tiers.format import HEADER, byte_view, check_digest, check_header, payload_bytes, payload_hasher

logger = logging.getLogger("lmcache.disk")

#: Bytes read (and then hashed) at a time: small enough to be hashed from the CPU's cache. For 32 MiB
#: chunks from the page cache, interleaved, best of 15 (2-CPU VM, 2026-12-02): 256 KiB pieces 0.86x of
#: a plain read; 128 KiB and 512 KiB-1 MiB 0.77-0.79x; 64 KiB and 4 MiB 0.69x.
PIECE_BYTES = 256 << 10


class DiskHost(Protocol):
    """What a :class:`DiskStream` needs from its tier (:class:`~lmcache.disk.DiskTier` implements it).

    The stream reads and reports; only the tier changes the tier's state (its index and counters).
    """

    @property
    def layout(self) -> Layout:
        """The tier's directory layout."""
        ...

    def locate(self, key: bytes, *, learn: bool) -> DiskEntry | None:
        """The index entry of ``key``; with ``learn``, a key not indexed is looked for on disk (a file
        another process wrote since the tier was built)."""
        ...

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (``hits``, ``misses`` ...)."""
        ...

    def used(self, key: bytes, fd: int) -> None:
        """``key`` was read and checked from the open file ``fd``: refresh its recency."""
        ...

    def vanished(self, key: bytes) -> None:
        """``key``'s file is gone (evicted by another process, or the directory removed): forget it."""
        ...

    def reject(self, key: bytes, entry: DiskEntry, info: os.stat_result | None, reason: str) -> None:
        """``key``'s file is bad: count it, forget it, remove it (only if it is still ``info``)."""
        ...

    def failed(self, operation: str, exc: OSError) -> None:
        """An operation failed for a reason of the filesystem's: count it."""
        ...


class DiskStream:
    """The chunk files of some keys, read in order, payloads into caller buffers.

    Indices only go forward. The stream ends (every later call answers False) at the first miss,
    rejected file or failure; the tier's counters count each. Use it as a context manager (or call
    :meth:`close`) to close the file still open.
    """

    def __init__(self, host: DiskHost, keys: list[bytes], dtype: str, dims: list[tuple[int, ...]]) -> None:
        self._host = host
        self._keys = keys
        self._dtype = dtype
        self._dims = dims
        self._index = -1
        self._fd = -1
        self._entry: DiskEntry | None = None
        self._info: os.stat_result | None = None
        self._header = bytearray(HEADER.size)
        self._checksum = 0
        self._done = not keys

    def hit(self, index: int) -> bool:
        """Open the file of ``keys[index]`` and check its header; True when it holds a chunk of this
        key's dtype and shape, whose payload :meth:`read_into` reads next."""
        if self._done or not self._index < index < len(self._keys):
            return self._end()
        self._close_file()
        self._index = index
        key = self._keys[index]
        host = self._host
        entry = host.locate(key, learn=True)  # not indexed: looked for on disk (another process's)
        if entry is None:
            host.count("misses")
            return self._end()
        space, hex_key = host.layout.split(key)
        try:
            fd = host.layout.open(space, hex_key, entry.name)
        except FileNotFoundError:
            host.vanished(key)
            return self._end()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                host.reject(key, entry, None, "a symbolic link where a chunk file should be")
            else:
                host.failed("open", exc)
            return self._end()
        self._fd, self._entry = fd, entry
        try:
            self._info = info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RemoteValueError("a directory (or device) where a chunk file should be")
            got = os.preadv(fd, [memoryview(self._header)], 0)
            if got < HEADER.size:
                raise RemoteValueError(
                    f"file of {info.st_size} bytes is shorter than the {HEADER.size}-byte header"
                )
            self._checksum = check_header(self._header, info.st_size, self._dtype, self._dims[index])
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except RemoteValueError as exc:
            return self._reject(str(exc))
        except OSError as exc:
            host.failed("read", exc)
            return self._end()
        return True

    def read_into(self, destination: Any) -> bool:
        """Read the payload announced by :meth:`hit` into ``destination`` (a C-contiguous buffer of
        exactly the chunk's bytes) and check its checksum; True when the bytes there are the chunk's.

        On False the destination holds garbage: do not use it.

        Raises:
            ConfigError: ``destination`` has another size than the chunk.
        """
        if self._done or self._fd < 0:
            return False
        view = byte_view(destination)
        key = self._keys[self._index]
        if view.nbytes != payload_bytes(self._dtype, self._dims[self._index]):
            raise ConfigError(f"destination has {view.nbytes} bytes; the chunk has a different size")
        hasher = payload_hasher(key, self._header)
        update, read, fd = hasher.update, os.preadv, self._fd
        position, total = 0, view.nbytes
        try:
            while position < total:
                piece = view[position : position + PIECE_BYTES]
                got = read(fd, [piece], HEADER.size + position)
                if got <= 0:
                    raise RemoteValueError("file ended before its payload (truncated while read)")
                update(piece[:got])
                position += got
            check_digest(hasher, self._checksum)
        except RemoteValueError as exc:
            return self._reject(str(exc))
        except OSError as exc:
            self._host.failed("read", exc)
            return self._end()
        self._host.count("hits")
        self._host.used(key, fd)
        self._close_file()
        return True

    def close(self) -> None:
        """End the stream and close the file still open."""
        self._done = True
        self._close_file()

    def _reject(self, reason: str) -> bool:
        entry, info = self._entry, self._info
        self._close_file()
        if entry is not None:
            self._host.reject(self._keys[self._index], entry, info, reason)
        return self._end()

    def _end(self) -> bool:
        self.close()
        return False

    def _close_file(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._entry = self._info = None

    def __enter__(self) -> DiskStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PIECE_BYTES", "DiskHost", "DiskStream"]
