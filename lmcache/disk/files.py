"""The disk tier's directory: names, the atomic write, the scan at start, and safe removal.

Layout under the tier's root (resolved once, when the tier is built)::

    <root>/<namespace dir>/<fan-out>/<key hex>.<parent key hex | root>.kv    a chunk
    <root>/<namespace dir>/<fan-out>/.<key hex>.<pid>.<n>.tmp               a write in progress

The namespace directory is a readable slug of the namespace and 16 hex digits of its ``blake2b``, so
caches of several namespaces share one root without mixing; the fan-out directory is the key's first
two hex digits (256 per namespace), so no directory grows long. A file holds the value format of
:mod:`lmcache.tiers.format` (the 64-byte header, then the payload); its checksum covers the tier key
(``<namespace dir>/<key hex>``), so a file moved to another name or namespace fails it.

A chunk is written to a temporary name in its fan-out directory and renamed over its final name once
complete, so a reader (or a tier built after a crash) sees either the whole chunk or nothing. With
``fsync`` the file is fsynced before the rename and the directory after it.

Nothing here follows a symbolic link or touches a path outside the root (resolved once, when the tier
is built): before a write or a removal the root and the directories below it on the way are checked
with ``lstat`` (each must be a directory, not a link); a file is opened with ``O_NOFOLLOW`` and the path
the kernel opened is read back and compared; a bad file is removed with ``unlink`` (which removes a
link, never its target).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import blake2b

from lmcache.errors import ConfigError

_HEX = r"[0-9a-f]{2,128}"
#: A chunk file's name: key, parent (or ``root``), ``.kv``.
CHUNK_NAME = re.compile(rf"({_HEX})\.({_HEX}|root)\.kv")
#: A temporary file's name: key, writer's pid, a number, ``.tmp``.
TEMP_NAME = re.compile(rf"\.({_HEX})\.(\d+)\.(\d+)\.tmp")
#: A namespace directory's name: a slug of the namespace, ``.``, 16 hex digits of its digest.
NAMESPACE_DIR = re.compile(r"[A-Za-z0-9_-]{1,32}\.[0-9a-f]{16}")
_FANOUT = re.compile(r"[0-9a-f]{2}")
_KEY = re.compile(_HEX)
#: A temporary file older than this (seconds) is stale even when its pid is alive (another host's).
STALE_TEMP_SECONDS = 3600.0
_numbers = itertools.count()  # temporary names, unique within the process across tiers
_PROC_FD = os.path.isdir("/proc/self/fd")  # Linux: the path of an open file can be read back


def namespace_dir(namespace: str) -> str:
    """The directory name of ``namespace``: a slug (for people) and 16 hex digits of its digest."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", namespace)[:32].strip("_") or "default"
    digest = blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{slug}.{digest}"


def chunk_name(key_hex: str, parent_hex: str | None) -> str:
    """The file name of a chunk: its key, its parent's (``root`` for a first chunk)."""
    return f"{key_hex}.{parent_hex or 'root'}.kv"


@dataclass(frozen=True)
class Found:
    """A chunk file found by a scan: its tier key, name, size, parent's tier key, age."""

    key: bytes
    name: str
    nbytes: int
    parent: bytes | None
    mtime_ns: int


@dataclass
class Scan:
    """What a scan found: chunk files, paths named like chunks that are no regular file (to remove),
    stale temporary files removed, and directories that could not be read."""

    found: list[Found]
    bad: list[str]
    temps_removed: int = 0
    errors: int = 0


