"""The adapter's own error: LMCache is not importable as it needs."""

from __future__ import annotations

# Not lmcache.errors.BackendUnavailableError: that import needs the very package this error reports on.


class LMCacheMissingError(ImportError):
    """``lmcache`` is not LMCache's package joined with this project's (see
    :mod:`lmcache_mempool_l2.packages`); the message says which install fixes it."""


__all__ = ["LMCacheMissingError"]
