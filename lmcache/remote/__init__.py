"""The remote tier: KV chunks shared through a Redis (or Valkey) server.

- :mod:`lmcache.remote.format` (:mod:`lmcache.tiers.format`, shared with the disk tier), the value
  format: a 64-byte header (magic, format version, dtype, shape, payload length, ``xxh3_64`` checksum
  over key, header and payload) followed by the chunk's bytes exactly as they lie in its slot. A value
  that does not match is a miss, counted, never returned.
- :mod:`lmcache.remote.tier`, :class:`RedisTier`: the client, put together from
  :mod:`~lmcache.remote.connections` (the redis-py client, connections, capped backoff, and credentials
  kept out of every repr, log line and error message), :mod:`~lmcache.remote.writer` (queued writes
  sent by a background thread) and :mod:`~lmcache.remote.stats` (the counters).
- :mod:`lmcache.remote.replies`, :class:`FetchStream`: pipelined ``GET`` replies read from the socket
  straight into pool slots; it reaches its tier only through the :class:`StreamHost` protocol.

``ChunkCache(pool, remote=...)`` uses it to write through and read through (:mod:`lmcache.chunk_cache`).
Importing this package imports neither ``redis`` nor ``xxhash``: a tier imports them when it is built.
"""

from lmcache.errors import RemoteValueError
from lmcache.remote.replies import FetchStream, StreamHost
from lmcache.remote.tier import RedisTier, RemoteStats, redact_url
from lmcache.tiers.format import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    byte_view,
    check_header,
    decode_value,
    encode_header,
    payload_bytes,
    verify_checksum,
)

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "FetchStream",
    "RedisTier",
    "RemoteStats",
    "RemoteValueError",
    "StreamHost",
    "byte_view",
    "check_header",
    "decode_value",
    "encode_header",
    "payload_bytes",
    "redact_url",
    "verify_checksum",
]
