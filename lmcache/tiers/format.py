"""The value format of every tier: a 64-byte header, then a chunk's bytes exactly as in its slot.

The remote tier stores it as one Redis string per chunk (:mod:`lmcache.remote`), the disk tier as one
file per chunk (:mod:`lmcache.disk`); :mod:`lmcache.remote.format` re-exports this module. The header
holds magic, format version, dtype, shape, payload length and a checksum. The checksum (``xxh3_64``)
covers the key, the header and the payload, so a value that was truncated, overwritten, moved to
another key, or written in another format, dtype or shape is rejected, never returned. ``xxh3_64``
takes 1.15 ms over a 32 MiB chunk where ``zlib.crc32`` takes 14.5 ms (docs/remote.md gives the machine,
date and command; DESIGN section 11): that is why the ``redis`` and ``disk`` extras depend on
``xxhash``, imported only when a checksum is computed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcache.dtypes import KV_DTYPES
from lmcache.errors import BackendUnavailableError, ConfigError, RemoteValueError

#: The first bytes of every value this module writes.
MAGIC = b"LMKV"
#: The value format written by this version; values of another version are rejected.
FORMAT_VERSION = 1
#: magic, version, header bytes, payload bytes, checksum, dtype name, shape (5 dims), reserved.
HEADER = struct.Struct("<4sHHQQ16s5I4x")
_CHECKSUM_OFFSET = 16  # byte offset of the checksum field in HEADER

#: How to install what the remote tier needs, for the messages of missing-package errors.
EXTRA_HINT = "pip install 'lmcache-mempool[redis]'"


def xxh3(user: str = "the remote tier", hint: str = EXTRA_HINT) -> Any:
    """Return ``xxhash.xxh3_64`` (imported here, not with this module).

    Args:
        user: who needs it, for the error message (``"the disk tier"`` ...).
        hint: how to install it (the extra that brings it).

    Raises:
        BackendUnavailableError: xxhash is not installed (the message names the extra).
    """
    try:
        import xxhash
    except ImportError as exc:
        raise BackendUnavailableError(f"{user} needs xxhash: {hint}") from exc
    return xxhash.xxh3_64


def byte_view(payload: Any) -> memoryview:
    """Return a flat byte memoryview of a C-contiguous buffer (a numpy array of any dtype, bytes).

    numpy arrays go through a ``uint8`` view, so bf16 and fp8 (ml_dtypes) arrays work too.

    Raises:
        ConfigError: the buffer is not C-contiguous (a value must be sent straight from memory).
    """
    if isinstance(payload, np.ndarray):
        if not payload.flags.c_contiguous:
            raise ConfigError("a tier payload must be C-contiguous; pass np.ascontiguousarray(x)")
        flat: Any = payload.reshape(-1).view(np.uint8)
        return memoryview(flat)
    view = memoryview(payload)
    if not view.c_contiguous:
        raise ConfigError("a tier payload must be C-contiguous; pass a contiguous buffer")
    return view.cast("B")


def payload_bytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a chunk of ``dtype`` (a name in :data:`lmcache.dtypes.KV_DTYPES`) and ``shape``."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * int(_dtype_spec(dtype).itemsize)


def _dtype_spec(dtype: str) -> Any:
    spec = KV_DTYPES.get(dtype)
    if spec is None:
        raise ConfigError(f"unknown dtype name {dtype!r}; use one of {sorted(KV_DTYPES)}")
    return spec


def check_shape(shape: Sequence[int]) -> tuple[int, int, int, int, int]:
    """Return ``shape`` as 5 ints, each in ``1 .. 2**32 - 1`` (what the header can hold).

    Raises:
        ConfigError: another number of dims, or a dim out of range.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) != 5 or any(d < 1 or d >= 2**32 for d in dims):
        raise ConfigError(f"a chunk shape has 5 dims in 1..2**32-1, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


def encode_header(key: bytes, payload: memoryview, dtype: str, shape: Sequence[int]) -> bytes:
    """Return the header to store before ``payload`` under ``key``.

    The payload is not copied: the caller sends the header and then the payload's own memory.

    Raises:
        ConfigError: the payload's length does not match ``dtype`` and ``shape``, or they are invalid.
    """
    dims = check_shape(shape)
    nbytes = payload_bytes(dtype, dims)
    if payload.nbytes != nbytes:
        raise ConfigError(f"payload has {payload.nbytes} bytes but {dtype} {dims} needs {nbytes}")
    blank, hasher = start_header(key, dtype, dims)
    hasher.update(payload)
    return finish_header(blank, hasher)


def start_header(key: bytes, dtype: str, shape: Sequence[int]) -> tuple[bytes, Any]:
    """Begin the header of a value whose payload is hashed piece by piece as it is stored.

    Returns the blank header (checksum zero) and a running ``xxh3_64`` over ``key`` and it: feed it
    every piece of the payload in order, then :func:`finish_header`. Hashing a piece right before it is
    written, while it is in the CPU's cache, spares a separate pass over the whole payload.

    Raises:
        ConfigError: an invalid dtype or shape.
    """
    dims = check_shape(shape)
    blank = HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER.size, payload_bytes(dtype, dims), 0, dtype.encode("ascii"), *dims
    )
    hasher = xxh3()()
    hasher.update(key)
    hasher.update(blank)
    return blank, hasher


