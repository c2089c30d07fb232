"""The remote tier's value format: :mod:`lmcache.tiers.format`, shared with the disk tier.

This module re-exports it under the name the remote tier has always used: a 64-byte header (magic,
format version, dtype, shape, payload length, ``xxh3_64`` checksum over key, header and payload), then
the chunk's bytes exactly as in its slot.
"""

from lmcache.errors import RemoteValueError
from lmcache.tiers.format import (
    EXTRA_HINT,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    byte_view,
    check_header,
    check_shape,
    decode_value,
    encode_header,
    payload_bytes,
    verify_checksum,
    xxh3,
)

__all__ = [
    "EXTRA_HINT",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "RemoteValueError",
    "byte_view",
    "check_header",
    "check_shape",
    "decode_value",
    "encode_header",
    "payload_bytes",
    "verify_checksum",
    "xxh3",
]
