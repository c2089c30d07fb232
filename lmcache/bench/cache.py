"""Benchmarks of the chunk cache (DESIGN section 7), each against a baseline measured in the same run.

* ``store`` + ``retrieve`` of a 16k-token prompt against ``numpy.copyto`` of the same bytes in the same
  strided pattern (chunk slices of the prompt's KV into slots, and back): target >= 0.8x.
* ``lookup`` of a 128-chunk prompt given as a Python list against ``numpy.asarray(..., int64)`` plus the
  same chained ``blake2b`` per chunk: target <= 1.5x the time.
* ``store`` into a full cache (every chunk evicts one) against an empty one: within 1.2x; and a full
  cache of 1M slots against one of 1k slots: within 1.15x (tiny chunks, so the 1M-slot pool is 256 MiB).

Run through ``python -m lmcache bench``; ``--quick`` uses a 64k-slot pool for the scaling figure.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from hashlib import blake2b

import numpy as np

from lmcache.bench import common
from lmcache.bench.common import Options, Result
from lmcache.chunk_cache import KEY_BYTES, ChunkCache
from lmcache.errors import BenchmarkError
from lmcache.hostmem import allocate_host

#: Chunks of 256 tokens, 4 KiB per token in bf16 (1 MiB per chunk): a 16k-token prompt is 64 MiB.
CACHE_SHAPE = (4, 2, 256, 4, 64)
PROMPT_TOKENS = 16_384
#: 256-token chunks with almost no bytes: ``lookup`` cost is hashing and dict work.
LOOKUP_SHAPE = (1, 1, 256, 1, 8)
LOOKUP_CHUNKS = 128
#: 16-token chunks of 256 bytes (bf16): a 1M-slot pool is 256 MiB.
EVICT_SHAPE = (1, 1, 16, 1, 8)
EVICT_PROMPT_CHUNKS = 16
EVICT_PROMPTS = 32  # per trial: 512 chunks stored (and, in a full cache, 512 evicted)


def bench_cache_copy(backend: str, opts: Options) -> list[Result]:
    """store + retrieve of a 16k-token prompt (4k with ``--quick``), against numpy.copyto of the same
    chunk slices between memory of the same kinds."""
    L, kv_planes, chunk, H, D = CACHE_SHAPE
    prompt_tokens = PROMPT_TOKENS if opts.repeat > 2 else PROMPT_TOKENS // 4  # --quick: a 4k prompt
    shape = (L, kv_planes, prompt_tokens, H, D)
    chunks = prompt_tokens // chunk
    pool = common.slots_pool(backend, CACHE_SHAPE, opts.dtype, chunks)
    cache = ChunkCache(pool)
    tokens = np.arange(prompt_tokens, dtype=np.int64)
    kv_host = common.aligned_copy(common.filled("numpy", shape, opts.dtype))
    kv = kv_host if backend == "numpy" else common.filled(backend, shape, opts.dtype)
    out_host = common.aligned_copy(kv_host)
    # JAX arrays are immutable: a JAX cache retrieves into host memory.
    out = common.filled("torch", shape, opts.dtype) if backend == "torch" else out_host
    # The baseline: the same bytes into slot-sized buffers of the pool's kind of memory (page-aligned
    # anonymous mmap, slot stride as the pool's) and back, chunk by chunk.
    layout = pool.layout
    arena = allocate_host(chunks * layout.slot_bytes).view(layout.dtype.numpy_dtype)
    arena = arena.reshape(chunks, layout.slot_elems)
    slots = [arena[i, : layout.chunk_elems].reshape(CACHE_SHAPE) for i in range(chunks)]
    spans = [(i * chunk, (i + 1) * chunk) for i in range(chunks)]

    def copies() -> float:
        start = time.perf_counter()
        for slot, (s, e) in zip(slots, spans, strict=True):
            np.copyto(slot, kv_host[:, :, s:e])
        for slot, (s, e) in zip(slots, spans, strict=True):
            np.copyto(out_host[:, :, s:e], slot)
        return time.perf_counter() - start

    def cached(into_out: bool) -> Callable[[], float]:
        def run() -> float:
            cache.clear()
            start = time.perf_counter()
            cache.store(tokens, kv)
            _, n = cache.retrieve(tokens, out=out) if into_out else cache.retrieve(tokens)
            elapsed = time.perf_counter() - start
            if n != prompt_tokens:
                raise BenchmarkError(
                    f"the cache benchmark retrieved {n} of the {prompt_tokens} tokens it stored: the cache "
                    "dropped chunks of a prompt that fits its pool (a bug in ChunkCache)"
                )
            return elapsed

        return run

    best = common.best({"copyto": copies, "out": cached(True), "new": cached(False)}, opts.repeat)
    moved = 2 * kv_host.nbytes / 1e9
    return [
        Result(
            f"cache store+retrieve, {prompt_tokens // 1024}k tokens{label}",
            backend,
            moved / best[key],
            "GB/s",
            moved / best["copyto"],
            "numpy.copyto, same chunk slices and memory",
            best["copyto"] / best[key],
            target,
            f"{kv_host.nbytes >> 20} MiB each way, {chunks} chunks of {CACHE_SHAPE}",
            headline=key == "out",
        )
        for key, label, target in (
            ("out", " (into out=)", 0.8),
            ("new", " (new array)", None),
        )
    ]


def bench_cache_lookup(opts: Options) -> list[Result]:
    """lookup of a 128-chunk prompt given as a list, against asarray + chained blake2b per chunk."""
    chunk = LOOKUP_SHAPE[2]
    pool = common.slots_pool("numpy", LOOKUP_SHAPE, opts.dtype, LOOKUP_CHUNKS)
    cache = ChunkCache(pool)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 128_000, size=LOOKUP_CHUNKS * chunk)]
    kv = common.filled("numpy", (*LOOKUP_SHAPE[:2], len(tokens), *LOOKUP_SHAPE[3:]), opts.dtype)
    if cache.store(tokens, kv) != len(tokens):
        raise BenchmarkError(
            f"the lookup benchmark stored fewer than the {len(tokens)} tokens of a prompt sized to fill its "
            f"pool exactly: {cache.stats()}"
        )
    miss = [tokens[0] + 1, *tokens[1:]]
    step = chunk * 8
    calls = 20

    def baseline() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            data = np.asarray(tokens, dtype=np.int64).data.cast("B")
            key = b"\x00" * KEY_BYTES
            for offset in range(0, len(data), step):
                key = blake2b(data[offset : offset + step], digest_size=KEY_BYTES, key=key).digest()
        return (time.perf_counter() - start) / calls

    trials = {
        "baseline": baseline,
        "hit": common.timed(lambda: cache.lookup(tokens), calls),
        "miss": common.timed(lambda: cache.lookup(miss), calls),
    }
    best = common.best(trials, opts.repeat)
    return [
        Result(
            f"cache lookup, {LOOKUP_CHUNKS} chunks of {chunk} tokens (list)",
            "numpy",
            best["hit"] * 1e3,
            "ms",
            best["baseline"] * 1e3,
            "asarray(int64) + chained blake2b",
            best["baseline"] / best["hit"],
            1 / 1.5,
            f"target: <= 1.5x the time; a first-chunk miss takes {best['miss'] * 1e3:.3f} ms",
            headline=True,
        )
    ]


def _filled_cache(slots: int, dtype: str) -> tuple[ChunkCache, list[int]]:
    """A cache whose pool of ``slots`` slots is full, and the next unused token id."""
    cache = ChunkCache(common.slots_pool("numpy", EVICT_SHAPE, dtype, slots))
    chunk = EVICT_SHAPE[2]
    per_store = 256 * chunk
    kv = common.filled("numpy", (*EVICT_SHAPE[:2], per_store, *EVICT_SHAPE[3:]), dtype)
    base = 0
    while len(cache) < slots:
        cache.store(np.arange(base, base + per_store, dtype=np.int64), kv)
        base += per_store
    return cache, [base]


def bench_cache_eviction(opts: Options) -> list[Result]:
    """store into a full (evicting) cache vs an empty one, and a 1M-slot full cache vs a 1k-slot one."""
    quick = opts.repeat <= 2
    big_slots = (1 << 16) if quick else (1 << 20)
    chunk = EVICT_SHAPE[2]
    prompt_tokens = EVICT_PROMPT_CHUNKS * chunk
    kv = common.filled("numpy", (*EVICT_SHAPE[:2], prompt_tokens, *EVICT_SHAPE[3:]), opts.dtype)
    stored = EVICT_PROMPTS * EVICT_PROMPT_CHUNKS
    empty, _ = _filled_cache(1024, opts.dtype)
    empty.clear()
    small, small_next = _filled_cache(1024, opts.dtype)
    big, big_next = _filled_cache(big_slots, opts.dtype)
    gc.freeze()  # a million entries would make every gc.collect() in common.best slow; they are not measured

    def storing(cache: ChunkCache, next_token: list[int], clear: bool) -> Callable[[], float]:
        def run() -> float:
            if clear:
                cache.clear()
            base = next_token[0]
            prompts = [
                np.arange(base + i * prompt_tokens, base + (i + 1) * prompt_tokens, dtype=np.int64)
                for i in range(EVICT_PROMPTS)
            ]
            next_token[0] = base + EVICT_PROMPTS * prompt_tokens
            start = time.perf_counter()
            for prompt in prompts:
                cache.store(prompt, kv)
            return (time.perf_counter() - start) / stored

        return run

    try:
        best = common.best(
            {
                "empty": storing(empty, [1 << 40], clear=True),
                "full": storing(small, small_next, clear=False),
                "big": storing(big, big_next, clear=False),
            },
            opts.repeat,
        )
        evicted = (small.stats().evicted, big.stats().evicted)
    finally:
        gc.unfreeze()
    if min(evicted) == 0:
        raise BenchmarkError(
            f"the full caches did not evict (evicted: {evicted}), so the eviction benchmark measured "
            "plain stores: the caches filled before the trials were not full"
        )
    return [
        Result(
            "cache store per chunk, full (evicting) vs empty, 1k slots",
            "numpy",
            best["full"] * 1e6,
            "us/chunk",
            best["empty"] * 1e6,
            "empty cache",
            best["empty"] / best["full"],
            1 / 1.2,
            f"{EVICT_PROMPT_CHUNKS}-chunk prompts of {EVICT_SHAPE}; target: within 1.2x",
            headline=True,
        ),
        Result(
            f"cache store per chunk, full, {big_slots:,} vs 1,024 slots",
            "numpy",
            best["big"] * 1e6,
            "us/chunk",
            best["full"] * 1e6,
            "full cache of 1,024 slots",
            best["full"] / best["big"],
            1 / 1.15,
            "target: within 1.15x" + (" (quick run: 64k slots, not 1M)" if quick else ""),
            headline=True,
        ),
    ]


def bench_chunk_cache(backends: Sequence[str], opts: Options) -> list[Result]:
    """The chunk cache's section of ``python -m lmcache bench``."""
    results = []
    for backend in backends:
        results += bench_cache_copy(backend, opts)
        gc.collect()
    results += bench_cache_lookup(opts)
    results += bench_cache_eviction(opts)
    return results


__all__ = [
    "bench_cache_copy",
    "bench_cache_eviction",
    "bench_cache_lookup",
    "bench_chunk_cache",
]
