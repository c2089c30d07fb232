"""The remote tier's writes: the shared bounded queue (:mod:`lmcache.tiers.writer`), sent in batches.

The caller never waits on the network: :meth:`Writer.submit` queues a write (a full queue drops its
oldest one), and the queue's thread sends queued writes as pipelined ``SET`` batches straight from the
payloads' memory. What the writer needs of the server's connections and health is :class:`WriterLink`.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from lmcache.remote.replies import ReplyReader, ServerError, connect_within, raw_socket
from lmcache.remote.stats import Counters, RemoteStats
from lmcache.tiers.format import encode_header
from lmcache.tiers.writer import Write, WriteQueue, checked_write, finish

logger = logging.getLogger("lmcache.remote")


class WriterLink(Protocol):
    """What the writer needs from the connections (:class:`~lmcache.remote.connections.Connections`)."""

    @property
    def redis_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions of a failed network operation."""
        ...

    @property
    def socket_timeout(self) -> float:
        """Seconds one whole network operation may take."""
        ...

    def ready(self) -> bool:
        """Whether an operation may touch the network now."""
        ...

    def backoff_left(self) -> float:
        """Seconds until the backoff ends (0.0 when the network may be used now)."""
        ...

    def borrow(self) -> Any:
        """Lend a redis-py connection."""
        ...

    def give_back(self, conn: Any) -> None:
        """Take back a borrowed connection."""
        ...

    def succeeded(self) -> None:
        """Record that an operation reached the server."""
        ...

    def failed(self, operation: str, exc: BaseException) -> None:
        """Record a failed operation: count it and back off."""
        ...


class Writer:
    """The remote tier's writes: a :class:`~lmcache.tiers.writer.WriteQueue` whose thread sends each
    batch of up to ``batch_bytes`` as pipelined ``SET`` commands on one connection (the queue's
    :class:`~lmcache.tiers.writer.WriteSink`).

    When a batch fails, what is still queued is dropped too: the link backs off after a failure, and
    the writes would wait it out with their chunks pinned. Failures go to ``link``, which backs off, and
    the queue's thread waits for it. Locks are taken in one order only: the queue's, then the link's or
    the counters' own.
    """

    def __init__(
        self, link: WriterLink, counters: Counters, *, queue_size: int, batch_bytes: int, ttl: float | None
    ) -> None:
        self._link = link
        self._counters = counters
        self._ttl = ttl
        self._connection: Any = None  # the connection the thread is sending on, for cut_off()
        self._queue = WriteQueue(
            self,
            counters,
            queue_size=queue_size,
            batch_bytes=batch_bytes,
            logger=logger,
            drop_queued_on_failure=True,
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._queue.closed

    def snapshot(self, *, connected: bool) -> RemoteStats:
        """The counters with the writes queued or in flight now, taken together under the queue's lock:
        a write is always in exactly one of ``pending``, ``writes`` and ``dropped``."""
        return self._queue.snapshot(
            lambda pending: self._counters.snapshot(pending=pending, connected=connected)
        )

    def submit(self, write: Write) -> None:
        """Queue ``write``; when the queue is full drop the oldest one, and after :meth:`stop` this one.

        While the server is known to be unreachable (the link backs off after a failure) the write is
        dropped at once: queued, it would keep its chunk pinned until the backoff ends and the send fails
        again, and a hung server would then stall local caching for as long.
        """
        self._queue.submit(write)

    def send_now(self, write: Write) -> bool:
        """Send ``write`` from the calling thread, bypassing the queue; True when it was stored."""
        if not self._link.ready():
            return False
        conn = self._link.borrow()
        try:
            sent = self._send_batch(conn, [write])
        finally:
            self._link.give_back(conn)
        if sent:
            self._counters.add("writes")
        return sent

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was sent or dropped; False if ``timeout`` seconds passed first."""
        return self._queue.flush(timeout)

    def stop(self) -> None:
        """Stop the thread after its current batch and drop every queued write (``on_done(False)``)."""
        self._queue.stop()

    def join(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the stopped thread; then cut off a send still in flight
        (a hung server) by disconnecting its connection, and wait half a second more."""
        self._queue.join(timeout)

    # -- the queue's sink -------------------------------------------------------------------------------
    def backoff_left(self) -> float:
        """Seconds until the link's backoff ends (0.0 when the network may be used now)."""
        return self._link.backoff_left()

    def send(self, batch: list[Write]) -> bool:
        """Send ``batch`` on a borrowed connection in one round trip; True when every write was stored."""
        self._connection = conn = self._link.borrow()
        try:
            return self._send_batch(conn, batch)
        finally:
            self._connection = None
            self._link.give_back(conn)

    def cut_off(self) -> bool:
        """Disconnect the connection a batch is being sent on (a send or read blocked on a hung server
        fails at once); True when there was one."""
        stuck = self._connection
        if stuck is None:
            return False
        stuck.disconnect()
        return True

    def _send_batch(self, conn: Any, batch: list[Write]) -> bool:
        """Send SETs for ``batch`` on ``conn`` in one round trip; True when every one was stored.

        The whole round trip (every payload sent, every reply read) takes at most ``socket_timeout``
        (:class:`~lmcache.remote.replies.ReplyReader`), so a server that reads or answers slowly holds a
        batch's chunks pinned for no longer. The caller counts the writes (with its own change of state).
        """
        reader = None
        errors: tuple[type[BaseException], ...] = (*self._link.redis_errors, ServerError, ValueError)
        try:
            commands: list[Any] = []
            for write in batch:
                header = encode_header(write.key, write.payload, write.dtype, write.shape)
                commands.extend(self._pack_set(write.key, header, write.payload))
            connect_within(conn, self._link.socket_timeout)
            sock = raw_socket(conn)
            if sock is None:  # redis-py without a socket to use: its own send and parser
                conn.send_packed_command(commands)
                for _ in batch:
                    conn.read_response()
            else:
                reader = ReplyReader(sock, self._link.socket_timeout)
                for piece in commands:
                    reader.send(piece)
                for _ in batch:
                    reader.reply()
        except errors as exc:
            conn.disconnect()
            self._link.failed("write", exc)
            return False
        finally:
            if reader is not None:
                reader.finish()
        self._link.succeeded()
        return True

    def _pack_set(self, key: bytes, header: bytes, payload: memoryview) -> list[Any]:
        """RESP for ``SET key header+payload [PX ttl]``, with the payload as its own buffer (no copy)."""
        ttl = [] if self._ttl is None else [b"PX", str(max(1, round(self._ttl * 1000))).encode()]
        args = [b"SET", key]
        head = b"*%d\r\n" % (3 + len(ttl)) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        head += b"$%d\r\n" % (len(header) + payload.nbytes) + header
        tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in ttl)
        return [head, payload, tail]


__all__ = ["Write", "Writer", "WriterLink", "checked_write", "finish"]
