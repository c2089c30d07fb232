"""A busy machine for the bench's loaded variant: CPU-bound processes that spin beside the benchmarks.

A serving host is never idle; a copy or gather that collapses when another process takes a core is a
real weakness. :func:`busy_processes` starts ``count`` processes that each spin a pure-Python loop (one
core each, no memory traffic to speak of) and stops them on exit.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator


def _spin() -> None:
    value = 0
    while True:
        value = (value * 1_103_515_245 + 12_345) & 0xFFFFFFFF


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """Run ``count`` CPU-bound processes for the duration of the ``with`` block."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds framework threads
    workers = [context.Process(target=_spin, daemon=True, name="lmcache-bench-busy") for _ in range(count)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(5)


__all__ = ["busy_processes"]
