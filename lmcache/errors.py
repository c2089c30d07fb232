"""Exceptions raised by the pool.

Every error the pool raises is a :class:`MemPoolError` and also a subclass of the built-in exception
that best describes it (``ValueError`` for bad values and bad handles, ``TypeError`` for inputs that are
not arrays, ``MemoryError`` for pools that cannot fit, ``ImportError`` for a missing framework), so
callers can catch either. A failed call never changes the pool.
"""

from __future__ import annotations


class MemPoolError(Exception):
    """Base class of every error raised by ``lmcache-mempool``."""


class ConfigError(MemPoolError, ValueError):
    """A metadata field or pool option has a value the pool cannot use."""


class ChunkTypeError(MemPoolError, TypeError):
    """An argument that should be an array (something with ``shape`` and ``dtype``) is not one."""


class ChunkShapeError(MemPoolError, ValueError):
    """An array's shape, token count or dtype does not fit the pool's chunk layout."""


class InvalidHandleError(MemPoolError, ValueError):
    """A :class:`KVObj` cannot be used with this pool: freed, reused, foreign or hand-built."""


class DoubleFreeError(InvalidHandleError):
    """The :class:`KVObj` was already freed and its slot has not been handed out since."""


class StaleHandleError(InvalidHandleError):
    """The :class:`KVObj` was freed and its slot now belongs to another owner."""


class ForeignHandleError(InvalidHandleError):
    """The :class:`KVObj` was not allocated by this pool (another pool's, or built by hand)."""


class ReadOnlyHandleError(InvalidHandleError):
    """The :class:`KVObj` may read its chunk but not write it: a lease's chunk, which the cache owns and
    other readers share."""


class PoolClosedError(MemPoolError, RuntimeError):
    """The pool was closed; it hands out and takes back nothing more."""


class PoolTooLargeError(MemPoolError, MemoryError):
    """The pool asks for more memory (host, pinned or device) than the machine can give."""


class DeviceUnavailableError(MemPoolError, RuntimeError):
    """A GPU pool was asked for but the framework sees no accelerator."""


class BackendUnavailableError(MemPoolError, ImportError):
    """The backend's framework is not installed; the message names the extra to install."""


class DeviceCopyError(MemPoolError, RuntimeError):
    """A copy into or out of device memory failed in the device runtime (the message has its error)."""


class OverlapError(MemPoolError, ValueError):
    """An array to be written overlaps memory it must not: a pool's own arena (chunks other owners
    hold), another layer of the same paged cache, or itself (elements that share memory)."""


class NotPicklableError(MemPoolError, TypeError):
    """A handle or pool was pickled or copied: that would make a second owner of the same memory."""


class TokensTypeError(MemPoolError, TypeError):
    """Tokens are not a 1-D sequence of integer ids (floats, strings, ``None``, a scalar, bools...)."""


class TokensValueError(MemPoolError, ValueError):
    """Tokens are integers but not a flat sequence of int64 ids (nested, ragged, out of int64 range)."""


class CacheInvariantError(MemPoolError, RuntimeError):
    """The chunk cache found its own bookkeeping inconsistent (a bug: please report it)."""


class BenchmarkError(MemPoolError, RuntimeError):
    """A benchmark of ``python -m lmcache bench`` could not measure what it claims to (a pool too small
    for its chunk, a cache that lost chunks, a server that did not start); the message says which."""


class RemoteValueError(MemPoolError, ValueError):
    """A value read from the remote tier does not match what the reader expects (format, dtype, shape,
    length, checksum); :mod:`lmcache.remote` counts it as corrupt and never returns it."""


class ProtocolError(MemPoolError, ValueError):
    """A message on the shared cache's socket (:mod:`lmcache.shared`) is malformed, truncated, oversized
    or names something its sender was not given. The server closes that connection; a client counts it
    as a server failure. Neither passes it to the caller."""


class ServerUnavailableError(MemPoolError, ConnectionError):
    """No shared cache server answered at a socket path when a client first connected
    (``lmcache.shared.connect``); the message says how to start one. Later failures of the server are
    never raised: calls answer as misses."""


__all__ = [
    "BackendUnavailableError",
    "BenchmarkError",
    "CacheInvariantError",
    "ChunkShapeError",
    "ChunkTypeError",
    "ConfigError",
    "DeviceCopyError",
    "DeviceUnavailableError",
    "DoubleFreeError",
    "ForeignHandleError",
    "InvalidHandleError",
    "MemPoolError",
    "NotPicklableError",
    "OverlapError",
    "PoolClosedError",
    "PoolTooLargeError",
    "ReadOnlyHandleError",
    "ProtocolError",
    "RemoteValueError",
    "ServerUnavailableError",
    "StaleHandleError",
    "TokensTypeError",
    "TokensValueError",
]
