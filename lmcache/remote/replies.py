"""Reading the replies of pipelined commands from the tier's own connections, payloads into slots.

redis-py's parser copies every reply through its buffers and returns ``bytes``; for a chunk that ends up
in a pool slot anyway, :class:`FetchStream` reads the payload from the socket straight into the slot
and checks it there: 1.64x redis-py's ``GET`` throughput for 256 KiB chunks and 2.52x for 32 MiB ones,
measured on a 2-core x86_64 VM (no GPU) on 2026-11-29 with
``python -m lmcache bench --quick --backend=numpy`` (docs/remote.md).

A stream touches its tier only through :class:`StreamHost`: it borrows connections and reports what
happened (hits, misses, failures); the tier alone keeps its state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Protocol

from lmcache.errors import ConfigError, RemoteValueError
from lmcache.tiers.format import HEADER, byte_view, check_header, payload_bytes, verify_checksum

logger = logging.getLogger("lmcache.remote")

WRONG_TYPE = object()  # a reply for a key that holds another Redis type (a list, a hash ...)


def connect_within(conn: Any, timeout: float) -> None:
    """Connect ``conn`` (redis-py's handshake included: HELLO, AUTH, SELECT, CLIENT SETINFO) within
    ``timeout`` seconds in all, not per ``recv``; a no-op when it is connected already.

    A server that trickles the handshake is cut off when the time is up (its connection is closed under
    the blocked read); whatever a broken handshake raises inside redis-py (a reply of the wrong type
    gives an ``AttributeError`` there) becomes a :class:`ConnectionError`, a network failure like any
    other, so no remote fault escapes into the cache.
    """
    if getattr(conn, "_sock", None) is not None:  # connected already (redis-py keeps its socket there)
        return
    cut_off = threading.Event()

    def cut() -> None:
        cut_off.set()
        conn.disconnect()

    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
    except OSError:
        raise
    except Exception as exc:  # a hostile or broken server's handshake must fail soft
        conn.disconnect()
        raise ConnectionError(f"the server's handshake failed ({type(exc).__name__}: {exc})") from exc
    finally:
        watchdog.cancel()
    if cut_off.is_set():
        conn.disconnect()
        raise TimeoutError(f"the server did not complete its handshake within socket_timeout={timeout}s")


def raw_socket(conn: Any) -> Any | None:
    """The connected socket of a redis-py connection, or None where redis-py exposes none.

    The tier reads replies from it itself (:class:`ReplyReader`); where it is None (a future redis-py
    without ``_sock``), callers fall back to redis-py's own parser: the same results, one more copy.
    """
    sock = getattr(conn, "_sock", None)
    if sock is None or not hasattr(sock, "recv_into"):
        return None
    return sock


class StreamHost(Protocol):
    """What a :class:`FetchStream` needs from its tier (:class:`~lmcache.remote.RedisTier` implements it).

    The stream reads and reports; only the host changes the host's state (counters, backoff, idle
    connections), each method under the host's own lock.
    """

    @property
    def redis_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions of a failed network operation (redis-py's errors and ``OSError``)."""
        ...

    @property
    def read_errors(self) -> tuple[type[BaseException], ...]:
        """:attr:`redis_errors` and the errors of replies out of step (a length that is no number)."""
        ...

    @property
    def socket_timeout(self) -> float:
        """Seconds one whole network operation may take (a pipelined read of every reply included)."""
        ...

    def ready(self) -> bool:
        """Whether an operation may touch the network now (not closed, not backing off)."""
        ...

    def borrow(self) -> Any:
        """Lend a redis-py connection (it connects on first use); hand it back with :meth:`give_back`."""
        ...

    def give_back(self, conn: Any) -> None:
        """Take back a borrowed connection (disconnected already if its replies are out of step)."""
        ...

    def pipelined(self, command: str, keys: list[bytes]) -> list[Any]:
        """Run ``command key`` for every key through redis-py in one round trip (Nones on a failure)."""
        ...

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (``hits``, ``misses`` or ``corrupt``)."""
        ...

    def succeeded(self) -> None:
        """Record that an operation reached the server (ends a backoff)."""
        ...

    def failed(self, operation: str, exc: BaseException) -> None:
        """Record a failed operation: count it and back off."""
        ...

    def protocol_error(self, message: str) -> Exception:
        """An exception (one of :attr:`read_errors`) for a reply that breaks the protocol."""
        ...


class FetchStream:
    """The replies of one pipelined ``GET`` of several chunks, read in order, payloads into caller buffers.

    For a key at ``index``, :meth:`hit` reads its reply up to the payload and says whether it is a value
    of the expected dtype, shape and length; then :meth:`read_into` reads the payload straight from the
    socket into a buffer of the caller's (a pool slot) and checks the checksum. Indices only go forward;
    replies skipped over are read and dropped. The stream ends (every later call answers False) at the
    first miss, rejected value or failure; the tier's counters count each. Closing a stream with replies
    left unread closes its connection, so they can never answer another command.

    Where redis-py exposes no socket (a future version), the replies are read with redis-py instead and
    copied: the same results, one more copy.
    """

    def __init__(self, host: StreamHost, keys: list[bytes], dtype: str, dims: list[tuple[int, ...]]) -> None:
        self._host = host
        self._keys = keys
        self._dtype = dtype
        self._dims = dims
        self._index = -1  # the reply being read
        self._consumed = 0  # replies read to their end
        self._pending = 0  # bytes of the current reply not yet read (payload and CRLF)
        self._header = bytearray(HEADER.size)
        self._checksum = 0
        self._done = not keys or not host.ready()
        self._conn: Any = None
        self._reader: ReplyReader | None = None
        self._values: list[Any] | None = None  # the fallback: replies read by redis-py
        if self._done:
            return
        conn = host.borrow()
        try:
            connect_within(conn, host.socket_timeout)
            sock = raw_socket(conn)
            if sock is None:
                host.give_back(conn)
                self._values = host.pipelined("GET", keys)
                return
            self._conn = conn
            self._reader = ReplyReader(sock, host.socket_timeout)
            self._reader.send(pack_commands(b"GET", keys))
        except host.redis_errors as exc:
            self._fail(exc, conn)

    def hit(self, index: int) -> bool:
        """Read the reply for ``keys[index]`` up to its payload (dropping earlier unread replies).

        Returns True when it is a value of this key's dtype, shape and length, whose payload
        :meth:`read_into` reads next; False for a miss, a rejected value, a failure, or an index at or
        before one already read (the stream then ends).
        """
        if self._done or not self._index < index < len(self._keys):
            return self._end(None)
        key, dims = self._keys[index], self._dims[index]
        try:
            if self._values is not None:
                self._index = index
                value = self._values[index]
                if value is None or value is WRONG_TYPE or len(value) < HEADER.size:
                    return self._end("misses" if value is None else "corrupt")
                self._header[:] = value[: HEADER.size]
                self._checksum = check_header(self._header, len(value), self._dtype, dims)
                return True
            while self._index < index:  # drop what is left of the current reply and of skipped ones
                self._drop_rest()
                self._index += 1
                if self._index < index:
                    skipped = self._read_length()
                    if skipped < 0:  # a miss or another type: the line was the whole reply
                        self._consumed += 1
                    self._pending = skipped + 2 if skipped >= 0 else 0
            length = self._read_length()
            if length < 0:
                self._consumed += 1
                return self._end("misses" if length == -1 else "corrupt")
            self._pending = length + 2
            if length < HEADER.size:
                raise RemoteValueError(
                    f"value of {length} bytes is shorter than the {HEADER.size}-byte header"
                )
            self._read(memoryview(self._header))
            self._checksum = check_header(self._header, length, self._dtype, dims)
            return True
        except RemoteValueError as exc:
            logger.warning("remote value %s rejected: %s", key.decode("ascii", "replace"), exc)
            return self._end("corrupt")
        except self._host.read_errors as exc:
            self._fail(exc, self._conn)
            return False

    def read_into(self, destination: Any) -> bool:
        """Read the payload announced by :meth:`hit` into ``destination`` (a C-contiguous buffer of
        exactly the chunk's bytes) and check its checksum; True when the bytes there are the chunk's.

        On False the destination holds garbage: do not use it.
        """
        if self._done or self._index < 0:
            return False
        view = byte_view(destination)
        key = self._keys[self._index]
        if view.nbytes != payload_bytes(self._dtype, self._dims[self._index]):
            raise ConfigError(f"destination has {view.nbytes} bytes; the chunk has a different size")
        try:
            if self._values is not None:
                view[:] = memoryview(self._values[self._index]).cast("B")[HEADER.size :]
            else:
                self._read(view)
                self._drop_rest()  # the reply's closing CRLF
            verify_checksum(key, self._header, view, self._checksum)
        except RemoteValueError as exc:
            logger.warning("remote value %s rejected: %s", key.decode("ascii", "replace"), exc)
            return self._end("corrupt")
        except self._host.redis_errors as exc:
            self._fail(exc, self._conn)
            return False
        self._host.count("hits")
        self._host.succeeded()
        return True

    def close(self) -> None:
        """End the stream: give the connection back, or close it if replies are left unread."""
        self._done = True
        if self._reader is not None:
            self._reader.finish()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self._consumed < len(self._keys):
                conn.disconnect()  # unread replies would answer the connection's next command
            self._host.give_back(conn)

    def _read_length(self) -> int:
        """Read a reply's first line: the bulk length, -1 for a miss, -2 for a value of another type."""
        if self._reader is None:
            raise ConnectionError("the stream has no connection")
        line = self._reader.line()
        if line in (b"$-1", b"_"):
            return -1
        if line.startswith(b"-WRONGTYPE"):
            return -2
        if not line.startswith(b"$"):
            raise self._host.protocol_error(f"unexpected reply {line[:40]!r} to GET")
        return int(line[1:])

    def _read(self, view: memoryview) -> None:
        if self._reader is None:
            raise ConnectionError("the stream has no connection")
        self._reader.read_into(view)
        self._pending -= view.nbytes

    def _drop_rest(self) -> None:
        """Read and drop the rest of the current reply (a payload not read, its CRLF)."""
        if self._pending and self._reader is not None:
            self._reader.skip(self._pending)
            self._pending = 0
            self._consumed += 1

    def _end(self, counter: str | None) -> bool:
        if counter is not None:
            self._host.count(counter)
        if not self._done and counter != "corrupt":
            self._host.succeeded()
        self.close()
        return False

    def _fail(self, exc: BaseException, conn: Any) -> None:
        if conn is not None:
            conn.disconnect()
        self._host.failed("GET", exc)
        self.close()

    def __enter__(self) -> FetchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReplyReader:
    """Reads RESP replies from a socket within one deadline: lines through a small buffer, payloads
    straight into buffers.

    ``timeout`` bounds the whole operation, not each ``recv``: a server that trickles its reply (a byte
    every few milliseconds, each ``recv`` well inside a per-call timeout) fails it with
    :class:`TimeoutError` once ``timeout`` seconds have passed since the reader was made. Before each
    send or receive the socket's own timeout is set to what is left; :meth:`finish` restores it (redis-py
    reads later replies on the same socket with its own timeout).
    """

    def __init__(self, sock: Any, timeout: float) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._restore = sock.gettimeout()

    def send(self, data: bytes | memoryview) -> None:
        """Send ``data`` whole, within what is left of the deadline."""
        self._arm()
        self._sock.sendall(data)

    def line(self) -> bytes:
        """The next CRLF-terminated line, without the CRLF."""
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            self._receive()

    def reply(self) -> Any:
        """Read one whole reply: ``bytes`` (a bulk or simple string), an ``int``, None (a nil), or
        :data:`WRONG_TYPE`; any other error reply raises :class:`ServerError`."""
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            value = bytearray(length + 2)
            self.read_into(memoryview(value))
            del value[length:]
            return bytes(value)
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"_":
            return None
        if kind == b"-":
            if rest.startswith(b"WRONGTYPE"):
                return WRONG_TYPE
            raise ServerError(rest.decode("utf-8", "replace"))
        raise ValueError(f"unexpected reply {line[:40]!r}")

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: first from what is buffered, then from the socket, without a copy."""
        taken = min(len(self._buffer), view.nbytes)
        view[:taken] = self._buffer[:taken]
        del self._buffer[:taken]
        while taken < view.nbytes:
            self._arm()
            got = self._sock.recv_into(view[taken:])
            if not got:
                raise ConnectionError("the server closed the connection mid-reply")
            taken += got

    def skip(self, count: int) -> None:
        """Read and drop ``count`` bytes."""
        scratch = memoryview(bytearray(min(count, 1 << 20)))
        while count:
            part = scratch[: min(count, scratch.nbytes)]
            self.read_into(part)
            count -= part.nbytes

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return len(self._buffer)

    def finish(self) -> None:
        """Give the socket its own timeout back (never raises: the socket may be closed already)."""
        with contextlib.suppress(OSError):
            self._sock.settimeout(self._restore)

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"the server did not complete its reply within socket_timeout={self._timeout}s"
            )
        self._sock.settimeout(left)

    def _receive(self) -> None:
        self._arm()
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-reply")
        self._buffer += chunk


class ServerError(Exception):
    """An error reply from the server (other than ``WRONGTYPE``): the operation failed there."""


def pack_commands(command: bytes, keys: list[bytes]) -> bytes:
    """RESP for ``command key`` once per key, for one pipelined send."""
    head = b"*2\r\n$%d\r\n%s\r\n" % (len(command), command)
    return b"".join(head + b"$%d\r\n%s\r\n" % (len(key), key) for key in keys)


__all__ = [
    "WRONG_TYPE",
    "connect_within",
    "FetchStream",
    "ReplyReader",
    "ServerError",
    "StreamHost",
    "pack_commands",
    "raw_socket",
]