def finish_header(blank: bytes, hasher: Any) -> bytes:
    """The header of :func:`start_header` with the checksum of everything ``hasher`` was fed."""
    header = bytearray(blank)
    struct.pack_into("<Q", header, _CHECKSUM_OFFSET, int(hasher.intdigest()))
    return bytes(header)


def decode_value(key: bytes, value: bytes | memoryview, dtype: str, shape: Sequence[int]) -> memoryview:
    """Validate a stored value and return its payload (a zero-copy view into ``value``).

    Raises:
        RemoteValueError: the value is not one this format wrote for ``key`` with this dtype and shape:
            too short, another magic or version, another dtype or shape, a length that does not match,
            or a checksum that does not match (the message says which).
    """
    dims = check_shape(shape)
    view = memoryview(value).cast("B")
    if view.nbytes < HEADER.size:
        raise RemoteValueError(f"value of {view.nbytes} bytes is shorter than the {HEADER.size}-byte header")
    header = view[: HEADER.size]
    checksum = check_header(header, view.nbytes, dtype, dims)
    payload = view[HEADER.size :]
    verify_checksum(key, header, payload, checksum)
    return payload


def check_header(
    header: bytes | bytearray | memoryview, value_bytes: int, dtype: str, shape: Sequence[int]
) -> int:
    """Check a value's header against what the reader expects; return the checksum it records.

    Args:
        header: the value's first ``HEADER.size`` bytes.
        value_bytes: the length of the whole value (header and payload).
        dtype, shape: what the reader expects under this key.

    Raises:
        RemoteValueError: another magic, version, dtype or shape, or a length that does not match.
    """
    dims = check_shape(shape)
    magic, version, header_size, nbytes, checksum, name, *stored_shape = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise RemoteValueError("value is not in lmcache's format (magic differs)")
    if version != FORMAT_VERSION or header_size != HEADER.size:
        raise RemoteValueError(f"value has format version {version}; this reader reads {FORMAT_VERSION}")
    stored_dtype = name.rstrip(b"\0").decode("ascii", "replace")
    if stored_dtype != dtype:
        raise RemoteValueError(f"value holds {stored_dtype}, expected {dtype}")
    if tuple(stored_shape) != dims:
        raise RemoteValueError(f"value has shape {tuple(stored_shape)}, expected {dims}")
    expected = payload_bytes(dtype, dims)
    if nbytes != expected or value_bytes != HEADER.size + expected:
        raise RemoteValueError(
            f"value has {value_bytes - HEADER.size} payload bytes (header says {nbytes}), expected {expected}"
        )
    return int(checksum)


def verify_checksum(
    key: bytes, header: bytes | bytearray | memoryview, payload: memoryview, checksum: int
) -> None:
    """Check ``checksum`` (from :func:`check_header`) over ``key``, ``header`` and ``payload``.

    Raises:
        RemoteValueError: the checksum does not match.
    """
    hasher = payload_hasher(key, header)
    hasher.update(payload)
    check_digest(hasher, checksum)


def payload_hasher(key: bytes, header: bytes | bytearray | memoryview) -> Any:
    """A running ``xxh3_64`` over ``key`` and ``header`` (its checksum field zeroed), for a payload
    checked piece by piece as it arrives: feed each piece to ``update``, then :func:`check_digest`.

    Hashing each piece right after it was read, while it is still in the CPU's cache, costs less than a
    second pass over the whole payload.
    """
    blank = bytearray(header[: HEADER.size])
    blank[_CHECKSUM_OFFSET : _CHECKSUM_OFFSET + 8] = bytes(8)
    hasher = xxh3()()
    hasher.update(key)
    hasher.update(blank)
    return hasher


def check_digest(hasher: Any, checksum: int) -> None:
    """Compare a :func:`payload_hasher` fed the whole payload with ``checksum``.

    Raises:
        RemoteValueError: the checksum does not match.
    """
    if int(hasher.intdigest()) != checksum:
        raise RemoteValueError("value checksum does not match its bytes")


__all__ = [
    "EXTRA_HINT",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "RemoteValueError",
    "byte_view",
    "check_digest",
    "check_header",
    "check_shape",
    "decode_value",
    "encode_header",
    "finish_header",
    "payload_bytes",
    "payload_hasher",
    "start_header",
    "verify_checksum",
    "xxh3",
]
