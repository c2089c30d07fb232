"""The host memory that vLLM's scheduler and its workers share: one named file in ``/dev/shm``.

vLLM builds an offloading spec once per connector role: the scheduler's spec runs the manager (which
slots hold which chunk), each worker's spec runs the copies into those slots. They are different
objects, and with more than one worker (``MultiprocExecutor``) in different processes; workers register
their KV caches before the scheduler is built. So the pool's arena cannot be private memory of either
side: both map the same file, named after the engine (``engine_id`` is distinct per vLLM instance and
data-parallel rank), whichever opens it first creating it at the exact size both sides compute from the
same config. This is what vLLM's own CPU tier does (``SharedOffloadRegion``,
``/dev/shm/vllm_offload_<engine_id>.mmap``).

Every process holds a shared ``flock`` on the file while it uses the region; :meth:`HostRegion.close`
(the manager's or a worker's shutdown) removes the file's name when no other process holds it, so the
region outlives any one side and goes with the last (mappings stay valid after the name is gone). A
process killed before its shutdown leaves the file behind, as vLLM's region does without its barrier:
remove it by hand, or let it be reused, since the next engine with that ``engine_id`` and geometry
opens it as is (its bytes are never read: the manager starts with an empty index).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from hashlib import blake2b

from lmcache.errors import ConfigError
from lmcache.hostmem import check_host_capacity
from lmcache.shared.memory import map_shared

#: Where the regions live: a tmpfs, so the file is memory, never written to a disk.
SHM_DIR = "/dev/shm"


def region_path(engine_id: str) -> str:
    """The path of the region of ``engine_id`` (hashed: any string names a file safely)."""
    digest = blake2b(engine_id.encode(), digest_size=12).hexdigest()
    return os.path.join(SHM_DIR, f"lmcache_vllm_{digest}")


class HostRegion:
    """``nbytes`` of shared memory at ``path``, created by the first process that opens it.

    Args:
        path: the file (see :func:`region_path`).
        nbytes: its size; a process that finds the file at another size refuses it.

    Attributes:
        array: the whole mapping as a writable ``uint8`` numpy array (what a pool adopts).

    Raises:
        ConfigError: the file exists at another size (another engine's, or a stale one), or cannot be
            opened or mapped.
        PoolTooLargeError: this process creates it and the machine has less memory available.
    """

    def __init__(self, path: str, nbytes: int) -> None:
        if nbytes <= 0:
            raise ConfigError(f"a host region needs a positive size, got {nbytes} bytes")
        self.path = path
        self.nbytes = nbytes
        self._fd = _open_locked(path)
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:  # this process made it (or races the other side to size it: same size)
                check_host_capacity(nbytes, "vLLM offload host region")
                os.ftruncate(self._fd, nbytes)
            elif size != nbytes:
                raise ConfigError(
                    f"the shared host region {path} has {size} bytes, this engine needs {nbytes}: it "
                    "belongs to another engine with the same engine_id, or a crashed run left it; remove "
                    "the file or give this engine another engine_id"
                )
            self._mapping, self.array = map_shared(self._fd, nbytes)
        except OSError as exc:
            os.close(self._fd)
            raise ConfigError(f"cannot map the shared host region {path}: {exc}") from exc
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        """Let go of the region: the last process to close it removes the file's name (the memory goes
        with the last view). Calling it again does nothing."""
        if self._fd < 0:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process still holds it: the file stays for it
            pass
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1
        del self.array
        with contextlib.suppress(BufferError):  # a pool or tensor still views it: freed with them
            self._mapping.close()


def _open_locked(path: str) -> int:
    """Open (or create) ``path`` holding a shared lock, so that the last holder knows it is the last.

    Retries when the file's name was removed between the open and the lock (its last holder closed):
    this process must not use a file that nobody else can find.

    Raises:
        ConfigError: the file cannot be opened.
    """
    for _ in range(8):
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the shared host region {path}: {exc}") from exc
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return fd
        os.close(fd)
    raise ConfigError(f"the shared host region {path} keeps being removed while this process opens it")


__all__ = ["SHM_DIR", "HostRegion", "region_path"]
