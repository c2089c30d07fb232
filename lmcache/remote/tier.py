"""The remote tier's client: :class:`RedisTier`, one Redis (or Valkey) string per chunk.

Writes go through a bounded queue to a background writer thread (the caller never waits on the network;
a full queue drops its oldest write); reads are pipelined (one round trip for any number of chunks). A
server that is down, slow, restarting or refusing the credentials never raises into the caller:
operations fail soft, are counted, and the tier retries after a capped, jittered backoff. Credentials
come from the URL or from ``REDIS_USERNAME`` / ``REDIS_PASSWORD``; they never appear in a repr, a log
line or an error message. ``redis`` is imported only when a tier is built.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache.errors import BackendUnavailableError, ConfigError
from lmcache.remote.format import (
    _EXTRA_HINT,
    HEADER,
    RemoteValueError,
    _check_shape,
    _xxh3,
    byte_view,
    decode_value,
    encode_header,
    payload_bytes,
)
from lmcache.remote.replies import WRONG_TYPE, FetchStream, _ReplyReader

logger = logging.getLogger("lmcache.remote")

# -- credentials -------------------------------------------------------------------------------------
_USERINFO = re.compile(r"(?<=://)[^@/\s]*@")


def redact_url(url: str) -> str:
    """Return ``url`` with its user and password replaced by ``***``."""
    return _USERINFO.sub("***@", url)


@dataclass(frozen=True)
class RemoteStats:
    """Counters of a :class:`RedisTier`, since it was built.

    Attributes:
        hits: chunks fetched and validated.
        misses: chunks asked for and not on the server (or unreadable because it was unreachable).
        writes: chunks written.
        errors: failed operations (a connection refused, a timeout, a refused password, a server error).
        dropped: queued writes that were never written (queue full, failed write, closed tier).
        corrupt: values rejected by validation (never returned).
        pending: writes queued now, not yet written or dropped.
        connected: whether the last operation reached the server.
    """

    hits: int
    misses: int
    writes: int
    errors: int
    dropped: int
    corrupt: int
    pending: int
    connected: bool


@dataclass
class _Write:
    key: bytes
    payload: memoryview
    dtype: str
    shape: tuple[int, int, int, int, int]
    on_done: Callable[[bool], None] | None


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
        socket_timeout: seconds one network read or write may take before it counts as a failure.
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
        self._url = redact_url(url)
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
            raise ConfigError(f"url {self._url!r} must start with redis://, rediss:// or unix://")
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
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0.001):
            raise ConfigError(f"ttl must be None or at least 0.001 seconds, got {ttl!r}")
        for name, count in (("queue_size", queue_size), ("batch_bytes", batch_bytes)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{name} must be a positive int, got {count!r}")
        try:
            import redis
            import redis.backoff
            import redis.retry
        except ImportError as exc:
            raise BackendUnavailableError(f"the remote tier needs redis-py: {_EXTRA_HINT}") from exc
        _xxh3()
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._response_error: type[BaseException] = redis.ResponseError
        # ValueError: a reply line that is not a number, so the replies are out of step
        self._read_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, ValueError)
        self._protocol_error: type[Exception] = redis.exceptions.InvalidResponse
        options: dict[str, Any] = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(connect_timeout),
            # redis-py retries failed commands with a growing sleep by default: the tier has its own
            # backoff and must never block a caller on retries.
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        }
        parsed = urllib.parse.urlsplit(url)
        if parsed.password is None and os.environ.get("REDIS_PASSWORD"):
            options["password"] = os.environ["REDIS_PASSWORD"]
            if parsed.username is None and os.environ.get("REDIS_USERNAME"):
                options["username"] = os.environ["REDIS_USERNAME"]
        options.update(client_options or {})
        self._secrets = [s for s in (parsed.password, options.get("password")) if s]
        if scheme.startswith("valkey"):
            url = "redis" + url[len("valkey") :]
        try:
            self._client = redis.Redis.from_url(url, **options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot use url {self._url!r}: {self._redact(str(exc))}") from None
        self.key_prefix = key_prefix
        self.ttl = ttl
        self.queue_size = queue_size
        self.batch_bytes = batch_bytes
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._delay = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # queue, in-flight count or backoff changed
        self._queue: collections.deque[_Write] = collections.deque()
        self._in_flight = 0
        self._closed = False
        self._counts = dict.fromkeys(("hits", "misses", "writes", "errors", "dropped", "corrupt"), 0)
        self._connected = False
        self._spare: list[Any] = []  # idle connections for SETs (packed by hand, so not the client's pool)
        self._writer_connection: Any = None  # the connection the writer is sending on, for close()
        self._writer = threading.Thread(target=self._run_writer, name="lmcache-remote-writer", daemon=True)
        self._writer.start()

    @property
    def client(self) -> Any:
        """The ``redis.Redis`` client the tier reads with (for diagnostics and benchmarks)."""
        return self._client

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
    ) -> None:
        """Queue a write of ``payload`` (a C-contiguous buffer of ``dtype`` and ``shape``) under ``key``.

        Returns at once; the payload's memory must stay unchanged until ``on_done(sent)`` is called (by
        the writer thread, or here when the write is refused or displaces an older one). When the queue
        is full the oldest queued write is dropped (``dropped`` + 1, its ``on_done(False)``). After
        :meth:`close` the write is dropped at once.

        Raises:
            ConfigError: the payload does not match ``dtype`` and ``shape`` (nothing is queued).
        """
        write = _checked_write(key, payload, dtype, shape, on_done)
        displaced = None
        with self._lock:
            if self._closed:
                self._counts["dropped"] += 1
                displaced = write
            else:
                if len(self._queue) >= self.queue_size:
                    displaced = self._queue.popleft()
                    self._counts["dropped"] += 1
                self._queue.append(write)
                self._changed.notify_all()
        if displaced is not None:
            _finish(displaced, False)

    def write(self, key: bytes, payload: Any, dtype: str, shape: Sequence[int]) -> bool:
        """Write one chunk now, from the calling thread (bypassing the queue); True when it was stored.

        A failure is counted and returns False; nothing raises but invalid arguments.
        """
        write = _checked_write(key, payload, dtype, shape, None)
        if not self._ready():
            return False
        conn = self._borrow()
        try:
            return self._send_batch(conn, [write])
        finally:
            self._give_back(conn)

    def _borrow(self) -> Any:
        """A connection for a batch of SETs: a spare one, or a new one (it connects on first use)."""
        with self._lock:
            if self._spare:
                return self._spare.pop()
        return self._client.connection_pool.make_connection()

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            if not self._closed:
                self._spare.append(conn)
                return
        conn.disconnect()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was sent or dropped; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._in_flight:
                if not self._writer.is_alive():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left if left is not None else 0.5)
            return not self._queue and not self._in_flight

    def _run_writer(self) -> None:
        """The writer thread: send queued writes in batches until closed."""
        while True:
            with self._lock:
                while not self._closed and (not self._queue or time.monotonic() < self._retry_at):
                    wait = None if not self._queue else self._retry_at - time.monotonic()
                    self._changed.wait(wait)
                if self._closed:
                    return
                batch = [self._queue.popleft()]
                size = batch[0].payload.nbytes
                while self._queue and size + self._queue[0].payload.nbytes <= self.batch_bytes:
                    batch.append(self._queue.popleft())
                    size += batch[-1].payload.nbytes
                self._in_flight = len(batch)
            sent = False
            try:
                self._writer_connection = conn = self._borrow()
                try:
                    sent = self._send_batch(conn, batch)
                finally:
                    self._writer_connection = None
                    self._give_back(conn)
            except Exception:  # the writer must outlive any bug: the queue would never drain again
                logger.exception("remote writer failed on a batch of %d writes", len(batch))
            finally:
                with self._lock:
                    if not sent:
                        self._counts["dropped"] += len(batch)
                    self._in_flight = 0
                    self._changed.notify_all()
                for write in batch:
                    _finish(write, sent)

    def _send_batch(self, conn: Any, batch: list[_Write]) -> bool:
        """Send SETs for ``batch`` on ``conn`` in one round trip; True when every one was stored."""
        try:
            commands: list[Any] = []
            for write in batch:
                header = encode_header(write.key, write.payload, write.dtype, write.shape)
                commands.extend(self._pack_set(write.key, header, write.payload))
            conn.send_packed_command(commands)
            for _ in batch:
                conn.read_response()
        except self._redis_errors as exc:
            conn.disconnect()
            self._failed("write", exc)
            return False
        with self._lock:
            self._counts["writes"] += len(batch)
        self._succeeded()
        return True

    def _pack_set(self, key: bytes, header: bytes, payload: memoryview) -> list[Any]:
        """RESP for ``SET key header+payload [PX ttl]``, with the payload as its own buffer (no copy)."""
        ttl = [] if self.ttl is None else [b"PX", str(max(1, round(self.ttl * 1000))).encode()]
        args = [b"SET", key]
        head = b"*%d\r\n" % (3 + len(ttl)) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        head += b"$%d\r\n" % (len(header) + payload.nbytes) + header
        tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in ttl)
        return [head, payload, tail]

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
        dims = [_check_shape(s) for s in shapes]
        if not keys:
            return []
        values = self._pipelined("GET", keys)
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
        with self._lock:
            self._counts["hits"] += hits
            self._counts["misses"] += misses
            self._counts["corrupt"] += corrupt
        return out

    def stream(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> FetchStream:
        """Ask for ``keys`` in one pipelined round trip and return the replies to read in order.

        Unlike :meth:`fetch`, the payloads are not materialized: :meth:`FetchStream.read_into` reads each
        straight from the socket into the caller's buffer (a pool slot), then checks its checksum. Use
        it as a context manager (or call ``close()``) to give the connection back.
        """
        if len(keys) != len(shapes):
            raise ConfigError(f"stream got {len(keys)} keys but {len(shapes)} shapes")
        return FetchStream(self, list(keys), dtype, [_check_shape(s) for s in shapes])

    def probe(self, keys: Sequence[bytes], dtype: str, shapes: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each key holds a value of the right length, in one pipelined round trip (``STRLEN``).

        Cheap: no payload crosses the network. A True is a promise of nothing: the value may be evicted,
        overwritten or fail its checksum before it is fetched. False when the server cannot be reached.
        """
        if len(keys) != len(shapes):
            raise ConfigError(f"probe got {len(keys)} keys but {len(shapes)} shapes")
        want = [HEADER.size + payload_bytes(dtype, _check_shape(s)) for s in shapes]
        if not keys:
            return []
        lengths = self._strlen(keys)
        return [isinstance(n, int) and n == w for n, w in zip(lengths, want, strict=True)]

    def _strlen(self, keys: Sequence[bytes]) -> list[Any]:
        """``STRLEN`` of every key in one round trip, packed and parsed here: redis-py's pipeline costs
        about 10 us per command, ten times a loopback round trip for 128 chunks."""
        if not self._ready():
            return [None] * len(keys)
        conn = self._borrow()
        try:
            conn.connect()
            sock = getattr(conn, "_sock", None)
            if sock is None or not hasattr(sock, "recv_into"):
                self._give_back(conn)
                conn = None
                return self._pipelined("STRLEN", keys)
            sock.sendall(b"".join(b"*2\r\n$6\r\nSTRLEN\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys))
            reader = _ReplyReader(sock)
            lengths: list[Any] = []
            for _ in keys:
                line = reader.line()
                if line.startswith(b":"):
                    lengths.append(int(line[1:]))
                elif line.startswith(b"-WRONGTYPE"):
                    lengths.append(WRONG_TYPE)
                else:
                    raise self._protocol_error(f"unexpected reply {line[:40]!r} to STRLEN")
            if reader.buffered:
                raise self._protocol_error("more replies than commands to STRLEN")
        except self._read_errors as exc:
            if conn is not None:
                conn.disconnect()
            self._failed("STRLEN", exc)
            return [None] * len(keys)
        finally:
            if conn is not None:
                self._give_back(conn)
        self._succeeded()
        return lengths

    def _pipelined(self, command: str, keys: Sequence[bytes]) -> list[Any]:
        """Run ``command key`` for every key in one round trip; a list of Nones when that fails."""
        if not self._ready():
            return [None] * len(keys)
        try:
            if len(keys) == 1:  # a pipeline object costs tens of microseconds: a visible share of 256 KiB
                try:
                    replies = [self._client.execute_command(command, keys[0])]  # type: ignore[no-untyped-call]
                except self._response_error as exc:
                    replies = [exc]
            else:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.execute_command(command, key)  # type: ignore[no-untyped-call]
                replies = pipe.execute(raise_on_error=False)
        except self._redis_errors as exc:
            self._failed(command, exc)
            return [None] * len(keys)
        # WRONGTYPE: the key holds a list, hash ... that is someone else's value, not a fault of the server.
        failed = [r for r in replies if isinstance(r, Exception) and not str(r).startswith("WRONGTYPE")]
        if failed:
            self._failed(command, failed[0])
            return [None] * len(keys)
        self._succeeded()
        return [WRONG_TYPE if isinstance(r, Exception) else r for r in replies]

    # -- faults --------------------------------------------------------------------------------------
    def _ready(self) -> bool:
        """Whether an operation may touch the network now (not closed, not backing off)."""
        with self._lock:
            return not self._closed and time.monotonic() >= self._retry_at

    def _failed(self, operation: str, exc: BaseException) -> None:
        """Count a failure and back off: the wait doubles from ``backoff_initial`` up to ``backoff_max``."""
        with self._lock:
            self._counts["errors"] += 1
            was_connected = self._connected
            self._connected = False
            self._delay = min(self._backoff_max, max(self._backoff_initial, self._delay * 2))
            self._retry_at = time.monotonic() + self._delay * random.uniform(0.5, 1.0)
            delay = self._delay
            # idle connections went to the same server: after a restart they are all dead, and each
            # would fail once more; dropped now, they reconnect on their next use
            stale, self._spare = self._spare, []
            self._changed.notify_all()
        for conn in stale:
            conn.disconnect()
        level = logging.WARNING if was_connected or delay == self._backoff_initial else logging.DEBUG
        logger.log(
            level,
            "remote %s at %s failed (%s: %s); retrying in up to %.2fs",
            operation,
            self._url,
            type(exc).__name__,
            self._redact(str(exc)),
            delay,
        )

    def _succeeded(self) -> None:
        with self._lock:
            if not self._connected and self._delay:
                logger.info("remote tier at %s reachable again", self._url)
            self._connected = True
            self._delay = 0.0

    def _redact(self, text: str) -> str:
        text = redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- lifecycle -----------------------------------------------------------------------------------
    def stats(self) -> RemoteStats:
        """Return the counters (a consistent snapshot)."""
        with self._lock:
            return RemoteStats(
                **self._counts, pending=len(self._queue) + self._in_flight, connected=self._connected
            )

    def close(self, timeout: float = 1.0) -> None:
        """Flush for at most ``timeout`` seconds, then stop the writer and drop what is still queued.

        Returns within about ``timeout`` seconds (plus half a second at most) even when the server is
        gone or hangs: a write still in flight at the deadline is cut off by closing its connection.
        Idempotent.
        """
        deadline = time.monotonic() + timeout
        if not self._closed:
            self.flush(timeout)
        with self._lock:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._counts["dropped"] += len(dropped)
            self._changed.notify_all()
        for write in dropped:
            _finish(write, False)
        if threading.current_thread() is not self._writer:
            self._writer.join(max(0.0, deadline - time.monotonic()))
            stuck = self._writer_connection
            if self._writer.is_alive() and stuck is not None:
                stuck.disconnect()  # a send or read blocked on a hung server fails at once
                self._writer.join(0.5)
        with self._lock:
            spare, self._spare = self._spare, []
        try:
            for conn in spare:
                conn.disconnect()
            self._client.close()
        except self._redis_errors:
            pass

    def __enter__(self) -> RedisTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ttl = "" if self.ttl is None else f", ttl={self.ttl}"
        return f"RedisTier({self._url!r}, key_prefix={self.key_prefix!r}{ttl}, queue_size={self.queue_size})"


def _checked_write(
    key: bytes, payload: Any, dtype: str, shape: Sequence[int], on_done: Callable[[bool], None] | None
) -> _Write:
    """A write whose arguments were checked (so the writer thread never meets a bad one)."""
    view = byte_view(payload)
    dims = _check_shape(shape)
    if view.nbytes != payload_bytes(dtype, dims):
        raise ConfigError(
            f"payload has {view.nbytes} bytes but {dtype} {dims} needs {payload_bytes(dtype, dims)}"
        )
    return _Write(key, view, dtype, dims, on_done)


def _finish(write: _Write, sent: bool) -> None:
    """Tell a write's owner what became of it; a failing callback is logged, never propagated."""
    if write.on_done is None:
        return
    try:
        write.on_done(sent)
    except Exception:  # a callback's bug must not kill the writer thread
        logger.exception("on_done callback of remote write %s failed", write.key.decode("ascii", "replace"))


__all__ = ["RedisTier", "RemoteStats", "redact_url"]
