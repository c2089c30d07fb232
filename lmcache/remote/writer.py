"""The remote tier's writes: a bounded queue and the background thread that sends it in batches.

The caller never waits on the network: :meth:`Writer.submit` queues a write (a full queue drops its
oldest one), and the writer thread sends queued writes as pipelined ``SET`` batches straight from the
payloads' memory. What the writer needs of the server's connections and health is :class:`WriterLink`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lmcache.errors import ConfigError
from lmcache.remote.format import byte_view, check_shape, encode_header, payload_bytes
from lmcache.remote.replies import ReplyReader, ServerError, connect_within, raw_socket
from lmcache.remote.stats import Counters, RemoteStats

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


@dataclass
class Write:
    """One checked write: ``payload`` (the chunk's own memory) under ``key``, and who to tell when done."""

    key: bytes
    payload: memoryview
    dtype: str
    shape: tuple[int, int, int, int, int]
    on_done: Callable[[bool], None] | None


def checked_write(
    key: bytes, payload: Any, dtype: str, shape: Sequence[int], on_done: Callable[[bool], None] | None
) -> Write:
    """A write whose arguments were checked (so the writer thread never meets a bad one).

    Raises:
        ConfigError: the payload is not C-contiguous or does not match ``dtype`` and ``shape``.
    """
    view = byte_view(payload)
    dims = check_shape(shape)
    if view.nbytes != payload_bytes(dtype, dims):
        raise ConfigError(
            f"payload has {view.nbytes} bytes but {dtype} {dims} needs {payload_bytes(dtype, dims)}"
        )
    return Write(key, view, dtype, dims, on_done)


class Writer:
    """A bounded queue of writes and the daemon thread that sends them, in batches of ``batch_bytes``.

    Fields change only here, under ``_lock``: the queue, the count of writes in flight, ``_closed``.
    Counts ``writes`` and ``dropped`` in ``counters`` under ``_lock``, with the change of the queue or of
    the in-flight count, so :meth:`snapshot` sees each queued write in exactly one of ``pending``,
    ``writes`` and ``dropped``. Failures go to ``link``, which backs off, and the thread waits for it.
    Locks are taken in one order only: ``_lock``, then the link's or the counters' own.
    """

    def __init__(
        self, link: WriterLink, counters: Counters, *, queue_size: int, batch_bytes: int, ttl: float | None
    ) -> None:
        self._link = link
        self._counters = counters
        self._queue_size = queue_size
        self._batch_bytes = batch_bytes
        self._ttl = ttl
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the queue, the in-flight count or _closed changed
        self._queue: collections.deque[Write] = collections.deque()
        self._in_flight = 0
        self._closed = False
        self._connection: Any = None  # the connection the thread is sending on, for close()
        self._thread = threading.Thread(target=self._run, name="lmcache-remote-writer", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._closed

    def snapshot(self, *, connected: bool) -> RemoteStats:
        """The counters with the writes queued or in flight now, taken together under ``_lock``: a write
        is always in exactly one of ``pending``, ``writes`` and ``dropped``."""
        with self._lock:
            return self._counters.snapshot(pending=len(self._queue) + self._in_flight, connected=connected)

    def submit(self, write: Write) -> None:
        """Queue ``write``; when the queue is full drop the oldest one, and after :meth:`stop` this one.

        While the server is known to be unreachable (the link backs off after a failure) the write is
        dropped at once: queued, it would keep its chunk pinned until the backoff ends and the send fails
        again, and a hung server would then stall local caching for as long.
        """
        displaced = None
        unreachable = self._link.backoff_left() > 0
        with self._lock:
            if self._closed or unreachable:
                displaced = write
            else:
                if len(self._queue) >= self._queue_size:
                    displaced = self._queue.popleft()
                self._queue.append(write)
                self._changed.notify_all()
            if displaced is not None:  # counted with the queue's change: stats() sees both or neither
                self._counters.add("dropped")
        if displaced is not None:
            finish(displaced, False)

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
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._in_flight:
                if not self._thread.is_alive():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left if left is not None else 0.5)
            return not self._queue and not self._in_flight

    def stop(self) -> None:
        """Stop the thread after its current batch and drop every queued write (``on_done(False)``)."""
        with self._lock:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._counters.add("dropped", len(dropped))
            self._changed.notify_all()
        for write in dropped:
            finish(write, False)

    def join(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the stopped thread; then cut off a send still in flight
        (a hung server) by disconnecting its connection, and wait half a second more."""
        if threading.current_thread() is self._thread:
            return
        self._thread.join(max(0.0, timeout))
        stuck = self._connection
        if self._thread.is_alive() and stuck is not None:
            stuck.disconnect()  # a send or read blocked on a hung server fails at once
            self._thread.join(0.5)

    def _run(self) -> None:
        """The writer thread: send queued writes in batches until stopped."""
        while True:
            with self._lock:
                while not self._closed and (not self._queue or self._link.backoff_left() > 0):
                    self._changed.wait(None if not self._queue else self._link.backoff_left())
                if self._closed:
                    return
                batch = [self._queue.popleft()]
                size = batch[0].payload.nbytes
                while self._queue and size + self._queue[0].payload.nbytes <= self._batch_bytes:
                    batch.append(self._queue.popleft())
                    size += batch[-1].payload.nbytes
                self._in_flight = len(batch)
            sent = False
            try:
                self._connection = conn = self._link.borrow()
                try:
                    sent = self._send_batch(conn, batch)
                finally:
                    self._connection = None
                    self._link.give_back(conn)
            except Exception:  # the writer must outlive any bug: the queue would never drain again
                logger.exception("remote writer failed on a batch of %d writes", len(batch))
            finally:
                # Each write's on_done first (it unpins the chunk), then the batch leaves ``pending``
                # and flush() wakes: when flush returns True, nothing it waited for is still pinned.
                dropped: list[Write] = []
                if not sent:  # the server failed: what is queued would wait out the backoff, pinned
                    with self._lock:
                        dropped = list(self._queue)
                        self._queue.clear()
                        self._counters.add("dropped", len(dropped))
                for write in batch:
                    finish(write, sent)
                for write in dropped:
                    finish(write, False)
                with self._lock:
                    self._counters.add("writes" if sent else "dropped", len(batch))
                    self._in_flight = 0
                    self._changed.notify_all()

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


def finish(write: Write, sent: bool) -> None:
    """Tell a write's owner what became of it; a failing callback is logged, never propagated."""
    if write.on_done is None:
        return
    try:
        write.on_done(sent)
    except Exception:  # a callback's bug must not kill the writer thread
        logger.exception("on_done callback of remote write %s failed", write.key.decode("ascii", "replace"))


__all__ = ["Write", "Writer", "WriterLink", "checked_write", "finish"]