class Layout:
    """Paths of a tier's root, checked: every key is validated, no path leaves the root.

    Args:
        root: the tier's directory, resolved (``os.path.realpath``).
    """

    def __init__(self, root: str) -> None:
        #: The root, resolved once (``os.path.realpath``); every path here is under it.
        self.root = root
        self._prefix = root.rstrip("/") + "/"

    # -- keys and paths --------------------------------------------------------------------------------
    def split(self, key: bytes) -> tuple[str, str]:
        """``(namespace dir, key hex)`` of a tier key.

        Raises:
            ConfigError: not a key of this layout (``DiskTier.key`` makes them).
        """
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else ""
        space, _, hex_key = text.partition("/")
        if not (NAMESPACE_DIR.fullmatch(space) and _KEY.fullmatch(hex_key)):
            raise ConfigError(f"{key!r} is not a disk tier key; make keys with DiskTier.key(namespace, key)")
        return space, hex_key

    def directory(self, space: str, hex_key: str) -> str:
        """The fan-out directory of a key."""
        return f"{self._prefix}{space}/{hex_key[:2]}"

    def safe(self, directory: str) -> bool:
        """Whether ``directory`` (a fan-out directory of this root, or the namespace directory above
        one) is reached without a symbolic link, so a name in it is inside the root: the root and each
        directory below it on the way are directories (``lstat``: not links), or do not exist yet."""
        if not directory.startswith(self._prefix):
            return False
        paths = [self.root]
        built = self._prefix[:-1]
        for part in directory[len(self._prefix) :].split("/"):
            built = f"{built}/{part}"
            paths.append(built)
        for path in paths:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return True  # made later, by os.makedirs: real directories
            except OSError:
                return False
            if not stat.S_ISDIR(mode):
                return False
        return True

    # -- writes ----------------------------------------------------------------------------------------
    def write(self, space: str, hex_key: str, name: str, fill: Callable[[int], None], fsync: bool) -> None:
        """Write the file ``name`` of a key: ``fill(fd)`` writes a temporary file, which is then renamed
        over the name (with ``fsync``: the file fsynced before, the directory after).

        Raises:
            OSError: the write failed (full, read-only, vanished ...); the temporary file is removed.
        """
        directory = self.directory(space, hex_key)
        if not self.safe(directory):
            raise OSError(errno.ELOOP, "a directory on the way is a symbolic link", directory)
        temp = f"{directory}/.{hex_key}.{os.getpid()}.{next(_numbers)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o644)
        except FileNotFoundError:  # a new fan-out directory (or the root vanished): make it, once
            self._make_dirs(directory, fsync)
            fd = os.open(temp, flags, 0o644)
        try:
            try:
                fill(fd)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, f"{directory}/{name}")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if fsync:
            fsync_directory(directory)

    def _make_dirs(self, directory: str, fsync: bool) -> None:
        """Make a fan-out directory (and the namespace directory and root above it, if missing)."""
        missing = []
        path = directory
        while not os.path.isdir(path) and path != self.root:
            missing.append(path)
            path = os.path.dirname(path)
        if not os.path.isdir(self.root):
            missing.append(self.root)
        os.makedirs(directory, exist_ok=True)
        if not self.safe(directory):
            raise OSError(errno.ELOOP, "a directory on the way is a symbolic link", directory)
        if fsync:  # the new directories' names must survive a power loss too
            for made in missing:
                fsync_directory(os.path.dirname(made))

    # -- reads and removal -----------------------------------------------------------------------------
    def open(self, space: str, hex_key: str, name: str) -> int:
        """Open a chunk file for reading, never through a symbolic link: the last component is opened
        with ``O_NOFOLLOW``, and the path the kernel opened (``/proc/self/fd``) must be the one the
        layout names (so no directory on the way was a link); where there is no ``/proc``, the
        directories are checked first (:meth:`safe`).

        Raises:
            OSError: as ``os.open``; ``ELOOP`` for a link anywhere on the way; ``ENOENT`` when the file
                was removed or replaced right after it was opened.
        """
        directory = self.directory(space, hex_key)
        path = f"{directory}/{name}"
        if not _PROC_FD and not self.safe(directory):
            raise OSError(errno.ELOOP, "a directory on the way is a symbolic link", directory)
        # O_NONBLOCK: a FIFO put where a chunk file should be must not block the open (no effect on a
        # regular file).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        if _PROC_FD:
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                opened = path
            if opened != path:
                os.close(fd)
                if opened.endswith(" (deleted)"):  # evicted or replaced meanwhile: not a bad file
                    raise FileNotFoundError(errno.ENOENT, "removed while opened", path)
                raise OSError(errno.ELOOP, "a directory on the way is a symbolic link", path)
        return fd

    def remove(self, space: str, hex_key: str, name: str, same_as: os.stat_result | None = None) -> bool:
        """Remove a chunk's path (a file, a link, a directory where a file should be), never anything
        outside the root; with ``same_as``, only if it is still that file (a writer may have renamed a
        good one over it since). True when something was removed."""
        directory = self.directory(space, hex_key)
        if not self.safe(directory):
            return False
        path = f"{directory}/{name}"
        try:
            info = os.lstat(path)
            if same_as is not None and (info.st_ino, info.st_dev) != (same_as.st_ino, same_as.st_dev):
                return False
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)  # fd-based: never follows a link inside
            else:
                os.unlink(path)  # a link is removed, never its target
        except FileNotFoundError:
            return False
        return True

    # -- scans -----------------------------------------------------------------------------------------
    def scan(self) -> Scan:
        """Every chunk file under the root: one directory listing per directory and one ``lstat`` per
        file, no payload read. Removes stale temporary files (left by a writer that died)."""
        result = Scan([], [])
        for space in self._listing(self.root, result):
            if not (NAMESPACE_DIR.fullmatch(space.name) and space.is_dir(follow_symlinks=False)):
                continue
            for fan in self._listing(space.path, result):
                if _FANOUT.fullmatch(fan.name) and fan.is_dir(follow_symlinks=False):
                    self._scan_directory(space.name, fan, result, None)
        return result

    def scan_key(self, space: str, hex_key: str) -> Scan:
        """The files of one key (written since the last scan, by another process): one listing of its
        fan-out directory."""
        result = Scan([], [])
        directory = self.directory(space, hex_key)
        if not self.safe(directory):
            return result
        entries = list(self._listing(directory, result))
        self._scan_entries(space, hex_key[:2], directory, entries, result, hex_key)
        return result

    def _scan_directory(self, space: str, fan: os.DirEntry[str], result: Scan, only: str | None) -> None:
        self._scan_entries(space, fan.name, fan.path, list(self._listing(fan.path, result)), result, only)

    def _scan_entries(
        self,
        space: str,
        fan: str,
        directory: str,
        entries: list[os.DirEntry[str]],
        result: Scan,
        only: str | None,
    ) -> None:
        now = time.time()
        for entry in entries:
            name = entry.name
            match = CHUNK_NAME.fullmatch(name)
            if match is not None:
                hex_key, parent = match.group(1), match.group(2)
                if hex_key[:2] != fan or (only is not None and hex_key != only):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # evicted meanwhile
                if not stat.S_ISREG(info.st_mode):
                    result.bad.append(os.path.join(directory, name))
                    continue
                result.found.append(
                    Found(
                        f"{space}/{hex_key}".encode("ascii"),
                        name,
                        info.st_size,
                        None if parent == "root" else f"{space}/{parent}".encode("ascii"),
                        info.st_mtime_ns,
                    )
                )
            elif (
                only is None
                and (temp := TEMP_NAME.fullmatch(name)) is not None
                and _stale(entry, int(temp.group(2)), now)
            ):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    result.temps_removed += 1

    def _listing(self, directory: str, result: Scan) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as entries:
                yield from list(entries)
        except FileNotFoundError:
            return
        except OSError:
            result.errors += 1


def _stale(entry: os.DirEntry[str], pid: int, now: float) -> bool:
    """Whether a temporary file's writer is gone: its pid is not alive here, or it is an hour old."""
    try:
        if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
            return True
    except OSError:
        return False
    if pid == os.getpid():
        return False  # this process's own write in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def write_all(fd: int, buffer: memoryview | bytes, offset: int) -> None:
    """Write every byte of ``buffer`` to ``fd`` at ``offset`` (``os.pwritev``, again after a short
    write)."""
    view = memoryview(buffer).cast("B")
    while view.nbytes:
        written = os.pwritev(fd, [view], offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        view = view[written:]
        offset += written


def fsync_directory(directory: str) -> None:
    """fsync a directory, so the names created or renamed in it survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "CHUNK_NAME",
    "NAMESPACE_DIR",
    "STALE_TEMP_SECONDS",
    "TEMP_NAME",
    "Found",
    "Layout",
    "Scan",
    "chunk_name",
    "fsync_directory",
    "namespace_dir",
    "write_all",
]
