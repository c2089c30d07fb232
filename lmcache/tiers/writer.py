"""A tier's writes: a bounded queue, and the background thread that hands it to the tier in batches.

The caller never waits on the store: :meth:`WriteQueue.submit` queues a write (a full queue drops its
oldest one), and the queue's thread gives queued writes to the tier's :class:`WriteSink` in batches of
up to ``batch_bytes``, straight from the payloads' memory. Both tiers use it:
:class:`~lmcache.remote.writer.Writer` sends a batch as pipelined ``SET`` commands,
:class:`~lmcache.disk.DiskTier` writes each chunk to a file.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lmcache.errors import ConfigError
from lmcache.tiers.counters import Counters
from lmcache.tiers.format import byte_view, check_shape, payload_bytes

_T = TypeVar("_T")


@dataclass
class Write:
    """One checked write: ``payload`` (the chunk's own memory) under ``key``, and who to tell when done.

    ``parent`` is the tier key of the chunk this one extends (None for a first chunk, or when unknown).
    """

    key: bytes
    payload: memoryview
    dtype: str
    shape: tuple[int, int, int, int, int]
    on_done: Callable[[bool], None] | None
    parent: bytes | None = None


def checked_write(
    key: bytes,
    payload: Any,
    dtype: str,
    shape: Sequence[int],
    on_done: Callable[[bool], None] | None,
    parent: bytes | None = None,
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
    return Write(key, view, dtype, dims, on_done, parent)


def finish(write: Write, sent: bool, logger: logging.Logger | None = None) -> None:
    """Tell a write's owner what became of it; a failing callback is logged (to ``logger``, by default
    the remote tier's), never propagated."""
    if write.on_done is None:
        return
    log = logger or logging.getLogger("lmcache.remote")
    try:
        write.on_done(sent)
    except Exception:  # a callback's bug must not kill the writer thread
        log.exception(
            "on_done callback of %s write %s failed", _kind(log), write.key.decode("ascii", "replace")
        )


def _kind(logger: logging.Logger) -> str:
    """The tier a logger belongs to: the last part of its name (``lmcache.disk`` -> ``disk``)."""
    return logger.name.rpartition(".")[2]


class WriteSink(Protocol):
    """What a :class:`WriteQueue` needs from its tier: somewhere to put a batch of writes."""

    def backoff_left(self) -> float:
        """Seconds until the store may be written to again (0.0 when it may be now): while a tier
        backs off after a failure, the queue waits, and a new write is dropped at once."""
        ...

    def send(self, batch: list[Write]) -> bool:
        """Store every write of ``batch``; True when each one was stored. Never raises for a fault of
        the store (it counts it); the queue counts the writes."""
        ...

    def cut_off(self) -> bool:
        """Make a :meth:`send` still in progress fail at once (:meth:`WriteQueue.join`'s last resort,
        for a hung store); True when there was one to cut off."""
        ...


class WriteQueue:
    """A bounded queue of writes and the daemon thread that hands them to a sink, in batches.

    Fields change only here, under ``_lock``: the queue, the count of writes in flight, ``_closed``.
    Counts ``writes`` and ``dropped`` in ``counters`` under ``_lock``, with the change of the queue or of
    the in-flight count, so :meth:`snapshot` sees each queued write in exactly one of ``pending``,
    ``writes`` and ``dropped``. Locks are taken in one order only: ``_lock``, then the sink's or the
    counters' own.

    Args:
        sink: the tier's store.
        counters: the tier's counters (``writes`` and ``dropped`` are counted here).
        queue_size: the most writes waiting.
        batch_bytes: a batch takes queued writes up to this many bytes (at least one write).
        logger: where a failing batch or callback is logged; its last name part names the writer thread.
        drop_queued_on_failure: when a batch fails, drop what is queued too (a remote server that
            failed would keep the writes waiting out its backoff, their chunks pinned).
    """

    def __init__(
        self,
        sink: WriteSink,
        counters: Counters,
        *,
        queue_size: int,
        batch_bytes: int,
        logger: logging.Logger,
        drop_queued_on_failure: bool,
    ) -> None:
        self._sink = sink
        self._counters = counters
        self._queue_size = queue_size
        self._batch_bytes = batch_bytes
        self._logger = logger
        self._kind = _kind(logger)
        self._drop_on_failure = drop_queued_on_failure
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the queue, the in-flight count or _closed changed
        self._queue: collections.deque[Write] = collections.deque()
        self._in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"lmcache-{self._kind}-writer", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._closed

    def snapshot(self, build: Callable[[int], _T]) -> _T:
        """``build(pending)`` with the writes queued or in flight now, under ``_lock``: a write is always
        in exactly one of ``pending``, ``writes`` and ``dropped``."""
        with self._lock:
            return build(len(self._queue) + self._in_flight)

    def submit(self, write: Write) -> None:
        """Queue ``write``; when the queue is full drop the oldest one, and after :meth:`stop` this one.

        While the sink backs off (its store is known to be unreachable) the write is dropped at once:
        queued, it would keep its chunk pinned until the backoff ends and the send fails again.
        """
        displaced = None
        unreachable = self._sink.backoff_left() > 0
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
            finish(displaced, False, self._logger)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write was stored or dropped; False if ``timeout`` seconds passed first."""
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
            finish(write, False, self._logger)

    def join(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the stopped thread; then cut off a batch still in flight
        (a hung store) through the sink, and wait half a second more."""
        if threading.current_thread() is self._thread:
            return
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive() and self._sink.cut_off():
            self._thread.join(0.5)

    def _run(self) -> None:
        """The writer thread: hand queued writes to the sink in batches until stopped."""
        while True:
            with self._lock:
                while not self._closed and (not self._queue or self._sink.backoff_left() > 0):
                    self._changed.wait(None if not self._queue else self._sink.backoff_left())
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
                sent = self._sink.send(batch)
            except Exception:  # the writer must outlive any bug: the queue would never drain again
                self._logger.exception("%s writer failed on a batch of %d writes", self._kind, len(batch))
            finally:
                # Each write's on_done first (it unpins the chunk), then the batch leaves ``pending``
                # and flush() wakes: when flush returns True, nothing it waited for is still pinned.
                dropped: list[Write] = []
                if not sent and self._drop_on_failure:
                    with self._lock:
                        dropped = list(self._queue)
                        self._queue.clear()
                        self._counters.add("dropped", len(dropped))
                for write in batch:
                    finish(write, sent, self._logger)
                for write in dropped:
                    finish(write, False, self._logger)
                with self._lock:
                    self._counters.add("writes" if sent else "dropped", len(batch))
                    self._in_flight = 0
                    self._changed.notify_all()


__all__ = ["Write", "WriteQueue", "WriteSink", "checked_write", "finish"]
