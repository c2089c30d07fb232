"""Host memory for arenas: page-aligned, committed lazily, checked against what the machine has."""

from __future__ import annotations

import mmap
import os

import numpy as np

from lmcache.errors import PoolTooLargeError

#: Bytes in a GiB.
GIB = 2**30


def available_host_bytes() -> int | None:
    """Bytes of host memory the kernel says a new allocation can get (``MemAvailable``), or None.

    None where the platform does not say (no ``/proc/meminfo``); the pool then skips the check.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_capacity(nbytes: int, what: str = "host arena") -> None:
    """Raise :class:`PoolTooLargeError` if ``nbytes`` exceeds the host memory available now.

    A pool is checked at construction so that it fails with a message, instead of being killed by the
    kernel once its pages are touched (the arena is committed lazily, so the allocation itself would
    succeed). Set ``LMCACHE_SKIP_MEMORY_CHECK=1`` to skip the check (for example under overcommit with
    swap you trust).
    """
    if os.environ.get("LMCACHE_SKIP_MEMORY_CHECK") == "1":
        return
    available = available_host_bytes()
    if available is not None and nbytes > available:
        raise PoolTooLargeError(
            f"the {what} needs {nbytes / GIB:.2f} GiB but only {available / GIB:.2f} GiB of host "
            "memory is available; lower max_local_cache_size"
        )


def allocate_host(nbytes: int) -> np.ndarray:
    """Return a writable, page-aligned (4096-byte) ``uint8`` array of ``nbytes``, not yet committed.

    Anonymous ``mmap`` gives zero-filled pages that the kernel commits on first touch, so a 16 GiB pool
    costs nothing until it is used. The returned array keeps the mapping alive; the memory is released
    when the last array or view of it is gone.
    """
    # MAP_PRIVATE | MAP_ANONYMOUS: lazily committed zero pages.
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes)


__all__ = ["GIB", "allocate_host", "available_host_bytes", "check_host_capacity"]
