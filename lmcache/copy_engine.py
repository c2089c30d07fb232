"""Large host copies at the machine's memory bandwidth: one copy split over a few threads.

One thread cannot saturate a machine's memory bandwidth (measured on the 2-CPU development VM: 15 GB/s
for ``numpy.copyto`` of 32 MiB, 25 GB/s split over two threads, with nothing else running; see
docs/benchmarks.md). numpy releases the GIL while it copies, so a copy split into pieces runs in
parallel on plain threads.

The engine is robust under load by construction: the calling thread copies pieces itself, pulling them
from the same shared counter as the helper threads, so a helper that the scheduler leaves waiting (the
machine is busy with other work) delays at most the piece it took, never the whole copy. Copies below
:data:`MIN_SPLIT_BYTES` stay on the calling thread (small copies are cache-resident: splitting them
costs more than it gains).

The thread count is bounded: ``LMCACHE_COPY_THREADS`` (default: the CPUs this process may run on, at
most :data:`MAX_THREADS`), or :func:`set_threads`. After ``os.fork()`` a child starts with no helper
threads and makes new ones on its first large copy.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from lmcache.errors import ConfigError

#: Copies smaller than this many bytes are not split.
MIN_SPLIT_BYTES = 4 << 20
#: Bytes per piece of a split copy (at least; pieces are whole slices of one axis).
PIECE_BYTES = 2 << 20
#: The most threads a copy uses (the calling thread included).
MAX_THREADS = 16
_ENV = "LMCACHE_COPY_THREADS"


def _default_threads() -> int:
    configured = os.environ.get(_ENV)
    if configured:
        try:
            count = int(configured)
        except ValueError:
            raise ConfigError(f"${_ENV} must be a positive int, got {configured!r}") from None
        if count < 1:
            raise ConfigError(f"${_ENV} must be a positive int, got {configured!r}")
        return min(count, MAX_THREADS)
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_THREADS))


class _Job:
    """One split copy (or any batch of tasks): tasks claimed in order by whichever thread asks next.

    The job lets go of its tasks (and so of the arrays they hold) before :meth:`wait` returns: a task may
    hold a view that pins its memory (a DLPack export of a JAX buffer, which XLA cannot donate while it
    lives), and a job can outlive the copy in the helpers' queue or in a helper's last frame.
    """

    __slots__ = ("_active", "_count", "_done", "_error", "_finished", "_lock", "_next", "_pieces")

    def __init__(self, pieces: Sequence[Callable[[], object]]) -> None:
        self._pieces = pieces
        self._count = len(pieces)
        self._lock = threading.Lock()
        self._next = 0
        self._done = 0
        self._active = 0  # threads inside run()
        self._error: BaseException | None = None
        self._finished = threading.Event()

    def run(self) -> None:
        """Run tasks until none is left to claim."""
        with self._lock:
            self._active += 1
        self._work()  # its frame, which holds the tasks, is gone when it returns
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._done == self._count:
                self._pieces = ()
                self._finished.set()

    def _work(self) -> None:
        pieces, lock = self._pieces, self._lock
        while True:
            with lock:
                index = self._next
                if index >= len(pieces):
                    return
                self._next = index + 1
            try:
                pieces[index]()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
                with lock:
                    self._error = self._error or exc
            with lock:
                self._done += 1

    def wait(self) -> None:
        """Wait for every piece (claimed by others) to be copied and every thread to have let go of the
        tasks; re-raise a piece's error."""
        self._finished.wait()
        if self._error is not None:
            raise self._error


