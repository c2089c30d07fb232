"""The pool's own benchmarks: allocate/free, batches, copies, pool-size scaling, construction, views.

The allocator rows compare against :class:`NaivePool`, which reproduces LMCache 0.3.11's
``LocalCPUPool``, measured in the same run; copies compare against ``numpy.copyto`` of the same bytes.
Frameworks are imported only for the backends that are benchmarked.
"""

from __future__ import annotations

import gc
import math
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from lmcache import copy_engine
from lmcache.bench import common
from lmcache.bench.common import Options, Result
from lmcache.errors import BenchmarkError

TINY_SHAPE = (1, 1, 16, 1, 8)  # 256 B chunks, for pool-size scaling
BATCH_SHAPE = (1, 2, 16, 1, 64)  # 4 KiB chunks, for batches of 1024
BIG_POOL_SHAPE = (1, 2, 64, 1, 64)  # 16 KiB chunks: a 16 GiB pool has 1M slots
BOOKKEEPING_TARGET = 64  # bytes per slot at most, for the 1M-slot pool (DESIGN section 7)
BASELINE_NAME = "LMCache 0.3.11's LocalCPUPool"


# -- the baseline ------------------------------------------------------------------------------------
@dataclass
class _NaiveKVObj:
    """LMCache 0.3.11's KVObj, as it is there: a plain dataclass."""

    chunk_idx: int
    size: int
    data: Any


class NaivePool:
    """The baseline: LMCache 0.3.11's ``LocalCPUPool``, reproduced. A list of per-chunk arrays,
    ``list.pop``/``append``, a fresh slice per allocate; no checks, no lock, no generations."""

    def __init__(self, chunks: list[Any], size: int) -> None:
        self.mem_pool = chunks
        self.free_pool = list(range(len(chunks)))
        self.size_per_chunk = size

    def allocate(self, kv_chunk: Any) -> _NaiveKVObj | None:
        """Pop the last free slot and return a handle whose data is that chunk sliced to
        ``kv_chunk``'s token count (dim 2); None when every slot is taken. Nothing else of
        ``kv_chunk`` is checked, as in 0.3.11."""
        num_tok = kv_chunk.shape[2]
        if not self.free_pool:
            return None
        chunk_idx = self.free_pool.pop()
        return _NaiveKVObj(chunk_idx, self.size_per_chunk, self.mem_pool[chunk_idx][:, :, 0:num_tok])

    def free(self, kv_obj: _NaiveKVObj) -> None:
        """Append the handle's slot to the free list, unchecked: a double free makes two later
        allocations share one slot, as in 0.3.11."""
        self.free_pool.append(kv_obj.chunk_idx)


# -- measurements ------------------------------------------------------------------------------------
def _cycle(pool: Any, chunk: Any, ops: int, touch: bool) -> Callable[[], float]:
    """A trial of ``ops`` allocate (+ ``.data`` when ``touch``) + free pairs; seconds per pair."""
    allocate, free = pool.allocate, pool.free

    def run() -> float:
        start = time.perf_counter()
        if touch:
            for _ in range(ops):
                obj = allocate(chunk)
                obj.data  # noqa: B018 - touching the view is part of what is measured
                free(obj)
        else:
            for _ in range(ops):
                free(allocate(chunk))
        return (time.perf_counter() - start) / ops

    return run


