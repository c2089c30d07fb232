"""Threads: no slot handed out twice, contents intact, exact stats; the buffer pool's waiting."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import numpy as np
import pytest

from kvtest import random_bits, small_pool, to_native
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import PoolClosedError
from lmcache.storage_backend.mem_pool import LocalCPUBufferPool

THREADS = 4
SECONDS = 1.5


def test_threaded_stress_keeps_slots_exclusive(backend: str) -> None:
    pool = small_pool(backend, slots=8)
    owners: dict[int, int] = {}  # slot -> owning thread, checked under a lock of the test's own
    owners_lock = threading.Lock()
    errors: list[str] = []
    counts = {"alloc": 0, "free": 0, "failed": 0}
    counts_lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        mine: list[tuple[Any, np.ndarray]] = []
        allocs = frees = failed = 0
        fill = [random_bits((2, 2, n, 2, 8), "float16", seed=tid * 100 + n) for n in range(1, 17)]
        natives = [to_native(chunk, backend) for chunk in fill]
        try:
            while time.monotonic() < deadline:
                if mine and (rng.random() < 0.45 or len(mine) > 3):
                    obj, content = mine.pop(rng.randrange(len(mine)))
                    if obj.as_numpy().tobytes() != content.tobytes():
                        errors.append(f"thread {tid}: slot {obj.chunk_idx} was overwritten")
                    with owners_lock:
                        del owners[obj.chunk_idx]
                    pool.free(obj)
                    frees += 1
                    continue
                n = rng.randrange(16)
                obj = pool.put(natives[n]) if rng.random() < 0.5 else pool.allocate(natives[n])
                if obj is None:
                    failed += 1
                    continue
                allocs += 1
                with owners_lock:
                    if obj.chunk_idx in owners:
                        errors.append(
                            f"slot {obj.chunk_idx} handed to {tid} while {owners[obj.chunk_idx]} owns it"
                        )
                    owners[obj.chunk_idx] = tid
                obj.copy_from(natives[n])
                mine.append((obj, fill[n]))
        finally:
            for obj, _ in mine:
                with owners_lock:
                    owners.pop(obj.chunk_idx, None)
                pool.free(obj)
                frees += 1
            with counts_lock:
                counts["alloc"] += allocs
                counts["free"] += frees
                counts["failed"] += failed

    threads = [threading.Thread(target=worker, args=(tid,)) for tid in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:5]
    stats = pool.stats()
    assert counts["alloc"] > 100
    assert (stats.used, stats.free) == (0, 8)
    assert (stats.allocations, stats.frees) == (counts["alloc"], counts["free"])
    assert stats.failed_allocations == counts["failed"]


def _buffer_pool(slots: int = 1) -> LocalCPUBufferPool:
    meta = LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "float16", slots * 2048 / 2**30)
    return LocalCPUBufferPool(meta, backend="numpy")


def test_buffer_pool_waits_until_free_wakes_it() -> None:
    pool = _buffer_pool()
    chunk = random_bits((2, 2, 16, 2, 8), "float16")
    held = pool.allocate(chunk)
    assert held is not None
    assert pool.allocate(chunk) is None  # timeout 0: no wait
    timer = threading.Timer(0.2, pool.free, args=(held,))
    start = time.monotonic()
    timer.start()
    got = pool.allocate(chunk, timeout=5.0)
    waited = time.monotonic() - start
    assert got is not None
    assert got.chunk_idx == held.chunk_idx
    assert waited < 4.0, "free() must wake the waiter long before its timeout"
    assert pool.stats().failed_allocations == 1  # the timeout-0 call only: a wait that succeeds is no failure


def test_buffer_pool_times_out_with_none() -> None:
    pool = _buffer_pool()
    chunk = random_bits((2, 2, 16, 2, 8), "float16")
    assert pool.allocate(chunk) is not None
    start = time.monotonic()
    assert pool.allocate(chunk, timeout=0.1) is None
    assert time.monotonic() - start >= 0.1
    assert pool.stats().failed_allocations == 1


def test_buffer_pool_close_wakes_every_waiter() -> None:
    pool = _buffer_pool()
    chunk = random_bits((2, 2, 16, 2, 8), "float16")
    assert pool.allocate(chunk) is not None
    outcomes: list[str] = []

    def waiter() -> None:
        try:
            pool.allocate(chunk, timeout=30.0)
            outcomes.append("returned")
        except PoolClosedError:
            outcomes.append("closed")

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    pool.close()
    for thread in threads:
        thread.join(timeout=5)
    assert outcomes == ["closed"] * 3


def test_single_owner_mode_has_no_lock() -> None:
    pool = small_pool("numpy", thread_safe=False)
    assert not pool.thread_safe
    assert small_pool("numpy").thread_safe
    obj = pool.allocate(random_bits((2, 2, 16, 2, 8), "float16"))
    assert obj is not None
    pool.free(obj)
    assert pool.stats().frees == 1


@pytest.mark.parametrize("cycles", [1_000_000])
def test_a_million_cycles_do_not_grow_memory(cycles: int) -> None:
    import tracemalloc

    pool = small_pool("numpy", slots=4)
    chunk = random_bits((2, 2, 16, 2, 8), "float16")
    allocate, free = pool.allocate, pool.free
    for _ in range(1000):  # warm caches (views, dtype set) before measuring
        free(allocate(chunk))  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(cycles):
            free(allocate(chunk))  # type: ignore[arg-type]
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start < 64 * 1024, f"memory grew by {end - start} bytes over {cycles} cycles"
    assert pool.stats().frees == cycles + 1000