class CopyEngine:
    """Copies numpy arrays with up to ``threads`` threads (the caller's included).

    Helper threads are daemons started on the first large copy and fed from one queue; the engine holds
    no other state, so concurrent copies from several threads share the helpers safely.
    """

    def __init__(
        self, threads: int, *, min_split_bytes: int = MIN_SPLIT_BYTES, piece_bytes: int = PIECE_BYTES
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise ConfigError(f"threads must be an int in 1..{MAX_THREADS}, got {threads!r}")
        if min(min_split_bytes, piece_bytes) < 1:
            raise ConfigError("min_split_bytes and piece_bytes must be positive")
        #: Threads a large copy uses, the calling thread included.
        self.threads = threads
        self._min_split = min_split_bytes
        self._piece = piece_bytes
        self._tasks: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``numpy.copyto(dst, src, casting="no")``, split over the engine's threads when large.

        Arrays that may share memory are copied by numpy in one piece (it buffers overlapping copies;
        pieces copied in parallel could read bytes another piece already wrote), as are small copies
        and copies that broadcast.
        """
        if (
            self.threads == 1
            or dst.nbytes < self._min_split
            or dst.shape != src.shape
            or np.may_share_memory(dst, src)
        ):
            np.copyto(dst, src, casting="no")
            return
        pieces = _split(dst, src, max(2, dst.nbytes // self._piece))
        if len(pieces) < 2:
            np.copyto(dst, src, casting="no")
            return
        self.run([partial(np.copyto, d, s, casting="no") for d, s in pieces])

    def run(self, tasks: Sequence[Callable[[], object]]) -> None:
        """Run ``tasks`` (callables that release the GIL while they move bytes: numpy and torch copies)
        on the engine's threads, the calling thread included, and return when all are done.

        Tasks are claimed one at a time from a shared counter, so a thread the scheduler leaves waiting
        delays only the task it holds. They must touch disjoint memory (they run in any order, in
        parallel). If tasks raise, the first error is re-raised once every task has run or failed.
        """
        if not tasks:
            return
        job = _Job(tasks)
        if self.threads > 1 and len(tasks) > 1:
            self._ensure_helpers()
            for _ in range(min(self.threads - 1, len(tasks) - 1)):
                self._tasks.put(job)
        job.run()
        job.wait()

    def _ensure_helpers(self) -> None:
        if len(self._helpers) == self.threads - 1 and all(t.is_alive() for t in self._helpers):
            return
        with self._start_lock:
            self._helpers = [t for t in self._helpers if t.is_alive()]
            while len(self._helpers) < self.threads - 1:
                helper = threading.Thread(target=self._serve, name="lmcache-copy", daemon=True)
                helper.start()
                self._helpers.append(helper)

    def _serve(self) -> None:
        while True:
            job = self._tasks.get()
            if job is None:
                return
            job.run()
            del job  # not held while waiting for the next one

    def stop(self) -> None:
        """Stop the helper threads (they finish the piece they hold); later copies start new ones."""
        with self._start_lock:
            for _ in self._helpers:
                self._tasks.put(None)
            self._helpers = []

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's helpers (they do not exist here) and their queue."""
        self._tasks = queue.SimpleQueue()
        self._helpers = []
        self._start_lock = threading.Lock()


def _split(dst: np.ndarray, src: np.ndarray, wanted: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a copy into about ``wanted`` pieces of whole slices along one axis (views, no copy).

    Contiguous pairs are cut as flat byte ranges; others along the outermost axis long enough to give
    ``wanted`` pieces (or the longest axis).
    """
    if dst.flags.c_contiguous and src.flags.c_contiguous:
        dst, src = dst.reshape(-1), src.reshape(-1)
        axis = 0
    else:
        long_enough = [axis for axis, size in enumerate(dst.shape) if size >= wanted]
        axis = long_enough[0] if long_enough else int(np.argmax(dst.shape))
    size = dst.shape[axis]
    count = max(1, min(wanted, size))
    bounds = [size * i // count for i in range(count + 1)]
    index: list[Any] = [slice(None)] * dst.ndim
    pieces = []
    for start, stop in itertools.pairwise(bounds):
        if stop > start:
            index[axis] = slice(start, stop)
            pieces.append((dst[tuple(index)], src[tuple(index)]))
    return pieces


_ENGINE = CopyEngine(_default_threads())


def copy(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy with the process's engine (see :class:`CopyEngine.copy`)."""
    _ENGINE.copy(dst, src)


def run(tasks: Sequence[Callable[[], object]]) -> None:
    """Run tasks on the process's engine (see :meth:`CopyEngine.run`)."""
    _ENGINE.run(tasks)


def threads() -> int:
    """How many threads a large copy uses now (the calling thread included)."""
    return _ENGINE.threads


def set_threads(count: int) -> None:
    """Use ``count`` threads (1 .. :data:`MAX_THREADS`) for large copies from now on.

    Raises:
        ConfigError: ``count`` is out of range (nothing changes).
    """
    global _ENGINE
    engine = CopyEngine(count)
    old, _ENGINE = _ENGINE, engine
    old.stop()


os.register_at_fork(after_in_child=lambda: _ENGINE.reset_after_fork())

__all__ = [
    "MAX_THREADS",
    "MIN_SPLIT_BYTES",
    "PIECE_BYTES",
    "CopyEngine",
    "copy",
    "run",
    "set_threads",
    "threads",
]
