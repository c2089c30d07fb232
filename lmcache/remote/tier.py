"""The remote tier's client: :class:`RedisTier`, one Redis (or Valkey) string per chunk.

Writes go through a bounded queue to a background writer thread (the caller never waits on the network;
a full queue drops its oldest write); reads are pipelined (one round trip for any number of chunks). A
server that is down, slow, restarting or refusing the credentials never raises into the caller:
operations fail soft, are counted, and the tier retries after a capped, jittered backoff. Credentials
come from the URL or from ``REDIS_USERNAME`` / ``REDIS_PASSWORD``; they never appear in a repr, a log
line or an error message. ``redis`` is imported only when a tier is built.

The parts, each owning its own state: :mod:`~lmcache.remote.connections` (the client, connections,
backoff), :mod:`~lmcache.remote.writer` (the queue and its thread), :mod:`~lmcache.remote.stats` (the
counters) and :mod:`~lmcache.remote.replies` (streams of replies read into slots). :class:`RedisTier`
puts them together and is the :class:`~lmcache.remote.replies.StreamHost` of its streams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmcache.errors import ConfigError, RemoteValueError
from lmcache.remote.connections import Connections, redact_url
from lmcache.remote.replies import WRONG_TYPE, FetchStream
from lmcache.remote.stats import Counters, RemoteStats
from lmcache.remote.writer import Writer, checked_write
from lmcache.tiers.format import HEADER, check_shape, decode_value, payload_bytes, xxh3

logger = logging.getLogger("lmcache.remote")


class RedisTier:
    """A Redis / Valkey server as a shared store of KV chunks, one string key per chunk.

    Writes (:meth:`submit`) are queued for a background writer thread: the queue holds at most
    ``queue_size`` writes, and a write that arrives when it is full drops the oldest one (counted in
    ``dropped``). The writer sends queued writes in pipelined batches, straight from the caller's
    buffer (the header first, then the payload's own memory: no copy), and calls each write's
    ``on_done(sent)`` once it was sent or dropped, so the caller knows when the buffer is free again.
    Reads (:meth:`fetch`, :meth:`probe`) are one pipelined round trip for any number of keys.

    Faults never raise into the caller: a failed operation is counted in ``errors`` and puts the tier
    in a backoff (``backoff_initial`` doubling to ``backoff_max`` seconds, with jitter) during which reads
    answer "miss" without touching the network and the writer waits; the first operation after the
    backoff reconnects. A write that fails is dropped, not retried.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS, or
            ``unix://path``; passed to ``redis.Redis.from_url``. Credentials not in the URL are taken
            from the ``REDIS_USERNAME`` and ``REDIS_PASSWORD`` environment variables.
        key_prefix: the start of every key this tier writes or reads.
        ttl: seconds a written chunk lives on the server (None: until the server evicts it).
        socket_timeout: seconds one whole network operation may take (a round trip: the request sent
            and every reply read) before it counts as a failure; a server that trickles its reply
            byte by byte fails it too.
        connect_timeout: seconds a connection attempt may take.
        queue_size: the most writes waiting for the writer.
        batch_bytes: the writer sends queued writes together up to this many bytes per round trip.
        backoff_initial: seconds to wait after a first failure.
        backoff_max: the cap of the doubling wait between attempts while the server is unreachable.
        client_options: further keyword arguments for ``redis.Redis.from_url`` (``ssl_ca_certs`` ...).

    Raises:
        ConfigError: a bad option (the message never contains the credentials).
        BackendUnavailableError: ``redis`` or ``xxhash`` is not installed.
    """

    #: The tier's kind: its counters appear in a cache's stats as ``remote_hits`` and so on.
    name = "remote"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "lmcache:",
        ttl: float | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        queue_size: int = 256,
        batch_bytes: int = 64 << 20,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(url, str):
            raise ConfigError(
                f"url must be a string such as 'redis://127.0.0.1:6379/0', got {type(url).__name__}"
            )
        shown = redact_url(url)
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
            raise ConfigError(f"url {shown!r} must start with redis://, rediss:// or unix://")
        if not isinstance(key_prefix, str):
            raise ConfigError(f"key_prefix must be a string, got {type(key_prefix).__name__}")
        for name, value in (
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0.001 <= ttl < 2**40
        ):
            raise ConfigError(f"ttl must be None or a finite number of seconds >= 0.001, got {ttl!r}")
        for name, count in (("queue_size", queue_size), ("batch_bytes", batch_bytes)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{name} must be a positive int, got {count!r}")
        self._counters = Counters()
        self._connections = Connections(
            url,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            client_options=client_options,
            counters=self._counters,
        )
        xxh3()  # xxhash missing: BackendUnavailableError now, not at the first write
        self._url = self._connections.url
        self.key_prefix = key_prefix
        self._ttl = ttl
        self._queue_size = queue_size
        self._batch_bytes = batch_bytes
        self._writer = Writer(
            self._connections, self._counters, queue_size=queue_size, batch_bytes=batch_bytes, ttl=ttl
        )

    @property
    def ttl(self) -> float | None:
        """Seconds a written chunk lives on the server (None: until evicted); fixed when the tier is built."""
        return self._ttl

    @property
    def queue_size(self) -> int:
        """The most writes waiting for the writer; fixed when the tier is built."""
        return self._queue_size

    @property
    def batch_bytes(self) -> int:
        """The most bytes of writes (and of reads, in ChunkCache) per round trip; fixed when built."""
        return self._batch_bytes

    @property
    def client(self) -> Any:
        """The ``redis.Redis`` client the tier reads with (for diagnostics and benchmarks)."""
        return self._connections.client

    # -- keys ----------------------------------------------------------------------------------------
    def key(self, namespace: str, chunk_key: bytes) -> bytes:
        """Return the Redis key of a chunk: prefix, then ``namespace:`` (when not empty), then the hex key."""
        middle = f"{namespace}:" if namespace else ""
        return f"{self.key_prefix}{middle}{chunk_key.hex()}".encode()

    # -- writes --------------------------------------------------------------------------------------
    def submit(
        self,
        key: bytes,
        payload: Any,
        dtype: str,
        shape: Sequence[int],
        on_done: Callable[[bool], None] | None = None,
        *,
        parent: bytes | None = None,
    ) -> None:
        """Queue a write of ``payload`` (a C-contiguous buffer of ``dtype`` and ``shape``) under ``key``.

        Returns at once; the payload's memory must stay unchanged until ``on_done(sent)`` is called (by
        the writer thread, or here when the write is refused or displaces an older one). When the queue
        is full the oldest queued write is dropped (``dropped`` + 1, its ``on_done(False)``). After
        :meth:`close` the write is dropped at once. ``parent`` (the tier key of the chunk this one
        extends) is part of the tier protocol; a Redis server evicts on its own, so it is not used here.

        Raises:
            ConfigError: the payload does not match ``dtype`` and ``shape`` (nothing is queued).
        """
        self._writer.submit(checked_write(key, payload, dtype, shape, on_done))

    def write(self, key: bytes, payload: Any, dtype: str, shape: Sequence[int]) -> bool:
        """Write one chunk now, from the calling thread (bypassing the queue); True when it was stored.

        A failure is counted and returns False; nothing raises but invalid arguments.
        """
        return self._writer.send_now(checked_write(key, payload, dtype, shape, None))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was sent or dropped; False if ``timeout`` seconds passed first."""
        return self._writer.flush(timeout)

    # -- reads ---------------------------------------------------------------------------------------
    def fetch(
        self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]
    ) -> list[memoryview | None]:
        """Get ``keys`` in one pipelined round trip; each a validated payload (zero-copy) or None.

        ``shapes[i]`` is the shape the caller expects under ``keys[i]``. A value that fails validation
        is counted in ``corrupt`` and returned as None; when the server cannot be reached every entry is
        None (``errors`` + 1, and the tier backs off).
        """
        if len(keys) != len(shapes):
            raise ConfigError(f"fetch got {len(keys)} keys but {len(shapes)} shapes")
        dims = [check_shape(s) for s in shapes]
        if not keys:
            return []
        values = self._connections.pipelined("GET", keys)
        out: list[memoryview | None] = []
        hits = misses = corrupt = 0
        for key, value, shape in zip(keys, values, dims, strict=True):
            if value is WRONG_TYPE:
                corrupt += 1
                out.append(None)
                continue
            if value is None:
                misses += 1
                out.append(None)
                continue
            try:
                out.append(decode_value(key, value, dtype, shape))
                hits += 1
            except RemoteValueError as exc:
                corrupt += 1
                out.append(None)
                logger.warning("remote value %s rejected: %s", key.decode("ascii", "replace"), exc)
        for name, count in (("hits", hits), ("misses", misses), ("corrupt", corrupt)):
            self._counters.add(name, count)
        return out

    def stream(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> FetchStream:
        """Ask for ``keys`` in one pipelined round trip and return the replies to read in order.

        Unlike :meth:`fetch`, the payloads are not materialized: :meth:`FetchStream.read_into` reads each
        straight from the socket into the caller's buffer (a pool slot), then checks its checksum. Use
        it as a context manager (or call ``close()``) to give the connection back.
        """
        if len(keys) != len(shapes):
            raise ConfigError(f"stream got {len(keys)} keys but {len(shapes)} shapes")
        return FetchStream(self, list(keys), dtype, [check_shape(s) for s in shapes])

    def probe(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each key holds a value of the right length, in one pipelined round trip (``STRLEN``).

        Cheap: no payload crosses the network. A True is a promise of nothing: the value may be evicted,
        overwritten or fail its checksum before it is fetched. False when the server cannot be reached.
        """
        if len(keys) != len(shapes):
            raise ConfigError(f"probe got {len(keys)} keys but {len(shapes)} shapes")
        want = [HEADER.size + payload_bytes(dtype, check_shape(s)) for s in shapes]
        if not keys:
            return []
        lengths = self._connections.strlen(keys)
        return [isinstance(n, int) and n == w for n, w in zip(lengths, want, strict=True)]

    # -- what a FetchStream needs (StreamHost) --------------------------------------------------------
    @property
    def redis_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions of a failed network operation (redis-py's errors and ``OSError``)."""
        return self._connections.redis_errors

    @property
    def read_errors(self) -> tuple[type[BaseException], ...]:
        """:attr:`redis_errors` and ``ValueError`` (a reply line that is no number: replies out of step)."""
        return self._connections.read_errors

    @property
    def socket_timeout(self) -> float:
        """Seconds one whole network operation may take; fixed when the tier is built."""
        return self._connections.socket_timeout

    def ready(self) -> bool:
        """Whether an operation may touch the network now (not closed, not backing off)."""
        return self._connections.ready()

    def borrow(self) -> Any:
        """Lend an idle or new redis-py connection; hand it back with :meth:`give_back`."""
        return self._connections.borrow()

    def give_back(self, conn: Any) -> None:
        """Take back a borrowed connection (kept for the next :meth:`borrow`; disconnected once closed)."""
        self._connections.give_back(conn)

    def pipelined(self, command: str, keys: list[bytes]) -> list[Any]:
        """Run ``command key`` for every key through redis-py in one round trip (Nones on a failure)."""
        return self._connections.pipelined(command, keys)

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (``hits``, ``misses``, ``corrupt`` ...), under its lock."""
        self._counters.add(name)

    def succeeded(self) -> None:
        """Record that an operation reached the server (ends a backoff)."""
        self._connections.succeeded()

    def failed(self, operation: str, exc: BaseException) -> None:
        """Record a failed operation: count it in ``errors`` and back off."""
        self._connections.failed(operation, exc)

    def protocol_error(self, message: str) -> Exception:
        """redis-py's ``InvalidResponse`` for a reply that breaks the protocol."""
        return self._connections.protocol_error(message)

    # -- lifecycle -----------------------------------------------------------------------------------
    def stats(self) -> RemoteStats:
        """Return the counters, with the writes pending now and whether the server was last reached."""
        return self._writer.snapshot(connected=self._connections.connected)

    def close(self, timeout: float = 1.0) -> None:
        """Flush for at most ``timeout`` seconds, then stop the writer and drop what is still queued.

        Returns within about ``timeout`` seconds (plus half a second at most) even when the server is
        gone or hangs: a write still in flight at the deadline is cut off by closing its connection.
        Idempotent.
        """
        deadline = time.monotonic() + timeout
        if not self._writer.closed:
            self._writer.flush(timeout)
        self._writer.stop()
        self._connections.close()
        self._writer.join(deadline - time.monotonic())
        self._connections.disconnect()

    def __enter__(self) -> RedisTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ttl = "" if self.ttl is None else f", ttl={self.ttl}"
        return f"RedisTier({self._url!r}, key_prefix={self.key_prefix!r}{ttl}, queue_size={self.queue_size})"


__all__ = ["RedisTier", "RemoteStats", "redact_url"]
