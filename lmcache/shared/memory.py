"""The shared cache's arena memory: one anonymous ``memfd`` mapped ``MAP_SHARED`` by the server and by
every client, which receive its file descriptor over the socket (``SCM_RIGHTS``).

A memfd has no name in any filesystem, so nobody can open it by path: a process gets it only from the
server, after the server checked its credentials (:mod:`lmcache.shared.access`). Its mode is 0600
(0660 with a group) all the same, for ``/proc/<pid>/fd`` and the like. Its size is sealed
(``F_SEAL_SHRINK | F_SEAL_GROW``), so no client can truncate it under the others' mappings (which would
kill them with ``SIGBUS`` on their next access).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os

import numpy as np

from lmcache.errors import ConfigError, ProtocolError
from lmcache.hostmem import check_host_capacity

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def map_shared(fd: int, nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """Map ``nbytes`` of the file ``fd`` shared and writable: the mapping and a ``uint8`` numpy array
    of it (the mapping lives as long as any view of the array)."""
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping, np.frombuffer(mapping, dtype=np.uint8)


class SharedArena:
    """The server's side: ``nbytes`` of shared memory, committed lazily (pages are taken on first use).

    Args:
        nbytes: the arena's size.
        gid: a group that may use it too (mode 0660 and that group); None: the owner only (0600).

    Attributes:
        fd: the memfd (passed to clients; closed by :meth:`close`).
        array: the whole mapping as a ``uint8`` numpy array (what the server's pool adopts).

    Raises:
        ConfigError: the platform has no ``memfd_create`` (Linux only).
        PoolTooLargeError: the machine has less memory available than ``nbytes``.
    """

    def __init__(self, nbytes: int, *, gid: int | None = None) -> None:
        if not hasattr(os, "memfd_create"):
            raise ConfigError("the shared cache needs Linux (os.memfd_create); this platform has none")
        check_host_capacity(nbytes, "shared cache arena")
        fd = os.memfd_create("lmcache-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600 if gid is None else 0o660)
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mapping, self.array = map_shared(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.nbytes = nbytes

    def close(self) -> None:
        """Close the descriptor, and the mapping once no view of it is left (clients keep theirs: the
        memory goes when the last process lets go). Calling it again does nothing."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        with contextlib.suppress(BufferError):  # arrays of the pool still view it: freed with them
            self._mapping.close()


def map_arena(fd: int, nbytes: int) -> np.ndarray:
    """The client's side: map the server's arena from its descriptor and close the descriptor.

    Returns:
        The mapping as a ``uint8`` numpy array of ``nbytes`` (the mapping lives as long as any view).

    Raises:
        ProtocolError: the descriptor is not a sealed shared memory file of at least ``nbytes`` bytes.
    """
    try:
        size = os.fstat(fd).st_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        fixed = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        if size < nbytes or seals & fixed != fixed:
            raise ProtocolError(
                f"the server passed a {size}-byte file (seals {seals:#x}) for a {nbytes}-byte arena"
            )
        _, array = map_shared(fd, nbytes)
    except OSError as exc:
        raise ProtocolError(f"the server's arena could not be mapped: {exc}") from exc
    finally:
        os.close(fd)
    return array


__all__ = ["SharedArena", "map_arena", "map_shared"]