def bench_alloc_free(backend: str, opts: Options) -> list[Result]:
    """allocate + touch .data + free, full and partial chunks, against LMCache 0.3.11's pool."""
    results = []
    shape, dtype = opts.shape, opts.dtype
    tokens_partial = max(1, shape[2] // 2)
    partial_shape = (shape[0], shape[1], tokens_partial, shape[3], shape[4])
    safe = common.pool(backend, shape, dtype, opts.pool_gib)
    single = common.pool(backend, shape, dtype, opts.pool_gib, thread_safe=False)
    naive_backend = "numpy" if backend == "jax" else backend  # eager JAX slicing copies: no fair naive JAX
    # The baseline's memory: every slot of a pool of the same size, held for the whole run.
    arena = common.pool(naive_backend, shape, dtype, opts.pool_gib, thread_safe=False)
    full_chunk = common.shape_only(naive_backend, shape, dtype)
    naive_chunks = [arena.allocate(full_chunk).data for _ in range(arena.max_chunk_num)]  # type: ignore[union-attr]
    naive = NaivePool(naive_chunks, arena.size_per_chunk)
    # DESIGN.md section 7 sets targets for the torch pool against LMCache 0.3.11's (thread-safe, checks
    # on); single-owner mode and the numpy / JAX rows are reported without a target.
    has_target = backend == "torch"
    # Issue 23 sets the guard at >= 1.0x of LMCache 0.3.11's unchecked pool for both (DESIGN section 7's
    # 2x and 1.5x predate per-owner views and ownership checks on every use, which stay).
    for label, chunk_shape, target in (
        ("full", shape, 1.0),
        (f"partial ({tokens_partial} tokens)", partial_shape, 1.0),
    ):
        chunk = common.shape_only(backend, chunk_shape, dtype)
        naive_chunk = common.shape_only(naive_backend, chunk_shape, dtype)
        for pool in (safe, single):  # JAX keeps pristine views per slot: make each once, as in a long run
            for obj in [pool.allocate(chunk) for _ in range(pool.max_chunk_num)]:
                obj.data  # noqa: B018
                pool.free(obj)
        best = common.best(
            {
                "safe": _cycle(safe, chunk, opts.ops, touch=True),
                "single": _cycle(single, chunk, opts.ops, touch=True),
                "naive": _cycle(naive, naive_chunk, opts.ops, touch=True),
            },
            opts.repeat,
        )
        for mode in ("safe", "single"):
            what = "thread-safe" if mode == "safe" else "single-owner"
            results.append(
                Result(
                    f"allocate+.data+free, {label}, {what}",
                    backend,
                    1 / best[mode],
                    "ops/s",
                    1 / best["naive"],
                    f"{BASELINE_NAME}, {naive_backend}",
                    best["naive"] / best[mode],
                    target if has_target and mode == "safe" else None,
                    "each allocate makes the owner's own view (torch: detached alias)"
                    if backend != "jax"
                    else "a pristine JAX view is reused per slot",
                    headline=has_target and mode == "safe" and label == "full",
                )
            )
    return results


def bench_backend_parity(backends: Sequence[str], opts: Options) -> list[Result]:
    """allocate+free (no view) of each backend against the numpy backend, and first .data access."""
    results = []
    chunk_np = common.shape_only("numpy", opts.shape, opts.dtype)
    numpy_pool = common.pool("numpy", opts.shape, opts.dtype, opts.pool_gib)
    for backend in backends:
        if backend == "numpy":
            continue
        pool = common.pool(backend, opts.shape, opts.dtype, opts.pool_gib)
        best = common.best(
            {
                "backend": _cycle(
                    pool, common.shape_only(backend, opts.shape, opts.dtype), opts.ops, touch=False
                ),
                "numpy": _cycle(numpy_pool, chunk_np, opts.ops, touch=False),
            },
            opts.repeat,
        )
        results.append(
            Result(
                "allocate+free (no view) vs numpy backend",
                backend,
                1 / best["backend"],
                "ops/s",
                1 / best["numpy"],
                "numpy pool",
                best["numpy"] / best["backend"],
            )
        )
    for backend in backends:
        for tokens in (opts.shape[2], max(1, opts.shape[2] // 2)):
            pool = common.pool(backend, opts.shape, opts.dtype, opts.pool_gib)
            chunk = common.shape_only(backend, (*opts.shape[:2], tokens, *opts.shape[3:]), opts.dtype)
            objs = [pool.allocate(chunk) for _ in range(pool.max_chunk_num)]
            start = time.perf_counter()
            for obj in objs:
                obj.data  # noqa: B018
            first = (time.perf_counter() - start) / len(objs)
            start = time.perf_counter()
            for obj in objs:
                obj.data  # noqa: B018
            again = (time.perf_counter() - start) / len(objs)
            results.append(
                Result(
                    f"first .data access, {tokens} tokens",
                    backend,
                    first * 1e6,
                    "us",
                    note=f"the owner's own view; later accesses (ownership checked) {again * 1e6:.3f} us",
                )
            )
    return results


def bench_batch(backend: str, opts: Options) -> list[Result]:
    """allocate_batch(1024) + free_batch per chunk, against 1024 single allocate + free."""
    count = 1024
    pool = common.pool(backend, BATCH_SHAPE, opts.dtype, 2 * count * 4096 / 2**30)
    chunk = common.shape_only(backend, BATCH_SHAPE, opts.dtype)
    chunks = [chunk] * count

    rounds = 16  # batches per trial: one batch is too short to time reliably

    def batch() -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            pool.free_batch(pool.allocate_batch(chunks))
        return (time.perf_counter() - start) / (rounds * count)

    def batch_touched() -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            objs = pool.allocate_batch(chunks)
            for obj in objs:  # builds every KVObj and reads its view
                obj.data  # noqa: B018
            pool.free_batch(objs)
        return (time.perf_counter() - start) / (rounds * count)

    best = common.best(
        {
            "batch": batch,
            "touched": batch_touched,
            "single": _cycle(pool, chunk, rounds * count, touch=False),
        },
        opts.repeat,
    )
    return [
        Result(
            f"allocate_batch(1024)+free_batch per chunk{suffix}",
            backend,
            best[key] * 1e6,
            "us/chunk",
            best["single"] * 1e6,
            "1024 single allocate+free",
            best["single"] / best[key],
            target,
        )
        for key, suffix, target in (
            ("batch", "", 5.0),
            ("touched", ", every KVObj built and .data read", None),
        )
    ]


def bench_copy(backend: str, opts: Options) -> list[Result]:
    """copy_from, put and copy_to of a full chunk, against the best copy the machine can do of the same
    bytes in the same run (the fastest of numpy.copyto, torch's copy_ and a multi-threaded copy), with the
    copy engine on 1 thread, 2 threads and every CPU.

    copy_to writes into an array of the pool's framework (torch) or into numpy (numpy, and JAX, whose
    arrays are immutable).
    """
    pool = common.pool(backend, opts.shape, opts.dtype, max(opts.pool_gib, 0.1))
    src = common.filled(backend, opts.shape, opts.dtype)
    src_np = common.filled("numpy", opts.shape, opts.dtype)
    dst_np = np.empty_like(src_np)
    dst = common.filled("torch", opts.shape, opts.dtype) if backend == "torch" else np.empty_like(src_np)
    obj = pool.allocate(src)
    nbytes = src_np.nbytes
    if obj is None:
        raise BenchmarkError(
            f"the copy benchmark's pool of {max(opts.pool_gib, 0.1):g} GiB has no slot for one chunk of "
            f"{opts.shape}: pass a larger --pool-gib or a smaller --shape"
        )
    np.copyto(dst_np, src_np)  # fault the pages in
    obj.copy_from(src)
    obj.copy_to(dst)

    def put_free() -> None:
        pool.free(pool.put(src))

    ours = {
        "copy_from": common.timed(lambda: obj.copy_from(src)),
        "put": common.timed(put_free),
        "copy_to": common.timed(lambda: obj.copy_to(dst)),
    }
    default = copy_engine.threads()
    counts = sorted({1, min(2, default), default})
    results = []
    try:
        for count in counts:
            copy_engine.set_threads(count)
            baselines = common.copy_baselines(dst_np, src_np, count)
            best = common.best({**ours, **baselines}, opts.repeat)
            machine = min(baselines, key=lambda name: best[name])
            floor = nbytes / best[machine] / 1e9
            for name in ours:
                gbps = nbytes / best[name] / 1e9
                results.append(
                    Result(
                        f"{name} bandwidth ({nbytes >> 20} MiB chunk), {count} thread{'s' * (count > 1)}",
                        backend,
                        gbps,
                        "GB/s",
                        floor,
                        f"best machine copy: {machine}",
                        gbps / floor,
                        0.9,
                        headline=count == default and name != "put" and backend == "torch",
                    )
                )
    finally:
        copy_engine.set_threads(default)
    return results


def bench_scaling(opts: Options) -> list[Result]:
    """allocate+free cost in a 1M-slot pool against a 1k-slot pool, tiny chunks.

    Each pool is filled, then a random half of its slots is freed, so that the free slots (and the
    generations and views the allocator touches) are spread over the whole pool. Then the same churn
    runs in both: 512 live handles, each step frees a random one and allocates a new one.
    """
    slot = 256
    pools: dict[str, Any] = {}
    churns: dict[str, Callable[[], float]] = {}
    for label, slots in (("1k", 1024), ("1M", 1 << 20)):
        pool = common.pool("numpy", TINY_SHAPE, "float16", slots * slot / 2**30)
        chunk = common.shape_only("numpy", TINY_SHAPE, "float16")
        filled = pool.allocate_batch([chunk] * slots)  # lazy handles: no million Python objects
        for i in random.Random(1).sample(range(slots), slots // 2):
            pool.free(filled[i])
        live = [pool.allocate(chunk) for _ in range(512)]
        rng = random.Random(0)
        picks = [rng.randrange(len(live)) for _ in range(opts.ops)]
        pools[label] = (pool, filled)
        churns[label] = partial(_churn, pool, chunk, live, picks)
    costs = common.best(churns, opts.repeat)
    del pools, churns
    gc.collect()
    return [
        Result(
            "allocate+free cost, 1M-slot pool vs 1k-slot pool",
            "numpy",
            costs["1M"] * 1e6,
            "us/op",
            costs["1k"] * 1e6,
            "1k-slot pool",
            costs["1k"] / costs["1M"],
            1 / 1.15,
            "target: within 1.15x",
        )
    ]


def _churn(pool: Any, chunk: Any, live: list[Any], picks: list[int]) -> float:
    """Free the live object at each pick and allocate a new one in its place; seconds per pair."""
    allocate, free = pool.allocate, pool.free
    start = time.perf_counter()
    for i in picks:
        free(live[i])
        live[i] = allocate(chunk)
    return (time.perf_counter() - start) / len(picks)


def _rss_bytes() -> int:
    """The process's resident memory in bytes (Linux); 0 where /proc is not there."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def bench_construction(backend: str, opts: Options) -> list[Result]:
    """Construction time, resident memory touched and bookkeeping per slot of a large CPU pool."""
    from lmcache.hostmem import available_host_bytes

    available = available_host_bytes()
    gib = opts.big_pool_gib
    note = ""
    if available is not None and gib * 2**30 > 0.9 * available:
        gib = max(1.0, math.floor(0.9 * available / 2**30))
        note = f"scaled down from {opts.big_pool_gib:g} GiB to fit this machine; "
    results = []
    for label, shape in (("default chunks", opts.shape), ("16 KiB chunks", BIG_POOL_SHAPE)):
        gc.collect()
        rss = _rss_bytes()
        tracemalloc.start()
        start = time.perf_counter()
        pool = common.pool(backend, shape, opts.dtype if label == "default chunks" else "float16", gib)
        elapsed = time.perf_counter() - start
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        touched = _rss_bytes() - rss
        per_slot = traced / pool.max_chunk_num
        slots = pool.max_chunk_num
        results.append(
            Result(
                f"construct {gib:g} GiB pool, {label}",
                backend,
                elapsed * 1e3,
                "ms",
                note=f"{note}{slots} slots, {touched / 2**20:.1f} MiB resident touched",
            )
        )
        # DESIGN section 7's bound is for many small slots (a 16 GiB pool of 16 KiB chunks has 1M); with
        # a few hundred 32 MiB slots the per-pool constant (objects, the arena's mapping) dominates.
        many_slots = shape == BIG_POOL_SHAPE
        results.append(
            Result(
                f"bookkeeping per slot, {gib:g} GiB pool, {label}",
                backend,
                per_slot,
                "B/slot",
                ratio=BOOKKEEPING_TARGET / per_slot if many_slots else None,
                target=1.0 if many_slots else None,
                note=f"{slots} slots; "
                + (
                    f"ratio = {BOOKKEEPING_TARGET} B / measured; target: <= {BOOKKEEPING_TARGET} B/slot"
                    if many_slots
                    else f"no target: the per-pool constant spread over only {slots} slots; "
                    f"the <= {BOOKKEEPING_TARGET} B bound applies to the 16 KiB-chunk pool"
                ),
            )
        )
        pool.close()
        del pool
    return results


def bench_views(backends: Sequence[str], opts: Options) -> list[Result]:
    """Cost of each cross-framework view: first access (new KVObj) and repeated (same KVObj)."""
    shape, dtype = opts.shape, opts.dtype
    results = []
    for backend in backends:
        pool = common.pool(backend, shape, dtype, opts.pool_gib)
        chunk = common.shape_only(backend, shape, dtype)
        for target in backends:
            method = f"as_{target}"
            firsts, agains = [], []
            for _ in range(200):
                obj = pool.allocate(chunk)
                convert = getattr(obj, method)
                start = time.perf_counter()
                convert()
                mid = time.perf_counter()
                convert()
                end = time.perf_counter()
                firsts.append(mid - start)
                agains.append(end - mid)
                pool.free(obj)
            results.append(
                Result(
                    f"view {backend} pool -> {target}",
                    backend,
                    statistics.median(firsts) * 1e6,
                    "us first",
                    note=f"repeated {statistics.median(agains) * 1e6:.3f} us (median of 200)",
                )
            )
    return results


__all__ = [
    "BATCH_SHAPE",
    "BIG_POOL_SHAPE",
    "BOOKKEEPING_TARGET",
    "TINY_SHAPE",
    "NaivePool",
    "bench_alloc_free",
    "bench_backend_parity",
    "bench_batch",
    "bench_construction",
    "bench_copy",
    "bench_scaling",
    "bench_views",
]
